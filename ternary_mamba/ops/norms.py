"""RMS norms, one op each: `rms_norm` (the block norm) and `gated_norm` (the mixer's norm(y · silu(z)) with one
statistic per group of channels, norm_before_gate=False) choose the implementation; `rms_norm_ref` and
`gated_norm_ref` are the PyTorch references with the same signatures and results.

CUDA with triton: Triton kernels, forward and backward (ops/triton_norms.py); CPU fp32 with the kernels built: C
forward (+ hand-written backward, csrc/norm_train.c); anything else, or inside `reference_path()`: the reference.  Both compute in fp32 and return the input's dtype (rms_norm) / fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import autograd as fused
from .dispatch import ran, reference_kind, triton_for, triton_norms


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()   # in fp32 whatever the dtype (a no-op for fp32 inputs), cast back at the end
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x², -1) + eps) * weight."""
    if triton_for(x, weight) and x.numel() and triton_norms() is not None:     # CUDA: one fused pass each way
        ran("rms_norm", "triton")
        return triton_norms().rms_norm(x, weight, eps)
    if reference_kind() is None and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) \
            and fused.rms_norm_supported(x, weight):
        ran("rms_norm", "c-train")
        return fused.rms_norm_train(x, weight, eps)
    ran("rms_norm", "torch")
    return rms_norm_ref(x, weight, eps)


def gated_norm_ref(y: Tensor, z: Tensor, weight: Tensor, ngroups: int, eps: float) -> Tensor:
    y = y * F.silu(z)
    yg = y.unflatten(-1, (ngroups, -1))
    yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + eps)
    return yg.flatten(-2) * weight


def gated_norm(y: Tensor, z: Tensor, weight: Tensor, ngroups: int, eps: float) -> Tensor:
    """norm(y * silu(z)) per group of y.size(-1) / ngroups channels, times weight; y, z (b, l, d) or (b, d)."""
    if triton_for(y, z, weight) and y.numel() and triton_norms() is not None:
        ran("gated_norm", "triton")
        return triton_norms().gated_norm(y, z, weight, ngroups, eps)
    if reference_kind() is None and y.dim() == 3 and y.size(1) > 0 and fused.gated_norm_supported(y, z, weight):
        ran("gated_norm", "c")
        return fused.gated_norm_train(y, z, weight, ngroups, eps)     # C forward (+ backward under autograd)
    ran("gated_norm", "torch")
    return gated_norm_ref(y, z, weight, ngroups, eps)
