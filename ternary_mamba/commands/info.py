"""`ternary-mamba info`: a preset, config file, model / run / packed folder or GGUF file at a glance."""
from __future__ import annotations

from pathlib import Path

from ..core.config import MB, PRESETS, Mamba2Config
from ..errors import UserError
from ..formats.configs import PACKED_FORMAT_NAME, config_from_json
from ..formats.fs import read_json
from ..formats.load import is_gguf, resolve_student_dir
from ..formats.sizes import format_info, format_size_table, packed_info
from ..quant.groups import DEFAULT_GROUP_SIZE


def info(path: str) -> str:
    if path in PRESETS:
        return format_info(Mamba2Config(**PRESETS[path]), path)
    p = Path(path)
    if is_gguf(p):
        from ..formats.gguf import load_gguf
        model = load_gguf(p)
        return (format_info(model.config, str(p)) + f"\nGGUF file: {p.stat().st_size / MB:,.2f} MB "
                f"(read back as a dense model: the ternary projections dequantized)")
    if p.is_file():
        return format_info(config_from_json(p), str(p))
    folder = resolve_student_dir(path)
    if not (folder / "config.json").exists():
        raise UserError(f"{folder}: no config.json")
    meta = read_json(folder / "config.json")
    cfg = config_from_json(folder / "config.json")
    if meta.get("format") == PACKED_FORMAT_NAME and (folder / "model.safetensors").exists():
        return format_info(cfg, str(folder)) + "\n" + packed_info(folder)
    q = meta.get("quantization")
    try:
        sizes = format_size_table(cfg, q["group_size"] if q else DEFAULT_GROUP_SIZE)
    except UserError as e:   # a model too narrow for the default group: no packed sizes to show
        sizes = f"packed sizes: not shown ({e})"
    return format_info(cfg, str(folder)) + "\n" + sizes
