"""Triton kernels for CUDA, each beside the PyTorch reference it must agree with:

- `ternary_fake_quant(w, scale, G, learned, fmt)`: the fused fake-quant of `quant.ternary.TernarySTE` — scale
  rounded to fp16 (or bf16) values, codes round(clamp(w / s, -1, 1)), dequantized s·t — in one pass over the
  weight, and its LSQ backward (gradient to w inside the clip range, to the scale through dq/ds, / sqrt(G)).
  `scale=None` computes the absmean scale in the kernel too.  Forward values equal the reference bit for bit
  given the same scale (division correctly rounded, round-half-to-even written out); the backward's sums run
  in another order (equal to ~1e-6).
- `kl_div(t_logits, s_logits, tau)`: mean over rows of KL(softmax(t/τ) ‖ softmax(s/τ)) with its backward to the
  student's logits, streaming the vocabulary in blocks (no (tokens x vocab) temporaries), as `ops.losses` does
  on the CPU in C.

On a machine without CUDA they run on CPU tensors under TRITON_INTERPRET=1 (how the tests check them).
`ops.dispatch` uses them only for CUDA tensors and only when triton imports."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..spec import BF16_MAX, FP16_MAX, SCALE_MIN



@triton.jit
def _round_scale(s, BF16: tl.constexpr, lo, hi):
    s = tl.minimum(tl.maximum(s, lo), hi)
    if BF16:   # round to nearest even at bf16 precision, written on the bits (s is positive and finite)
        b = s.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True)
    return s.to(tl.float16).to(tl.float32)


@triton.jit
def _fq_fwd(W, S, Q, S16, G: tl.constexpr, ABSMEAN: tl.constexpr, BF16: tl.constexpr, lo, hi):
    g = tl.program_id(0)                                   # one group of G weights per program
    offs = g * G + tl.arange(0, G)
    w = tl.load(W + offs).to(tl.float32)
    if ABSMEAN:
        s = tl.sum(tl.abs(w), axis=0) / G
    else:
        s = tl.load(S + g).to(tl.float32)
    s16 = _round_scale(s, BF16, lo, hi)
    v = tl.math.div_rn(w, s16)
    t = tl.where(v > 0.5, 1.0, tl.where(v < -0.5, -1.0, 0.0))   # round(clamp(v, -1, 1)), ties to even
    tl.store(Q + offs, (t * s16).to(Q.dtype.element_ty))   # exact in bf16 too when the scales are bf16 values
    tl.store(S16 + g, s16)


@triton.jit
def _fq_bwd(W, S16, DQ, DW, DS, G: tl.constexpr, inv_sqrt_g):
    g = tl.program_id(0)
    offs = g * G + tl.arange(0, G)
    w = tl.load(W + offs).to(tl.float32)
    dq = tl.load(DQ + offs).to(tl.float32)
    s16 = tl.load(S16 + g)
    v = tl.math.div_rn(w, s16)
    inside = tl.abs(v) <= 1.0
    t = tl.where(v > 0.5, 1.0, tl.where(v < -0.5, -1.0, 0.0))
    sign = tl.where(v > 0, 1.0, tl.where(v < 0, -1.0, 0.0))
    tl.store(DW + offs, tl.where(inside, dq, 0.0))
    tl.store(DS + g, tl.sum(dq * tl.where(inside, t - v, sign), axis=0) * inv_sqrt_g)


def _check_group(G: int) -> None:
    if G & (G - 1):
        raise ValueError(f"the Triton fake-quant needs a power-of-two group size, got {G}")


class TernaryFakeQuant(torch.autograd.Function):
    """Same contract as `quant.ternary.TernarySTE` (its reference): forward(w, scale, G, learned, fmt)."""

    @staticmethod
    def forward(ctx, w, scale, group_size: int, learned: bool, fmt: str = "fp16", out_dtype=torch.float32):
        _check_group(group_size)
        wc = w.contiguous()
        q = torch.empty(w.shape, dtype=out_dtype, device=w.device)
        n_groups = w.numel() // group_size
        s16 = torch.empty(n_groups, dtype=torch.float32, device=w.device)
        sc = scale.contiguous().float() if scale is not None else s16
        bf16 = fmt == "bf16"
        _fq_fwd[(n_groups,)](wc, sc, q, s16, group_size, scale is None, bf16, SCALE_MIN, BF16_MAX if bf16 else FP16_MAX)
        ctx.save_for_backward(wc, s16)
        ctx.group_size, ctx.learned, ctx.scale_shape = group_size, learned, None if scale is None else scale.shape
        return q

    @staticmethod
    def backward(ctx, dq):
        wc, s16 = ctx.saved_tensors
        if not ctx.learned:
            return dq.to(wc.dtype), None, None, None, None, None
        G = ctx.group_size
        dw = torch.empty_like(wc, dtype=torch.float32)
        ds = torch.empty(s16.shape, dtype=torch.float32, device=wc.device)
        _fq_bwd[(s16.numel(),)](wc, s16, dq.contiguous().float(), dw, ds, G, 1.0 / G ** 0.5)
        return dw.to(wc.dtype), ds.view(ctx.scale_shape), None, None, None, None


def ternary_fake_quant(w, scale, group_size: int, learned: bool, fmt: str = "fp16", out_dtype=torch.float32):
    """out_dtype bf16 (under bf16 autocast, with bf16 scales): the weights written in the dtype the GEMM reads, the
    same values (s·t is exact in bf16 then), half the bytes and no cast kernel after."""
    return TernaryFakeQuant.apply(w, scale, group_size, learned, fmt, out_dtype)


@triton.jit
def _kl_fwd(T, S, LSE_T, LSE_S, KL, V, stride_t, stride_s, inv_tau, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    t_row, s_row = T + r * stride_t, S + r * stride_s
    mt, ms = -float("inf"), -float("inf")
    zt, zs = 0.0, 0.0
    for start in range(0, V, BLOCK):                       # online log-sum-exp of both rows
        o = start + tl.arange(0, BLOCK)
        m = o < V
        t = tl.load(t_row + o, mask=m, other=-float("inf")).to(tl.float32) * inv_tau
        s = tl.load(s_row + o, mask=m, other=-float("inf")).to(tl.float32) * inv_tau
        nt, ns = tl.maximum(mt, tl.max(t, axis=0)), tl.maximum(ms, tl.max(s, axis=0))
        zt = zt * tl.exp(mt - nt) + tl.sum(tl.exp(t - nt), axis=0)
        zs = zs * tl.exp(ms - ns) + tl.sum(tl.exp(s - ns), axis=0)
        mt, ms = nt, ns
    lt, ls = mt + tl.log(zt), ms + tl.log(zs)
    acc = 0.0
    for start in range(0, V, BLOCK):
        o = start + tl.arange(0, BLOCK)
        m = o < V
        t = tl.load(t_row + o, mask=m, other=0.0).to(tl.float32) * inv_tau - lt
        s = tl.load(s_row + o, mask=m, other=0.0).to(tl.float32) * inv_tau - ls
        acc += tl.sum(tl.where(m, tl.exp(t) * (t - s), 0.0), axis=0)
    tl.store(LSE_T + r, lt)
    tl.store(LSE_S + r, ls)
    tl.store(KL + r, acc)


@triton.jit
def _kl_bwd(T, S, LSE_T, LSE_S, DS, V, stride_t, stride_s, inv_tau, scale, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    lt, ls = tl.load(LSE_T + r), tl.load(LSE_S + r)
    for start in range(0, V, BLOCK):
        o = start + tl.arange(0, BLOCK)
        m = o < V
        t = tl.load(T + r * stride_t + o, mask=m, other=0.0).to(tl.float32) * inv_tau - lt
        s = tl.load(S + r * stride_s + o, mask=m, other=0.0).to(tl.float32) * inv_tau - ls
        tl.store(DS + r * V + o, ((tl.exp(s) - tl.exp(t)) * inv_tau * scale).to(DS.dtype.element_ty), mask=m)


class FusedKL(torch.autograd.Function):
    """Reference: `ops.losses.kl_div_ref`.  t, s: (N, V) with unit stride along V."""

    @staticmethod
    def forward(ctx, t, s, tau: float):
        N, V = s.shape
        lse_t, lse_s, kl = (torch.empty(N, dtype=torch.float32, device=s.device) for _ in range(3))
        block = min(4096, triton.next_power_of_2(V))
        _kl_fwd[(N,)](t, s, lse_t, lse_s, kl, V, t.stride(0), s.stride(0), 1.0 / tau, block)
        ctx.save_for_backward(t, s, lse_t, lse_s)
        ctx.tau, ctx.block = tau, block
        return kl.mean()

    @staticmethod
    def backward(ctx, g):
        t, s, lse_t, lse_s = ctx.saved_tensors
        N, V = s.shape
        ds = torch.empty(N, V, dtype=s.dtype, device=s.device)      # the logits' own dtype: 16-bit reads, 16-bit grads
        _kl_bwd[(N,)](t, s, lse_t, lse_s, ds, V, t.stride(0), s.stride(0), 1.0 / ctx.tau, float(g) / N, ctx.block)
        return None, ds, None


def kl_div(t_logits, s_logits, tau: float = 1.0):
    t2 = t_logits.reshape(-1, t_logits.size(-1))
    s2 = s_logits.reshape(-1, s_logits.size(-1))
    t2 = t2 if t2.stride(-1) == 1 else t2.contiguous()
    s2 = s2 if s2.stride(-1) == 1 else s2.contiguous()
    return FusedKL.apply(t2.detach(), s2, float(tau))
