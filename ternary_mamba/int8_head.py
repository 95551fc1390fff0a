"""An 8-bit output head for inference: the tied fp32 head is the largest single read per decoded token
(50288 x 768 x 4 B = 154 MB at 130m).  Per-row absmax int8 + fp32 scale reads 4x less.  The embedding
lookup is untouched (it reads one row per token)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class Int8Head(nn.Module):
    def __init__(self, weight: Tensor):
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(1).clamp_min(1e-12) / 127
        self.register_buffer("w8", torch.round(w / scale[:, None]).to(torch.int8), persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.in_features, self.out_features = w.size(1), w.size(0)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        from .kernels import get_kernel, i8_gemv
        if x2.size(0) <= 16 and get_kernel() is not None:
            y = i8_gemv(self.w8, self.scale, x2.float())
        else:
            y = F.linear(x2, self.w8.float()) * self.scale
        return y.reshape(*lead, self.out_features)


def use_int8_head(model) -> None:
    """Swap the model's lm_head for an Int8Head (inference only; the embedding keeps its weights)."""
    model.lm_head = Int8Head(model.lm_head.weight)
