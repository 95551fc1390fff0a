"""Weights that are already ternary, taken as they are: a dense model read back from one of our own exports (a
GGUF file with TQ2_0 / TQ1_0 tensors, a transformers folder, an f16 GGUF) holds projections that are exactly
scale × {-1, 0, +1} per group.  `adopt_ternary_(model)` finds the largest group size for which every target
projection is such a product and makes them ternary modules with those very scales (frozen): the packed export
is then exact, where absmean PTQ would have re-quantized (and damaged) them."""
from __future__ import annotations

import torch
from torch import Tensor

from ..spec import SUGGESTED_GROUP_SIZES
from .config import TernaryConfig
from .qat import default_filter, quantize_, ternary_modules
from .ternary import round_scale


@torch.no_grad()
def ternary_scales(w: Tensor, group_size: int) -> Tensor | None:
    """The per-group scales s if w (out, in) == s · t exactly with t in {-1, 0, +1} and s an fp16 value, else None.
    (All-zero groups get the smallest scale: their codes are 0 whatever it is.)"""
    out_f, in_f = w.shape
    if in_f % group_size:
        return None
    g = w.detach().float().reshape(out_f, in_f // group_size, group_size)
    s = g.abs().amax(-1)
    if not bool(((g == 0) | (g.abs() == s[..., None])).all()):
        return None
    s = round_scale(s)                       # all-zero groups: the smallest scale
    return s if bool((s[..., None] * g.sign() == g).all()) else None


def adopt_ternary_(model, cfg: TernaryConfig | None = None) -> int | None:
    """Make the target projections ternary modules with the scales they already have, when every one of them is
    exactly ternary for one group size (the largest that works: per row, then 1024 .. 32).  Returns that group
    size, or None (nothing changed) when they are not."""
    cfg = cfg or TernaryConfig()
    accept = default_filter(cfg)
    targets = [(n, m) for n, m in model.named_modules() if n and accept(m, n)]
    if not targets or getattr(model, "ternary_config", None) is not None:
        return None
    in_fs = {m.in_features for _, m in targets}
    candidates = [-1] + sorted({1024, 512, *SUGGESTED_GROUP_SIZES}, reverse=True)
    for G in candidates:
        scales = {}
        for name, m in targets:
            s = ternary_scales(m.weight, m.in_features if G == -1 else G)
            if s is None:
                break
            scales[name] = s
        else:
            if G == -1 and len(in_fs) == 1:
                G = in_fs.pop()
            quantize_(model, cfg.replace(group_size=G, scale_mode="frozen", scale_format="fp16"))
            for name, m in ternary_modules(model):
                m.scale.copy_(scales[name])
            return G
    return None
