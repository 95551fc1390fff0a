"""What `info` shows: a config's parameters by component, packed sizes computed from a config alone, and the
bytes a packed folder actually stores."""
from __future__ import annotations

import re
from pathlib import Path

from ..core.config import MB, Mamba2Config, count_params_by_component
from ..ops.packing import PER_BYTE
from ..quant.tables import table_bytes
from .fs import read_json
from ..errors import UserError
from ..spec import DEFAULT_GROUP_SIZE, Q4_GROUP, TARGETS, resolve_group_size


def format_info(cfg: Mamba2Config, title: str = "") -> str:
    counts = count_params_by_component(cfg)
    total = sum(counts.values())
    lines = [f"model: {title}" if title else "model", "config:"]
    for k, v in cfg.to_dict().items():
        lines.append(f"  {k:<24} {v}")
    lines.append(f"  {'d_inner / nheads':<24} {cfg.d_inner} / {cfg.nheads}")
    lines.append("parameters:")
    for k, v in counts.items():
        lines.append(f"  {k:<16} {v:>15,}  {100 * v / total:5.1f} %")
    lines.append(f"  {'total':<16} {total:>15,}")
    lines.append(f"FP16 size: {total * 2 / MB:,.1f} MB   FP32 size: {total * 4 / MB:,.1f} MB")
    return "\n".join(lines)


def packed_size_bytes(cfg: Mamba2Config, group_size: int | dict[str, int] = DEFAULT_GROUP_SIZE, packing: str = "tq1",
                      separate_head: bool = False, targets=TARGETS,
                      embedding: str = "fp16") -> dict[str, int]:
    """Bytes of a packed ternary checkpoint by component (tensor data only; the header is small).

    packing: tq2 = 4 codes per byte, tq1 = 5 codes per byte (base 3), both over the flattened matrix;
    one fp16 scale per group; everything else fp16; the embedding stored once when tied, unless
    `separate_head` (the paper's layout: its own fp16 lm_head); `embedding` int8 / q4: the tied table quantized
    (quant/tables.py)."""
    per_byte = PER_BYTE[packing]
    counts = count_params_by_component(cfg)
    shapes = {"in_proj": (cfg.d_in_proj, cfg.d_model), "out_proj": (cfg.d_model, cfg.d_inner)}
    out = {}
    for name, (rows, cols) in shapes.items():
        if name not in targets:
            continue
        G = resolve_group_size(group_size[name] if isinstance(group_size, dict) else group_size, cols, name)
        n = rows * cols
        out[f"{name} codes"] = cfg.n_layer * -(-n // per_byte)
        out[f"{name} scales"] = cfg.n_layer * (n // G) * 2
        counts.pop(name)
    if separate_head:
        counts["lm_head"] = counts["embedding"]
    if embedding != "fp16" and not separate_head:
        out[f"embedding ({embedding})"] = table_bytes(cfg.padded_vocab_size, cfg.d_model, embedding)
        counts.pop("embedding")
    for name, n in counts.items():
        if n:
            out[f"{name} (fp16)"] = n * 2
    return out


def ternary_bits_per_weight(cfg: Mamba2Config, group_size: int | dict[str, int], packing: str) -> float:
    """Bits per ternary weight (codes + fp16 scales) of the packed layout: from the bytes, whatever the groups."""
    sizes = packed_size_bytes(cfg, group_size, packing)
    n = sum(v for k, v in count_params_by_component(cfg).items() if k in TARGETS)
    return 8 * sum(v for k, v in sizes.items() if k.endswith((" codes", " scales"))) / n


def format_size_table(cfg, group_size: int | dict[str, int]) -> str:
    """The size of every packed layout of `cfg`; `group_size` as a model records it (resolved, or the user's -1)."""
    fp16 = sum(count_params_by_component(cfg).values()) * 2
    ternary = sum(v for k, v in count_params_by_component(cfg).items() if k in TARGETS)
    b2, b1 = ternary_bits_per_weight(cfg, group_size, "tq2"), ternary_bits_per_weight(cfg, group_size, "tq1")
    rows = [("FP16", fp16, 16.0),
            ("paper layout (2-bit + separate fp16 head)", sum(packed_size_bytes(cfg, group_size, "tq2", True).values()), b2),
            ("tq2 (2-bit, tied)", sum(packed_size_bytes(cfg, group_size, "tq2").values()), b2),
            ("tq1 (1.6-bit, tied)", sum(packed_size_bytes(cfg, group_size, "tq1").values()), b1)]
    if cfg.d_model % Q4_GROUP == 0:
        rows += [(f"tq1 + {e} embedding (--embedding {e})", sum(packed_size_bytes(cfg, group_size, "tq1", embedding=e).values()),
                  b1) for e in ("int8", "q4")]
    lines = [f"{'layout':<44} {'MB':>10} {'vs FP16':>8} {'bits/ternary weight':>20}"]
    for name, size, bpw in rows:
        lines.append(f"{name:<44} {size / MB:>10,.1f} {fp16 / size:>7.2f}x {bpw if name != 'FP16' else 16:>20.3f}")
    groups = ", ".join(f"{k} {v}" for k, v in group_size.items()) if isinstance(group_size, dict) else group_size
    lines.append(f"({ternary:,} ternary weights of {sum(count_params_by_component(cfg).values()):,}; group size {groups})")
    return "\n".join(lines)


def packed_info(folder: Path) -> str:
    """Per-component bytes actually stored in a packed folder, bits per ternary weight, compression."""
    from safetensors import safe_open
    h = read_json(folder / "config.json")
    sizes: dict[str, int] = {}
    n_ternary = 0
    try:
        f = safe_open(str(folder / "model.safetensors"), "pt")
    except Exception as e:  # noqa: BLE001 - SafetensorError / OSError: a damaged or missing file
        raise UserError(f"{folder / 'model.safetensors'}: not a readable safetensors file "
                        f"({str(e).splitlines()[0][:160]})") from None
    with f:
        for k in f.keys():
            t = f.get_slice(k)
            nbytes = 1
            for s in t.get_shape():
                nbytes *= s
            nbytes *= {"U8": 1, "I8": 1, "F16": 2, "F32": 4, "BF16": 2}[t.get_dtype()]
            comp = re.sub(r"^backbone\.(layers\.\d+\.)?", "", k)
            sizes[comp] = sizes.get(comp, 0) + nbytes
    for spec in h["ternary"].values():
        n_ternary += spec["shape"][0] * spec["shape"][1]
    cfg = Mamba2Config.from_dict(h["config"])
    fp16 = sum(count_params_by_component(cfg).values()) * 2
    total = sum(sizes.values())
    tern_bytes = sum(v for k, v in sizes.items() if k.endswith((".codes", ".scales")) and not k.startswith("embedding."))
    lines = [f"packed model: {folder}  (format v{h['format_version']}, {h['packing']}, "
             f"group {next(iter(h['ternary'].values()))['group_size']}, others {h['other_dtype']}, "
             f"embedding {h.get('embedding', h['other_dtype'])})",
             f"source: {h.get('source') or '?'}", "stored bytes by component:"]
    for k, v in sorted(sizes.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {k:<28} {v / MB:>10.3f} MB")
    lines.append(f"  {'total':<28} {total / MB:>10.3f} MB   (FP16 {fp16 / MB:.3f} MB: {fp16 / total:.2f}x smaller)")
    lines.append(f"bits per ternary weight (codes + scales): {8 * tern_bytes / n_ternary:.3f}")
    return "\n".join(lines)
