"""`PackedTernaryLinear`: a ternary projection that keeps its weights packed (2-bit codes + per-group scales).  Its
forward is the op `ops.ternary_linear.ternary_linear` (which implementation runs is decided there, beside its
reference).  Opt-in, not exact: int8 activations (`use_a8_activations`) and bf16 activations
(`use_bf16_activations`, the paper's A16)."""
from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from ..ops.dispatch import cpu_has_bf16_kernels
from ..ops.ternary_linear import dequantize, ternary_linear
from ..spec import group_paths


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
        """The fp32 weight (scratch=True: into the buffer shared by all packed modules; no autograd only)."""
        return dequantize(self.codes, self.scales, self.group_size, scratch)

    @property
    def activations(self) -> str:
        return "a8" if self.a8 and self.paths.gemv_a8 else "bf16" if self.bf16 else "exact"

    def forward(self, x: Tensor) -> Tensor:
        return ternary_linear(x, self.codes, self.scales, self.group_size, self.bias, self.activations)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, group_size={self.group_size}, packed=tq2"


def use_a8_activations(model, enabled: bool = True) -> int:
    """Opt-in fast decode and prefill: packed projections quantize their input to int8 (one absmax scale per token)
    and use integer dot products, as llama.cpp's TQ2_0 does (prefill: the int8 GEMM of csrc/tq2_gemm_a8.c where the
    CPU has AVX512-VNNI or AVX2, else the exact dequantize + GEMM).  No longer bit-exact to the fake-quant student (≈ 1 %
    relative error per projection).  Needs groups that are a multiple of 128.  A 4-bit head (a q4 table, tied or
    `use_q4_head`) also takes int8 activations (per 128 values) where the CPU has AVX512-VNNI.  Returns how many
    ternary modules use it."""
    from .tables import QuantizedHead
    n = 0
    for m in model.modules():
        if isinstance(m, PackedTernaryLinear) and m.paths.gemv_a8:
            m.a8 = enabled
            m.bf16 = False if enabled else m.bf16
            n += 1
        elif isinstance(m, QuantizedHead) and m.fmt == "q4":
            m.a8 = enabled
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


