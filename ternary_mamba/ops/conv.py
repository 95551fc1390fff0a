"""The mixer's causal depthwise conv + SiLU, one op: `conv_silu` chooses the implementation, `conv_silu_ref` is
the PyTorch reference with the same signature and result.

    conv_silu(xBC, weight, bias, conv_state) -> silu(conv) (b, l, conv_dim), new conv state (b, conv_dim, K-1)

xBC (b, l, conv_dim) (a view is fine), weight (conv_dim, 1, K), bias (conv_dim) or None, conv_state: the K-1
inputs before position 0 (b, conv_dim, K-1), or None for zeros.  CUDA with triton: Triton kernels, forward and
backward (ops/triton_conv.py); CPU fp32: C (forward + hand-written backward when gradients are needed,
csrc/ssd_prefill.c + csrc/conv_train.c); anything else, or inside `reference_path()`: the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import autograd as fused
from .dispatch import kernels_for, ran, reference_kind, triton_conv, triton_for
from .kernels import conv_silu_prefill
from .scan import needs_grad


def conv_silu_ref(xBC: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor | None = None
                  ) -> tuple[Tensor, Tensor]:
    """K shifted multiply-adds in the (b, l, channels) layout (no transposes, a cheap backward), then SiLU."""
    b, l, cd = xBC.shape
    K = weight.size(-1)
    hist = conv_state.transpose(1, 2) if conv_state is not None else xBC.new_zeros(b, K - 1, cd)
    xp = torch.cat([hist.to(xBC.dtype), xBC], dim=1)                    # (b, K-1+l, conv_dim)
    w = weight[:, 0, :].float()                                          # (conv_dim, K)
    out = xp[:, K - 1:] * w[:, K - 1]
    for k in range(K - 1):
        out = out + xp[:, k:k + l] * w[:, k]
    if bias is not None:
        out = out + bias.float()
    return F.silu(out), xp[:, xp.size(1) - (K - 1):].transpose(1, 2)


def conv_silu(xBC: Tensor, weight: Tensor, bias: Tensor | None, conv_state: Tensor | None = None
              ) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv + SiLU by the fastest implementation these tensors may take."""
    if triton_for(xBC, weight, bias, conv_state) and xBC.numel() and triton_conv() is not None:
        ran("conv_silu", "triton")
        return triton_conv().conv_silu(xBC, weight, bias, conv_state)
    if reference_kind() is None and kernels_for(xBC, weight, bias, conv_state):
        if needs_grad(xBC, weight, bias, conv_state):
            if fused.conv_supported(xBC, weight):
                ran("conv_silu", "c-train")
                return fused.conv_silu_train(xBC, weight, bias, conv_state)
        else:
            out = conv_silu_prefill(xBC, weight, bias, conv_state)
            if out is not None:
                ran("conv_silu", "c-prefill")
                return out
    ran("conv_silu", "torch")
    return conv_silu_ref(xBC, weight, bias, conv_state)
