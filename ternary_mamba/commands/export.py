"""`ternary-mamba export`: a QAT run / student folder (or a full-precision model, quantized with absmean
PTQ on the way) -> a packed tq2 / tq1 folder or one GGUF file."""
from __future__ import annotations

from pathlib import Path

from ..core.config import MB
from ..errors import UserError
from ..formats.folders import find_tokenizer
from ..formats.load import load_model, resolve_student_dir
from ..formats.sizes import format_size_table
from ..quant.groups import DEFAULT_GROUP_SIZE
from ..quant.qat import TernaryConfig, quantize_
from .configs import ExportConfig
from .flags import require

GGUF_TQ_GROUP = 256   # llama.cpp's TQ1_0 / TQ2_0 block: the PTQ group size that exports to them exactly


def export(cfg: ExportConfig) -> Path:
    """Write `cfg.model` as a packed folder or a GGUF file at `cfg.out`; returns that path.  The Python twin of
    `ternary-mamba export`."""
    from ..formats.packed import export_packed
    require(cfg, "model", "out", command="export")
    folder = resolve_student_dir(cfg.model)
    model = load_model(folder)
    source = str(folder)
    if getattr(model, "packed_header", None):
        raise UserError(f"{folder}: already packed")
    if getattr(model, "ternary_config", None) is None:
        G = cfg.group_size or (GGUF_TQ_GROUP if cfg.format == "gguf" and cfg.gguf_type.startswith("tq")
                               else DEFAULT_GROUP_SIZE)
        print(f"{folder} is full precision: applying absmean PTQ (group {G}) before packing")
        quantize_(model, TernaryConfig(group_size=G))
        source += " (absmean PTQ)"
    out = Path(cfg.out)
    if cfg.format == "gguf":
        from ..formats.gguf import export_gguf
        types = export_gguf(model, out, cfg.gguf_type, find_tokenizer(folder), name=folder.name)
        print(f"wrote {out}: {out.stat().st_size / MB:.2f} MB, {len(types)} tensors, ternary projections as "
              f"{cfg.gguf_type.upper()}, embedding {'fp32' if cfg.gguf_type == 'f32' else 'fp16'} "
              "(llama.cpp architecture mamba2)")
        return out
    export_packed(model, out, cfg.format, cfg.other_dtype, find_tokenizer(folder), source)
    print(f"wrote {out}")
    print(format_size_table(model.config, model.ternary_config.group_size))
    return out
