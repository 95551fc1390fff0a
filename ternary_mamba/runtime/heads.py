"""Smaller output heads for inference.  The tied head is the largest single read per decoded token
(50288 x 768 x 4 B = 154 MB in fp32 at 130m):
  - Fp16Head: the weights in fp16, converted exactly to fp32 inside the kernel — bit-for-bit the same
    products as the fp32 head when the weights are fp16 values already (a packed model's embedding is stored
    in fp16), half the bytes;
  - Int8Head: per-row absmax int8 + fp32 scale, a quarter of the bytes (changes logits slightly);
  - a 4-bit head (`use_q4_head`): the q4 table format of a quantized embedding (blocks of 32, one scale each),
    ~1/7 of the fp32 bytes, multiplied straight from its codes (csrc/tables.c q4_gemv).
The embedding lookup is untouched (it reads one row per token)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.dispatch import kernels_for
from ..spec import GEMV_MAX_ROWS
from ..ops.kernels import f16_gemv, i8_gemv


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
        if x2.size(0) <= GEMV_MAX_ROWS and kernels_for(x2, self.scale, dtype=None):
            y = i8_gemv(self.w8, self.scale, x2.float())
        else:
            y = F.linear(x2, self.w8.float()) * self.scale
        return y.reshape(*lead, self.out_features)


class Fp16Head(nn.Module):
    def __init__(self, weight: Tensor):
        super().__init__()
        self.register_buffer("w16", weight.detach().to(torch.float16).contiguous(), persistent=False)
        self.in_features, self.out_features = weight.size(1), weight.size(0)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.size(0) <= GEMV_MAX_ROWS and kernels_for(x2, self.w16, dtype=None):
            y = f16_gemv(self.w16, x2)
        else:
            y = F.linear(x2.float(), self.w16.float())
        return y.reshape(*lead, self.out_features)


def head_weight(model) -> Tensor:
    head = model.lm_head
    if isinstance(head, nn.Linear):
        return head.weight
    if model.config.tie_embeddings and hasattr(model.backbone.embedding, "weight"):
        return model.backbone.embedding.weight
    if isinstance(head, Fp16Head):
        return head.w16.float()
    raise ValueError("the head is already quantized (8 or 4 bits); start from the full-precision model")


def use_int8_head(model) -> None:
    """Swap the model's lm_head for an Int8Head (inference only; the embedding keeps its weights)."""
    model.lm_head = Int8Head(head_weight(model))


def use_fp16_head(model) -> None:
    """Swap the model's lm_head for an Fp16Head (inference only; exact when the weights are fp16 values)."""
    model.lm_head = Fp16Head(head_weight(model))


def use_q4_head(model) -> None:
    """Swap the model's lm_head for a 4-bit head (the q4 table format, `quant.tables`; inference only, the
    embedding keeps its weights).  Changes logits more than the int8 head: its cost is measured, not assumed
    (`bench decode` prints KL and top-1 agreement to the exact path)."""
    from ..quant.tables import quantize_table
    from .tables import QuantizedEmbedding, QuantizedHead
    codes, scale = quantize_table(head_weight(model).detach().float(), "q4")
    model.lm_head = QuantizedHead(QuantizedEmbedding(codes, scale, "q4"), tied=False)


def q4_head_a8_ref(codes: Tensor, scale: Tensor, x: Tensor) -> Tensor:
    """The reference of the 4-bit head with int8 activations (csrc/decode_a8.c q4_gemv_a8): x (nb, in) rounded
    per 128 values to int8 (absmax / 127, ties to even), times the dequantized table, in float64."""
    from ..quant.tables import dequantize_table
    xc = x.double().reshape(x.size(0), -1, 128)
    s = xc.abs().amax(-1, keepdim=True) / 127
    q = torch.where(s > 0, torch.round(xc / torch.where(s > 0, s, 1)), 0)
    return ((q * s).reshape_as(x) @ dequantize_table(codes, scale, "q4").double().T).float()
