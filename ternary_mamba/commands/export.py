"""`ternary-mamba export`: a QAT run / student folder (or a full-precision model, quantized with absmean
PTQ on the way) -> a packed tq2 / tq1 folder or one GGUF file."""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..core.config import MB
from ..errors import UserError
from ..formats.folders import find_tokenizer
from ..runtime.load import load_model, load_model_and_tokenizer
from ..formats.paths import is_gguf, resolve_student_dir
from ..formats.sizes import format_size_table
from ..spec import group_paths
from ..quant.adopt import adopt_ternary_
from ..quant.qat import TernaryConfig, quantize_, ternary_modules
from .configs import ExportConfig
from .flags import require
from ..log import say

def export(cfg: ExportConfig) -> Path:
    """Write `cfg.model` as a packed folder or a GGUF file at `cfg.out`; returns that path.  The Python twin of
    `ternary-mamba export`."""
    from ..formats.packed import export_packed
    require(cfg, "model", "out", command="export")
    tok_path = None
    if is_gguf(cfg.model):                     # a GGUF file: its dense weights, its embedded tokenizer
        model, tok = load_model_and_tokenizer(cfg.model)
        folder = Path(cfg.model)
        tok_path = tok.save(Path(tempfile.mkdtemp()) / "tokenizer.json")
    else:
        folder = resolve_student_dir(cfg.model)
        model = load_model(folder)
        tok_path = find_tokenizer(folder)
    source = str(folder)
    if getattr(model, "packed_header", None):
        raise UserError(f"{folder}: already packed")
    if getattr(model, "ternary_config", None) is None:
        adopted = adopt_ternary_(model)
        if adopted is not None:           # read back from a ternary export: the same codes and scales, exactly
            say(f"{folder}: its projections are already ternary (groups of {adopted}); packing them as they are")
            source += " (ternary weights adopted exactly)"
        else:
            say(f"{folder} is full precision: applying absmean PTQ (group {cfg.group_size}) before packing")
            quantize_(model, TernaryConfig(group_size=cfg.group_size))
            source += " (absmean PTQ)"
    out = Path(cfg.out)
    if cfg.format == "gguf":
        qtype = cfg.gguf_type
        if qtype == "auto":
            groups = {m.group_size for _, m in ternary_modules(model)}
            qtype = "tq2_0" if all(group_paths(g).gguf_tq for g in groups) else "f16"
            if qtype == "f16":
                say(f"groups of {min(groups)} do not fit llama.cpp's TQ types (256 weights per scale): writing "
                      "the exact f16 weights; quantize with --target gguf for a TQ2_0 file")
        types = export_gguf_with_costs(model, out, qtype, tok_path, folder.name, cfg)
        say(f"wrote {out}: {out.stat().st_size / MB:.2f} MB, {len(types)} tensors, ternary projections as "
              f"{qtype.upper()}, embedding {'fp32' if qtype == 'f32' else 'fp16'} (llama.cpp architecture mamba2)")
        return out
    if cfg.format == "hf":
        from ..formats.hf import card_facts, export_hf
        export_hf(model, out, cfg.hf_dtype, tok_path, source, card_facts(folder if folder.is_dir() else None))
        say(f"wrote {out}: a transformers Mamba2ForCausalLM folder ({cfg.hf_dtype}, ternary weights dequantized) "
              "with its model card")
        return out
    export_packed(model, out, cfg.format, cfg.other_dtype, tok_path, source, cfg.embedding)
    size = (out / "model.safetensors").stat().st_size / MB
    say(f"wrote {out}: {size:.2f} MB ({cfg.format}, embedding {cfg.embedding})")
    say(format_size_table(model.config, model.ternary_config.group_size))
    if cfg.cost_tokens:
        record_decode_costs(out, cfg.cost_tokens, cfg.cost_text)
    return out


def export_gguf_with_costs(model, out: Path, qtype: str, tok_path, name: str, cfg: ExportConfig) -> dict:
    """export_gguf, and with --cost-tokens the decode modes' measured cost in the file's metadata (runtime/modes.py
    GGUF_KEY): measured on the file as `generate` loads it (written once aside, read back packed), then the file
    written again with the record.  Returns {tensor name: ggml type name}."""
    import json
    import os
    from ..formats.gguf import export_gguf
    from ..runtime.load import load_for_decoding
    from ..runtime.modes import GGUF_KEY
    if not cfg.cost_tokens or qtype == "f32" or tok_path is None:
        if cfg.cost_tokens and qtype != "f32":
            say("no tokenizer to embed: decode modes not measured (generate will run the exact path)")
        return export_gguf(model, out, qtype, tok_path, name=name)
    if Path(out).exists():
        raise UserError(f"{out}: already exists; choose another --out")
    aside = Path(out).with_name(f".{Path(out).stem}.measure-{os.getpid()}.gguf")
    try:
        types = export_gguf(model, aside, qtype, tok_path, name=name)
        packed, tok, _ = load_for_decoding(aside)
        rec = (measure_decode_costs(packed, tok, cfg.cost_tokens, cfg.cost_text)
               if getattr(packed, "packed_header", None) else None)
        del packed
        if rec is None:
            os.replace(aside, out)
            return types
        return export_gguf(model, out, qtype, tok_path, name=name, metadata={GGUF_KEY: json.dumps(rec)})
    finally:
        aside.unlink(missing_ok=True)


def record_decode_costs(folder: Path, n_tokens: int, text: str | None = None) -> dict | None:
    """Measure every faster decode mode of the packed `folder` against its exact path on held-out text and record
    it there (runtime/modes.py); None when the folder has no tokenizer to encode the text with."""
    from ..formats.tokenizer import load_tokenizer
    from ..runtime.modes import write_record
    tok_file = find_tokenizer(folder)
    if tok_file is None:
        say("no tokenizer in the folder: decode modes not measured (generate will run the exact path)")
        return None
    rec = measure_decode_costs(load_model(folder), load_tokenizer(tok_file), n_tokens, text)
    return write_record(folder, rec) if rec is not None else None


def measure_decode_costs(model, tok, n_tokens: int, text: str | None = None) -> dict | None:
    """The decode-mode record (runtime/modes.py make_record) of a packed model on n_tokens of held-out text (the
    bundled books unless `text`), said as it goes; None when the text does not encode into the model's vocabulary."""
    from ..assets import HELDOUT_BOOKS
    from ..formats.text import find_text_files, read_documents
    from ..ops.device import cpu_description
    from ..runtime.modes import DESCRIBE, choose_mode, make_record, measure_modes
    files = find_text_files([text or HELDOUT_BOOKS])
    ids: list[int] = []
    for f in files:
        ids += tok.encode("\n\n".join(read_documents(f)))
        if len(ids) > n_tokens:
            break
    ids = ids[:n_tokens + 1]
    if len(ids) < 2 or max(ids) >= model.config.vocab_size:
        say(f"the tokenizer's ids do not fit this model's vocabulary ({model.config.vocab_size}) or the text is "
            "empty: decode modes not measured (generate will run the exact path)")
        return None
    say(f"measuring decode modes on {len(ids) - 1} held-out tokens ({', '.join(f.name for f in files[:3])}...)")
    modes = measure_modes(model, ids, on_mode=lambda m: say(f"  mode {m}: {DESCRIBE[m]}"))
    rec = make_record(modes, str(text or "bundled held-out books"), len(ids) - 1, cpu_description())
    for m, c in modes.items():
        say(f"  {m:>6}: KL {c['kl']:.4f} nats/token, top-1 {c['top1']:.1%} vs exact")
    say(f"generate will decode with {choose_mode(rec)[1]}")
    return rec
