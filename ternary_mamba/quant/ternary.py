"""Pure functions of grouped ternary quantization.  A weight W (out, in) is cut into groups of G
consecutive weights along `in`; each group g has one scale s_g and W ≈ s_g · t with t ∈ {-1, 0, +1}.

Scales are rounded to fp16 *before* the codes are computed, so the fake-quant weights used in
training are bit-identical to what a packed fp16-scale export dequantizes to."""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops.dispatch import ran, triton_for, triton_kernels
from ..spec import BF16_MAX, FP16_MAX, SCALE_MIN

# fp16: scales are fp16 values (what the packed format stores).  bf16: scales are bf16 values inside fp16's normal
# range, so s·t is exact in fp32, fp16 *and* bf16 and the fp16 file still holds them exactly: a bf16 autocast
# forward then multiplies by exactly the weights a packed export dequantizes to.


def grouped(w: Tensor, group_size: int) -> Tensor:
    """(out, in) -> (out, in // G, G).  A view, never a copy of the caller's data being modified."""
    out_f, in_f = w.shape
    return w.reshape(out_f, in_f // group_size, group_size)


def absmean_scale(w: Tensor, group_size: int) -> Tensor:
    """BitNet b1.58's scale per group: mean |w|.  (out, in) -> (out, in // G)."""
    return grouped(w, group_size).abs().mean(-1)


def round_scale(s: Tensor, fmt: str = "fp16") -> Tensor:
    """The fp16 value a packed file stores, back in fp32 (fmt="bf16": a bf16 value, which fp16 holds exactly)."""
    if fmt == "bf16":
        return s.clamp(SCALE_MIN, BF16_MAX).bfloat16().float()
    return s.clamp(SCALE_MIN, FP16_MAX).half().float()


def ternary_codes(w: Tensor, s16: Tensor, group_size: int) -> Tensor:
    """Codes t = round(clamp(w / s, -1, 1)) as int8, (out, in).  `s16` must already be fp16-rounded."""
    v = grouped(w, group_size) / s16[..., None]
    return v.clamp(-1, 1).round().to(torch.int8).reshape(w.shape)


def dequantize(codes: Tensor, s16: Tensor, group_size: int) -> Tensor:
    """codes (out, in) int8 and scales (out, in // G) -> fp32 weight, exactly as fake-quant computes it."""
    return (grouped(codes.float(), group_size) * s16[..., None]).reshape(codes.shape)


class TernarySTE(torch.autograd.Function):
    """q = s16 · round(clamp(w / s16, -1, 1)) with straight-through gradients.

    learned=False: pure STE for w (BitNet), no gradient to the scale (it is recomputed, not trained).
    learned=True:  LSQ — w gets the gradient inside the clipping range; the scale gets
                   sum_g dq/ds · grad with dq/ds = round(v) - v inside, sign(v) outside, times 1/sqrt(G)."""

    @staticmethod
    def forward(ctx, w: Tensor, scale: Tensor, group_size: int, learned: bool, fmt: str = "fp16") -> Tensor:
        s16 = round_scale(scale, fmt)
        codes = ternary_codes(w, s16, group_size)
        if learned:
            ctx.save_for_backward(w, s16, codes)
        ctx.group_size, ctx.learned = group_size, learned
        return dequantize(codes, s16, group_size)

    @staticmethod
    def backward(ctx, grad_q: Tensor):
        if not ctx.learned:
            return grad_q, None, None, None, None
        w, s16, codes = ctx.saved_tensors
        G = ctx.group_size
        v = grouped(w, G) / s16[..., None]
        inside = v.abs() <= 1
        g = grouped(grad_q, G)
        grad_w = (g * inside).reshape(w.shape)
        dq_ds = torch.where(inside, grouped(codes.float(), G) - v, v.sign())
        grad_s = (g * dq_ds).sum(-1) / G ** 0.5
        return grad_w, grad_s, None, None, None


def fake_quant_ref(w: Tensor, scale: Tensor, group_size: int, learned: bool, fmt: str = "fp16") -> Tensor:
    """s16 · ternary(w) with the straight-through gradients of `TernarySTE` (the reference)."""
    return TernarySTE.apply(w, scale, group_size, learned, fmt)


def fake_quant(w: Tensor, scale: Tensor, group_size: int, learned: bool, fmt: str = "fp16") -> Tensor:
    """The fake-quantized weight, one op: on CUDA with triton, one fused Triton pass (ops/triton_kernels.py; groups
    of a power of two); anything else, or inside `reference_path()`: `fake_quant_ref`."""
    if triton_for(w) and group_size & (group_size - 1) == 0:
        ran("fake_quant", "triton")
        dev = w.device.type
        bf16_gemm = fmt == "bf16" and torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16
        return triton_kernels().ternary_fake_quant(w, scale, group_size, learned, fmt,
                                                   torch.bfloat16 if bf16_gemm else torch.float32)
    ran("fake_quant", "torch")
    return fake_quant_ref(w, scale, group_size, learned, fmt)


OPT_GRID = torch.exp(torch.linspace(-2.0, 1.5, 71))   # scale / absmean from 0.14 to 4.5, 5 % steps


@torch.no_grad()
def mse_optimal_zeros(w: Tensor, group_size: int, chunk: int = 1 << 16) -> tuple[Tensor, Tensor]:
    """Per group, the scale s = r · absmean (r on OPT_GRID) minimising ‖w − s·round(clamp(w/s, −1, 1))‖² —
    the reconstruction-optimal member of *this* quantizer family — and the zero fraction it gives.
    (out, in) -> (ratio r* (out, in // G), zero fraction (out, in // G)).  About 46 % of a Gaussian group's
    weights and 63 % of a Laplace group's are zero at the optimum: a zero ratio is a pathology only above it.

    One sort per group instead of one pass per candidate: with the magnitudes a sorted, a weight is zeroed iff
    a <= s/2, so err(s) = Σa² − 2s·Σ_{a>s/2} a + s²·#{a>s/2}, read off prefix sums at k = #{a <= s/2}
    (`mse_optimal_zeros_ref` is the direct search it equals)."""
    g = grouped(w.float(), group_size).reshape(-1, group_size)
    G = group_size
    best_r = g.new_empty(g.shape[0])
    best_z = g.new_empty(g.shape[0])
    grid = OPT_GRID.to(g.device)
    for i in range(0, g.shape[0], chunk):
        a = g[i:i + chunk].abs().sort(-1).values.double()                   # (n, G) ascending magnitudes
        p1 = torch.nn.functional.pad(a.cumsum(-1), (1, 0))                  # p1[:, k] = sum of the k smallest
        s1, s2 = p1[:, -1:], a.pow(2).sum(-1, keepdim=True)
        am = (s1 / G).clamp_min(1e-12)                                      # absmean
        s = am * grid.double()                                              # (n, K) candidate scales
        k = torch.searchsorted(a.contiguous(), (s / 2).contiguous(), right=True)   # zeros: a <= s/2
        err = s2 - 2 * s * (s1 - p1.gather(1, k)) + s * s * (G - k)
        at = err.argmin(-1, keepdim=True)                                   # the first minimum, as the search
        best_r[i:i + chunk] = grid[at.squeeze(-1)].float()
        best_z[i:i + chunk] = (k.gather(1, at).squeeze(-1).double() / G).float()
    shape = w.shape[0], w.shape[1] // group_size
    return best_r.view(shape), best_z.view(shape)


@torch.no_grad()
def mse_optimal_zeros_ref(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """The direct search `mse_optimal_zeros` must equal: quantize each group at every candidate scale."""
    x = grouped(w.float(), group_size).reshape(-1, group_size)
    a = x.abs().mean(-1, keepdim=True).clamp_min(1e-12)
    best = x.new_full((x.shape[0],), float("inf"))
    r_at, z_at = x.new_ones(x.shape[0]), x.new_zeros(x.shape[0])
    for r in OPT_GRID.tolist():
        q = (x / (a * r)).clamp(-1, 1).round()
        err = (x - a * r * q).pow(2).sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        r_at = torch.where(better, r, r_at)
        z_at = torch.where(better, (q == 0).float().mean(-1), z_at)
    shape = w.shape[0], w.shape[1] // group_size
    return r_at.view(shape), z_at.view(shape)
