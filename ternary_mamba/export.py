"""`ternary-mamba export`: a QAT run / student folder (or a full-precision model, quantized with absmean
PTQ on the way) -> a packed folder; and the size report shown by `ternary-mamba info`."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import find_tokenizer, load_model, resolve_model_dir
from .errors import UserError
from .info import MB, count_params_by_component, packed_size_bytes


def resolve_student_dir(path: str) -> Path:
    folder = resolve_model_dir(path)
    if (folder / "run.json").exists():
        for d in ("student", "model"):
            if (folder / d / "config.json").exists():
                return folder / d
        raise UserError(f"{folder}: run folder without a finished model (no student/ or model/); "
                        "wait for the run to finish or --resume it")
    return folder


def run_export(args) -> None:
    from .packed import export_packed
    from .quant.qat import TernaryConfig, quantize_
    folder = resolve_student_dir(args.model)
    model = load_model(folder)
    source = str(folder)
    if getattr(model, "packed_header", None):
        raise UserError(f"{folder}: already packed")
    if getattr(model, "ternary_config", None) is None:
        G = args.group_size or (256 if args.format == "gguf" and args.gguf_type != "f16" else 128)
        print(f"{folder} is full precision: applying absmean PTQ (group {G}) before packing")
        quantize_(model, TernaryConfig(group_size=G))
        source += " (absmean PTQ)"
    if args.format == "gguf":
        from .gguf_io import export_gguf
        out = Path(args.out)
        types = export_gguf(model, out, args.gguf_type, find_tokenizer(folder), name=folder.name)
        print(f"wrote {out}: {out.stat().st_size / MB:.2f} MB, {len(types)} tensors, ternary projections as "
              f"{args.gguf_type.upper()}, embedding {'fp32' if args.gguf_type == 'f32' else 'fp16'} "
              "(llama.cpp architecture mamba2)")
        return
    export_packed(model, Path(args.out), args.format, args.other_dtype, find_tokenizer(folder), source)
    print(f"wrote {args.out}")
    print(format_size_table(model.config, model.ternary_config.group_size))


def format_size_table(cfg, group_size: int) -> str:
    fp16 = sum(count_params_by_component(cfg).values()) * 2
    ternary = sum(v for k, v in count_params_by_component(cfg).items() if k in ("in_proj", "out_proj"))
    rows = [("FP16", fp16, 16.0),
            ("paper layout (2-bit + separate fp16 head)", sum(packed_size_bytes(cfg, group_size, "tq2", True).values()), 2 + 16 / group_size),
            ("tq2 (2-bit, tied)", sum(packed_size_bytes(cfg, group_size, "tq2").values()), 2 + 16 / group_size),
            ("tq1 (1.6-bit, tied)", sum(packed_size_bytes(cfg, group_size, "tq1").values()), 1.6 + 16 / group_size)]
    lines = [f"{'layout':<44} {'MB':>10} {'vs FP16':>8} {'bits/ternary weight':>20}"]
    for name, size, bpw in rows:
        lines.append(f"{name:<44} {size / MB:>10,.1f} {fp16 / size:>7.2f}x {bpw if name != 'FP16' else 16:>20.3f}")
    lines.append(f"({ternary:,} ternary weights of {sum(count_params_by_component(cfg).values()):,}; group size {group_size})")
    return "\n".join(lines)


def packed_info(folder: Path) -> str:
    """Per-component bytes actually stored in a packed folder, bits per ternary weight, compression."""
    import json
    import re

    from safetensors import safe_open
    h = json.loads((folder / "config.json").read_text())
    sizes: dict[str, int] = {}
    n_ternary = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_slice(k)
            nbytes = 1
            for s in t.get_shape():
                nbytes *= s
            nbytes *= {"U8": 1, "F16": 2, "F32": 4, "BF16": 2}[t.get_dtype()]
            comp = re.sub(r"^backbone\.(layers\.\d+\.)?", "", k)
            sizes[comp] = sizes.get(comp, 0) + nbytes
    for spec in h["ternary"].values():
        n_ternary += spec["shape"][0] * spec["shape"][1]
    from .config import Mamba2Config
    cfg = Mamba2Config.from_dict(h["config"])
    fp16 = sum(count_params_by_component(cfg).values()) * 2
    total = sum(sizes.values())
    tern_bytes = sum(v for k, v in sizes.items() if k.endswith((".codes", ".scales")))
    lines = [f"packed model: {folder}  (format v{h['format_version']}, {h['packing']}, "
             f"group {next(iter(h['ternary'].values()))['group_size']}, others {h['other_dtype']})",
             f"source: {h.get('source') or '?'}", "stored bytes by component:"]
    for k, v in sorted(sizes.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {k:<28} {v / MB:>10.3f} MB")
    lines.append(f"  {'total':<28} {total / MB:>10.3f} MB   (FP16 {fp16 / MB:.3f} MB: {fp16 / total:.2f}x smaller)")
    lines.append(f"bits per ternary weight (codes + scales): {8 * tern_bytes / n_ternary:.3f}")
    return "\n".join(lines)
