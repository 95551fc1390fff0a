"""Decode modes of a packed model, what each costs in quality, and the fast default that states its cost.

A mode is a set of opt-in inference settings (none is exact except "exact"):
  exact   the packed ternary products with fp32 activations, the stored 16-bit head, an fp32 SSM state (the
          fake-quant student's arithmetic up to fp32 summation order);
  i8head  + an 8-bit head;
  a8      + int8 activations in the ternary products (and the 8-bit head);
  fast    int8 activations, a 4-bit head (int8 activations there too) and a bf16 SSM state: the fewest bytes per
          token (`ternary-mamba bench decode` measures each mode's speed and roofline share).
`measure_modes` decodes the same held-out tokens with every mode, teacher-forced, and compares each one's next-token
distribution with the exact path's: mean KL(exact || mode) per token and top-1 agreement.  `export` records that in
the packed folder (decode_modes.json, with the text, the token count and the CPU kind; a GGUF export carries the same
record in its metadata, measured on the file as `generate` loads it); `generate` then picks the
fastest mode whose recorded cost is within the thresholds fixed here before any measurement (spec.DECODE_MODE_*),
says which mode runs and what it costs, and `--exact` always gives the exact path."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..formats.fs import read_json, write_json_atomic
from ..spec import DECODE_MODE_MAX_KL, DECODE_MODE_MIN_TOP1, DECODE_MODES

RECORD = "decode_modes.json"
GGUF_KEY = "ternary_mamba.decode_modes"                # the same record inside a GGUF file's metadata
MODES = DECODE_MODES                                   # fastest first
DESCRIBE = {"exact": "exact fp32 ternary products, 16-bit head, fp32 state",
            "i8head": "8-bit head",
            "a8": "int8 activations, 8-bit head",
            "fast": "int8 activations, 4-bit head, bf16 SSM state"}


def apply_mode(model, mode: str) -> bool:
    """Switch a packed model (in place) to `mode`; False when the model cannot run it (e.g. groups not a
    multiple of 128 for int8 activations, a head already quantized), the model then unchanged."""
    from .decode_engine import use_bf16_state
    from .heads import use_int8_head, use_q4_head
    from .packed_linear import PackedTernaryLinear, use_a8_activations
    if mode not in MODES:
        raise UserError(f"decode mode {mode!r}: choose from {', '.join(MODES)}")
    if mode == "exact":
        return True
    packed = [m for m in model.modules() if isinstance(m, PackedTernaryLinear)]
    if mode in ("a8", "fast") and not (packed and all(m.paths.gemv_a8 for m in packed)):
        return False
    try:
        (use_q4_head if mode == "fast" else use_int8_head)(model)
    except ValueError:                      # the head is quantized already (a q4/int8 table): keep it
        if mode == "fast" and getattr(model.lm_head, "fmt", None) != "q4":
            return False
    if mode in ("a8", "fast"):
        use_a8_activations(model)
    if mode == "fast":
        use_bf16_state(model)
    return True


@torch.no_grad()
def teacher_forced_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log-probabilities (len(ids) - 1, vocab) of each next token, decoding one token at a time as generate does."""
    from .decode_engine import step
    state = model.empty_state(1)
    out = []
    vocab = model.config.vocab_size
    for t in ids[:-1]:
        logits, state = step(model, torch.tensor([t]), state)
        out.append(logits[0, :vocab].float().log_softmax(-1))
    return torch.stack(out)


def measure_modes(model, ids: list[int], on_mode: Callable[[str], None] | None = None) -> dict:
    """{mode: {"kl": mean KL(exact || mode) in nats per token, "top1": share of positions whose argmax agrees with
    the exact path's}} for every mode the packed `model` can run (the model itself is not changed)."""
    if len(ids) < 2:
        raise UserError("measuring decode modes needs at least 2 tokens of text")
    ref = teacher_forced_logprobs(model, ids)
    out = {"exact": {"kl": 0.0, "top1": 1.0}}
    for mode in MODES:
        if mode == "exact":
            continue
        m = copy.deepcopy(model)
        if not apply_mode(m, mode):
            continue
        if on_mode:
            on_mode(mode)
        lp = teacher_forced_logprobs(m, ids)
        kl = (ref.exp() * (ref - lp)).sum(-1)
        out[mode] = {"kl": float(kl.mean()), "top1": float((lp.argmax(-1) == ref.argmax(-1)).float().mean())}
        del m
    return out


def within_cost(cost: dict) -> bool:
    return cost["kl"] <= DECODE_MODE_MAX_KL and cost["top1"] >= DECODE_MODE_MIN_TOP1


def fast_here() -> bool:
    """Whether `fast` can beat `a8` on this CPU's kernels: its 4-bit head needs an int8-activation kernel
    (AVX512-VNNI, or AVX2's vpmaddubsw); without one the head multiplies in fp32 and the mode is slower than the
    exact path (130m, a build without it: 42 vs 64 tok/s), so the fast default never picks it there."""
    from ..ops.dispatch import q4_a8_kernel
    return q4_a8_kernel() is not None


def choose_mode(record: dict | None) -> tuple[str, str]:
    """(mode, one line saying why and what it costs) from a folder's record (None: no record -> exact).  The
    order is fastest first on this CPU (`fast` only where `fast_here`)."""
    if not record:
        return "exact", ("exact (this folder records no measured cost of the faster modes; `ternary-mamba export` "
                         "measures it)")
    modes = record.get("modes", {})
    for mode in MODES:
        cost = modes.get(mode)
        if mode == "fast" and not fast_here():
            continue
        if mode == "exact" or (cost and within_cost(cost)):
            if mode == "exact":
                return "exact", (f"exact (no faster mode within KL <= {DECODE_MODE_MAX_KL} and top-1 >= "
                                 f"{DECODE_MODE_MIN_TOP1:.0%} of the exact path)")
            return mode, (f"{mode}: {DESCRIBE[mode]} — KL {cost['kl']:.4f} nats/token, top-1 {cost['top1']:.1%} "
                          f"vs the exact path on {record.get('tokens', '?')} held-out tokens (measured at export, "
                          f"{record.get('cpu', '?')}); --exact for the exact path")
    return "exact", "exact"


def describe_record(rec: dict | None) -> str:
    """Two lines for `info`: each mode's recorded cost, and what `generate` runs by default on this CPU."""
    if not rec:
        return "decode modes: no measured cost recorded (generate runs the exact path; `export` measures them)"
    costs = "; ".join(f"{m} KL {c['kl']:.4f}, top-1 {c['top1']:.1%}" for m, c in rec["modes"].items() if m != "exact")
    return (f"decode modes (measured at export on {rec.get('tokens', '?')} held-out tokens, {rec.get('cpu', '?')}): "
            f"{costs or 'none faster than exact'}\ngenerate's default here: {choose_mode(rec)[1]}")


def select_mode(model, source: str | None, mode: str = "auto") -> str | None:
    """Apply `mode` to a packed model loaded from `source` (auto: the fastest mode the folder's record allows) and
    return one line saying which mode runs and what it costs; None for a model that is not packed (it decodes as
    it is).  What `generate` and `serve` call."""
    if not getattr(model, "packed_header", None):
        return None
    if mode == "exact":
        chosen, why = "exact", "exact (asked for)"
    elif mode == "auto":
        folder = Path(source) if source else None
        is_file = folder is not None and folder.is_file()          # a GGUF file: its record is in the metadata
        rec = (read_gguf_record(folder) if is_file else
               read_record(folder) if folder is not None and folder.is_dir() else None)
        if is_file and rec is None:
            chosen, why = "exact", (f"exact ({folder.name} records no measured cost of the faster modes: "
                                    "`ternary-mamba export` it again, or to a packed folder, to measure them, or "
                                    "pass --mode)")
        else:
            chosen, why = choose_mode(rec)
    else:
        is_file = bool(source) and Path(source).is_file()
        where = ("its measured cost: the file's metadata" if is_file and read_gguf_record(Path(source)) else
                 "not measured for this file: `ternary-mamba export` measures it" if is_file else
                 "its measured cost: decode_modes.json")
        chosen, why = mode, f"{mode}: {DESCRIBE.get(mode, '?')} (asked for; {where})"
    if not apply_mode(model, chosen):
        raise UserError(f"--mode {chosen}: this model cannot run it (int8 activations need groups of a multiple "
                        "of 128)")
    return why


def valid_record(rec) -> dict | None:
    """`rec` when it is a record this version understands (every mode known, numeric KL and top-1), else None."""
    modes = rec.get("modes") if isinstance(rec, dict) else None
    if not isinstance(modes, dict) or not all(
            k in MODES and isinstance(v, dict) and isinstance(v.get("kl"), (int, float))
            and isinstance(v.get("top1"), (int, float)) for k, v in modes.items()):
        return None
    return rec


def read_record(folder: Path) -> dict | None:
    """The folder's decode_modes.json, or None when absent or not a record this version understands."""
    p = Path(folder) / RECORD
    if not p.is_file():
        return None
    try:
        return valid_record(read_json(p))
    except UserError:
        return None


def read_gguf_record(path: Path) -> dict | None:
    """The record a GGUF file of ours carries in its metadata (GGUF_KEY, the same JSON as decode_modes.json; read
    from the metadata alone), or None when absent or not one this version understands."""
    import json
    from ..formats.gguf import gguf_module
    from ..formats.gguf_load import read_gguf_file
    try:
        value = read_gguf_file(Path(path), gguf_module()).fields.get(GGUF_KEY, (None, None))[0]
        return valid_record(json.loads(value)) if isinstance(value, str) else None
    except (UserError, ValueError):
        return None


def make_record(modes: dict, text: str, tokens: int, cpu: str) -> dict:
    return {"modes": modes, "text": text, "tokens": tokens, "cpu": cpu,
            "thresholds": {"max_kl": DECODE_MODE_MAX_KL, "min_top1": DECODE_MODE_MIN_TOP1}}


def write_record(folder: Path, rec: dict) -> dict:
    write_json_atomic(Path(folder) / RECORD, rec)
    return rec
