"""Run folders: creation, the resume check, data preparation shared by `pretrain` and `quantize`.

A run folder holds run.json (what was asked for), metrics.jsonl, checkpoint/ (latest complete
state, swapped in atomically), and at the end the trained model folder and summary.json.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .data import PackedSequences, load_tokens, split_heldout, tokenize_to_file
from .loop import write_json_atomic

# Fields of run.json that may differ on --resume (they do not change the trajectory)
RESUME_FREE = {"resume", "log_every", "eval_every", "save_every", "threads", "out", "cache_dir", "quiet"}


def prepare_run_dir(out: Path, spec: dict, resume: bool) -> bool:
    """Create (or check for resuming) a run folder; returns True when a checkpoint should be loaded."""
    out = Path(out)
    run_json = out / "run.json"
    if resume:
        if not run_json.exists():
            raise UserError(f"{out}: not a run folder (no run.json); cannot --resume")
        old = json.loads(run_json.read_text())
        old.setdefault("world_size", 1)  # runs written before distributed support
        diff = sorted(k for k in set(old) | set(spec)
                      if k not in RESUME_FREE and old.get(k) != spec.get(k))
        if diff:
            k = diff[0]
            raise UserError(f"{out}: --resume with a different config ({k}: run has {old.get(k)!r}, "
                            f"now {spec.get(k)!r}); use the same arguments or a new --out")
        return (out / "checkpoint" / "trainer_state.json").exists()
    if out.exists() and any(out.iterdir()):
        what = "already holds a run" if run_json.exists() else "exists and is not empty"
        raise UserError(f"{out}: {what}; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_json, spec)
    return False


def prepare_run_and_data(out: Path, spec: dict, resume: bool, data, eval_data, tok, seq_len: int,
                         heldout_fraction: float, cache_dir) -> tuple[bool, PackedSequences, PackedSequences]:
    """Rank 0 tokenizes (filling the cache) and creates / checks the run folder; the other ranks wait,
    then read the cached tokens.  Returns (load checkpoint?, train, held-out)."""
    from . import distributed as D
    spec = {**spec, "world_size": D.world()[1]}
    if D.is_main():
        train, held = prepare_data(data, eval_data, tok, seq_len, heldout_fraction, cache_dir)
        load = prepare_run_dir(out, spec, resume)
    D.barrier()
    if not D.is_main():
        train, held = prepare_data(data, eval_data, tok, seq_len, heldout_fraction, cache_dir, verbose=False)
        load = resume and (Path(out) / "checkpoint" / "trainer_state.json").exists()
    return load, train, held


def prepare_data(data: list[str], eval_data: list[str] | None, tokenizer, seq_len: int,
                 heldout_fraction: float, cache_dir=None, verbose: bool = True
                 ) -> tuple[PackedSequences, PackedSequences]:
    tokens = load_tokens(tokenize_to_file(data, tokenizer, cache_dir, verbose))
    if eval_data:
        held = PackedSequences(load_tokens(tokenize_to_file(eval_data, tokenizer, cache_dir, verbose)), seq_len)
        return PackedSequences(tokens, seq_len), held
    return split_heldout(tokens, seq_len, heldout_fraction)
