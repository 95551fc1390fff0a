"""Parameter counts by component and sizes, from a config alone (no weights needed)."""
from __future__ import annotations

from .config import Mamba2Config

MB = 1e6  # sizes are reported in decimal megabytes, as the paper does (2,687.5 MB for Mamba-2 1.3B)


def count_params_by_component(cfg: Mamba2Config) -> dict[str, int]:
    L = cfg.n_layer
    emb = cfg.padded_vocab_size * cfg.d_model
    counts = {
        "embedding": emb,
        "lm_head": 0 if cfg.tie_embeddings else emb,
        "in_proj": L * (cfg.d_model * cfg.d_in_proj + (cfg.d_in_proj if cfg.bias else 0)),
        "out_proj": L * (cfg.d_inner * cfg.d_model + (cfg.d_model if cfg.bias else 0)),
        "conv1d": L * (cfg.conv_dim * cfg.d_conv + (cfg.conv_dim if cfg.conv_bias else 0)),
        "A_log/D/dt_bias": L * 3 * cfg.nheads,
        "norms": L * (cfg.d_model + cfg.d_inner) + cfg.d_model,
    }
    return counts


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


def packed_size_bytes(cfg: Mamba2Config, group_size: int = 128, packing: str = "tq1",
                      separate_head: bool = False, targets=("in_proj", "out_proj")) -> dict[str, int]:
    """Bytes of a packed ternary checkpoint by component (tensor data only; the header is small).

    packing: tq2 = 4 codes per byte, tq1 = 5 codes per byte (base 3), both over the flattened matrix;
    one fp16 scale per group; everything else fp16; the embedding stored once when tied, unless
    `separate_head` (the paper's layout: its own fp16 lm_head)."""
    per_byte = {"tq2": 4, "tq1": 5}[packing]
    counts = count_params_by_component(cfg)
    shapes = {"in_proj": (cfg.d_in_proj, cfg.d_model), "out_proj": (cfg.d_model, cfg.d_inner)}
    out = {}
    for name, (rows, cols) in shapes.items():
        if name not in targets:
            continue
        G = cols if group_size == -1 else group_size
        n = rows * cols
        out[f"{name} codes"] = cfg.n_layer * -(-n // per_byte)
        out[f"{name} scales"] = cfg.n_layer * (n // G) * 2
        counts.pop(name)
    if separate_head:
        counts["lm_head"] = counts["embedding"]
    for name, n in counts.items():
        if n:
            out[f"{name} (fp16)"] = n * 2
    return out
