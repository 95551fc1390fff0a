"""The packed ternary projection, one op: `ternary_linear` chooses the implementation, `ternary_linear_ref` is the
PyTorch reference with the same signature (unpack the 2-bit codes, scale per group, F.linear).

    ternary_linear(x, codes, scales, group_size, bias, activations) -> x W^T + bias

codes (out, in / 4) uint8 in the tq2 layout (ops/packing.py), scales (out, in / G) fp32.  `activations`:
  "exact"  fp32 activations, equal to the fake-quant student up to summation order (the default);
  "a8"     int8 activations per token (opt-in, like llama.cpp's TQ2_0; `ternary_linear_a8_ref` is its reference);
  "bf16"   bf16 activations (opt-in, the paper's A16; AVX512-BF16 CPUs).
CPU fp32 with the kernels built: up to GEMV_MAX_ROWS rows multiply straight from the codes (csrc/tq2_gemv.c,
tq2_bf16.c); more rows (prefill) use the int8 GEMM (a8, csrc/tq2_gemm_a8.c), bf16(scale · t) with torch's bf16
GEMM (bf16), or the weights dequantized into a shared scratch buffer and the fp32 GEMM.  Anything else, or inside
`reference_path()`: the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..spec import GEMV_MAX_ROWS, group_paths
from .dispatch import kernels_for
from .kernels import tq2_dequant, tq2_dequant_bf16, tq2_gemm_a8, tq2_gemv, tq2_gemv_a8, tq2_gemv_bf16
from .packing import unpack

ACTIVATIONS = ("exact", "a8", "bf16")
_SCRATCH: dict[str, Tensor | None] = {"w": None, "wb": None}   # dequantization buffers for prefill (no autograd)


def _unpacked(codes: Tensor, in_features: int) -> Tensor:
    return unpack(codes.reshape(-1), "tq2", (codes.size(0), in_features))


def dequantize_ref(codes: Tensor, scales: Tensor, group_size: int) -> Tensor:
    """The fp32 weight (out, in): code × its group's scale."""
    t = _unpacked(codes, codes.size(1) * 4).float()
    out_f, in_f = t.shape
    return (t.view(out_f, in_f // group_size, group_size) * scales.float()[..., None]).view(out_f, in_f)


def dequantize(codes: Tensor, scales: Tensor, group_size: int, scratch: bool = False) -> Tensor:
    """The fp32 weight; scratch=True (no autograd only) writes it into a buffer shared by every caller: no fresh
    allocation (page faults, zeroing) per call, which costs more than the dequantization."""
    if not (kernels_for(scales) and codes.device.type == "cpu"):
        return dequantize_ref(codes, scales, group_size)
    out = None
    if scratch:
        out_f, in_f = codes.size(0), codes.size(1) * 4
        if _SCRATCH.get("w") is None or _SCRATCH["w"].numel() < out_f * in_f:
            _SCRATCH["w"] = torch.empty(out_f * in_f)
        out = _SCRATCH["w"][:out_f * in_f].view(out_f, in_f)
    return tq2_dequant(codes, scales, group_size, out)


def _bf16_weight(codes: Tensor, scales: Tensor, group_size: int) -> Tensor:
    n = codes.size(0) * codes.size(1) * 4
    if _SCRATCH.get("wb") is None or _SCRATCH["wb"].numel() < n:
        _SCRATCH["wb"] = torch.empty(n, dtype=torch.bfloat16)
    out = _SCRATCH["wb"][:n].view(codes.size(0), codes.size(1) * 4)
    return tq2_dequant_bf16(codes, scales, group_size, out)


def ternary_linear_ref(x: Tensor, codes: Tensor, scales: Tensor, group_size: int, bias: Tensor | None = None,
                       activations: str = "exact") -> Tensor:
    """The reference of the exact product (`activations` is accepted for the same signature; the a8 path's own
    reference is `ternary_linear_a8_ref`)."""
    return F.linear(x, dequantize_ref(codes, scales, group_size).to(x.dtype), bias)


def ternary_linear(x: Tensor, codes: Tensor, scales: Tensor, group_size: int, bias: Tensor | None = None,
                   activations: str = "exact") -> Tensor:
    """x (..., in) -> (..., out) by the fastest implementation these tensors and `activations` may take."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations {activations!r}: one of {ACTIVATIONS}")
    out_f, in_f = codes.size(0), codes.size(1) * 4
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_f)
    paths = group_paths(group_size)
    on_cpu = codes.device.type == "cpu" and kernels_for(x2, scales, dtype=None)
    if x2.size(0) <= GEMV_MAX_ROWS and paths.gemv and on_cpu:
        gemv = tq2_gemv_a8 if activations == "a8" and paths.gemv_a8 else tq2_gemv
        if activations == "bf16" and paths.gemv_bf16:
            gemv = tq2_gemv_bf16
        y = gemv(codes, scales, x2.float(), group_size)
        if bias is not None:
            y = y + bias
        return y.reshape(*lead, out_f)
    scratch = not torch.is_grad_enabled()   # the shared buffer is overwritten by the next call
    if activations == "a8" and paths.gemv_a8 and scratch and on_cpu:   # prefill with int8 activations
        y = tq2_gemm_a8(codes, scales, x2.float(), group_size)
        if y is not None:
            y = y + bias if bias is not None else y
            return y.reshape(*lead, out_f).to(x.dtype)
    if activations == "bf16" and scratch and on_cpu:     # prefill in bf16: bf16(scale * t) and the bf16 GEMM
        y = F.linear(x.to(torch.bfloat16), _bf16_weight(codes, scales, group_size)).float()
        return y + bias if bias is not None else y
    if not on_cpu:
        return ternary_linear_ref(x, codes, scales, group_size, bias)
    return F.linear(x, dequantize(codes, scales, group_size, scratch), bias)


def ternary_linear_a8_ref(codes: Tensor, scales: Tensor, x: Tensor, group_size: int) -> Tensor:
    """Pure-PyTorch reference of the int8-activation product (same int8 rounding, exact integer group sums)."""
    out_f, in_f = codes.size(0), codes.size(1) * 4
    t = _unpacked(codes, in_f).to(torch.int64)                                        # {-1, 0, 1}
    m = x.abs().amax(-1, keepdim=True)
    q = torch.round(x * torch.where(m > 0, 127.0 / m, torch.zeros_like(m))).to(torch.int64)   # (nb, in)
    G = group_size
    isum = torch.einsum("ogi,bgi->bog", t.view(out_f, in_f // G, G), q.view(-1, in_f // G, G))  # exact ints
    return (isum.double() * scales.double()).sum(-1).mul(m.double() / 127.0).float()
