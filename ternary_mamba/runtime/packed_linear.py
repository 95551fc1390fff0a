"""`PackedTernaryLinear`: a ternary projection that keeps its weights packed (2-bit codes + per-group scales).

Decoding (<= GEMV_MAX_ROWS tokens per call) multiplies straight from the codes (csrc/tq2_gemv.c); longer inputs
(prefill) dequantize one matrix at a time into a scratch buffer and use the fp32 GEMM.  Opt-in, not exact:
int8 activations (`use_a8_activations`: the a8 GEMV, and for prefill the int8 GEMM of csrc/tq2_gemm_a8.c) and
bf16 activations (`use_bf16_activations`, the paper's A16: csrc/tq2_bf16.c, and for prefill bf16(scale * t) with
torch's bf16 GEMM).  Inside `ops.dispatch.reference_path()`, or for tensors the kernels do not take (not fp32 on
the CPU), the pure-PyTorch unpack + F.linear runs instead: the reference the tests compare against."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.dispatch import cpu_has_bf16_kernels, kernels_for
from ..spec import GEMV_MAX_ROWS, group_paths
from ..ops.kernels import tq2_dequant, tq2_dequant_bf16, tq2_gemm_a8, tq2_gemv, tq2_gemv_a8, tq2_gemv_bf16
from ..quant.packing import unpack
from ..quant.ternary import dequantize

_SCRATCH: dict[str, Tensor | None] = {"w": None, "wb": None}   # dequantization buffers for prefill (no autograd)


class PackedTernaryLinear(nn.Module):
    def __init__(self, codes2: Tensor, scales16: Tensor, in_features: int, group_size: int, bias: Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, codes2.size(0), group_size
        self.register_buffer("codes", codes2, persistent=False)          # (out, in/4) uint8, tq2 layout
        self.register_buffer("scales", scales16.float(), persistent=False)  # (out, in/G)
        self.register_buffer("bias", bias.float() if bias is not None else None, persistent=False)
        self.paths = group_paths(group_size)
        self.a8 = False  # opt-in: int8 activations in the decode GEMV (see use_a8_activations); not exact
        self.bf16 = False  # opt-in: bf16 activations, decode and prefill (see use_bf16_activations); not exact

    def dequantized_weight(self, scratch: bool = False) -> Tensor:
        """The fp32 weight.  scratch=True (no autograd only) writes it into a buffer shared by all packed
        modules: no fresh allocation (page faults, zeroing) per call, which costs more than the dequantization."""
        if kernels_for(self.scales) and self.codes.device.type == "cpu":
            out = None
            if scratch:
                n = self.out_features * self.in_features
                if _SCRATCH.get("w") is None or _SCRATCH["w"].numel() < n:
                    _SCRATCH["w"] = torch.empty(n)
                out = _SCRATCH["w"][:n].view(self.out_features, self.in_features)
            return tq2_dequant(self.codes, self.scales, self.group_size, out)
        codes = unpack(self.codes.reshape(-1), "tq2", (self.out_features, self.in_features))
        return dequantize(codes, self.scales, self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        on_cpu = self.codes.device.type == "cpu" and kernels_for(x2, self.scales, dtype=None)
        if x2.size(0) <= GEMV_MAX_ROWS and self.paths.gemv and on_cpu:
            gemv = tq2_gemv_a8 if self.a8 and self.paths.gemv_a8 else tq2_gemv
            if self.bf16 and self.paths.gemv_bf16:
                gemv = tq2_gemv_bf16
            y = gemv(self.codes, self.scales, x2.float(), self.group_size)
            if self.bias is not None:
                y = y + self.bias
            return y.reshape(*lead, self.out_features)
        scratch = not torch.is_grad_enabled()   # the shared buffer is overwritten by the next call
        if self.a8 and self.paths.gemv_a8 and scratch and on_cpu:   # prefill with int8 activations (int8 GEMM)
            y = tq2_gemm_a8(self.codes, self.scales, x2.float(), self.group_size)
            if y is not None:
                y = y + self.bias if self.bias is not None else y
                return y.reshape(*lead, self.out_features).to(x.dtype)
        if self.bf16 and scratch and on_cpu:     # prefill in bf16: bf16(scale * t) and the bf16 GEMM (oneDNN)
            y = F.linear(x.to(torch.bfloat16), self._bf16_weight()).float()
            return y + self.bias if self.bias is not None else y
        return F.linear(x, self.dequantized_weight(scratch), self.bias)

    def _bf16_weight(self) -> Tensor:
        n = self.out_features * self.in_features
        if _SCRATCH.get("wb") is None or _SCRATCH["wb"].numel() < n:
            _SCRATCH["wb"] = torch.empty(n, dtype=torch.bfloat16)
        out = _SCRATCH["wb"][:n].view(self.out_features, self.in_features)
        return tq2_dequant_bf16(self.codes, self.scales, self.group_size, out)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, group_size={self.group_size}, packed=tq2"


def use_a8_activations(model, enabled: bool = True) -> int:
    """Opt-in fast decode and prefill: packed projections quantize their input to int8 (one absmax scale per token)
    and use integer dot products, as llama.cpp's TQ2_0 does (prefill: the int8 GEMM of csrc/tq2_gemm_a8.c where the
    CPU has AVX512-VNNI or AVX2, else the exact dequantize + GEMM).  No longer bit-exact to the fake-quant student (≈ 1 %
    relative error per projection).  Needs groups that are a multiple of 128.  Returns how many modules use it."""
    n = 0
    for m in model.modules():
        if isinstance(m, PackedTernaryLinear) and m.paths.gemv_a8:
            m.a8 = enabled
            m.bf16 = False if enabled else m.bf16
            n += 1
    return n


def use_bf16_activations(model, enabled: bool = True) -> int:
    """Opt-in, the paper's A16: packed projections round their input to bf16 and multiply with AVX512-BF16 dot
    products (decode: csrc/tq2_bf16.c; prefill: bf16(scale * t) and torch's bf16 GEMM, whose output is bf16).
    Not exact (relative error ~0.3 % per projection, measured by `ternary-mamba ppl PACKED --activations`).  Only where the
    CPU has AVX512-BF16 (else nothing changes and 0 is returned: the exact path is faster than bf16 emulation);
    needs groups of a multiple of 64.  Turns int8 activations off.  Returns how many modules use it."""
    if enabled and not cpu_has_bf16_kernels():
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, PackedTernaryLinear) and m.paths.gemv_bf16:
            m.bf16 = enabled
            m.a8 = False if enabled else m.a8
            n += 1
    return n


def a8_reference(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Pure-PyTorch reference of tq2_gemv_a8 (same int8 rounding, exact integer group sums)."""
    out_f, in_f = codes.size(0), codes.size(1) * 4
    t = unpack(codes.reshape(-1), "tq2", (out_f, in_f)).to(torch.int64)            # {-1, 0, 1}
    m = x.abs().amax(-1, keepdim=True)
    q = torch.round(x * torch.where(m > 0, 127.0 / m, torch.zeros_like(m))).to(torch.int64)   # (nb, in)
    G = group_size
    isum = torch.einsum("ogi,bgi->bog", t.view(out_f, in_f // G, G), q.view(-1, in_f // G, G))  # exact ints
    return (isum.double() * scales.double()).sum(-1).mul(m.double() / 127.0).float()
