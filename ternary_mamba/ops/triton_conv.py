"""Triton kernels of the mixer's causal depthwise conv + SiLU for CUDA, forward and backward, beside its PyTorch
reference `ops.conv.conv_silu_ref` (held to it under TRITON_INTERPRET=1 by tests/test_triton_conv.py).

    out[b, t, c] = silu(bias[c] + sum_k w[c, k] * x[b, t + k - (K-1), c])     (positions < 0: the conv state)

The forward reads x in place (a strided view of the in_proj output is fine); the backward recomputes the
pre-activation instead of storing it, writes d(input) for the state and the sequence in one padded buffer, and
leaves the K weight and bias gradients (K small: 4) to reductions over d(pre-activation)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pre(X, P, W, BIAS, b, t, c, L, C, sxb, sxl, mt, mc, K: tl.constexpr, HAS_P: tl.constexpr,
         HAS_B: tl.constexpr):
    """The pre-activation of a (BL, BC) tile: bias + sum_k w[c, k] x[t + k - (K-1), c]."""
    acc = tl.zeros((t.shape[0], c.shape[0]), dtype=tl.float32)
    if HAS_B:
        acc += tl.load(BIAS + c, mask=mc, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        i = t + k - (K - 1)
        wk = tl.load(W + c * K + k, mask=mc, other=0.0).to(tl.float32)
        xv = tl.load(X + b * sxb + i[:, None] * sxl + c[None, :],
                     mask=(i[:, None] >= 0) & mt[:, None] & mc[None, :], other=0.0).to(tl.float32)
        if HAS_P:   # positions before 0 come from the conv state P (b, C, K-1)
            pv = tl.load(P + b * C * (K - 1) + c[None, :] * (K - 1) + (i[:, None] + K - 1),
                         mask=(i[:, None] < 0) & mt[:, None] & mc[None, :], other=0.0).to(tl.float32)
            xv += pv
        acc += xv * wk[None, :]
    return acc


@triton.jit
def _conv_fwd(X, P, W, BIAS, OUT, L, C, sxb, sxl, K: tl.constexpr, HAS_P: tl.constexpr, HAS_B: tl.constexpr,
              BL: tl.constexpr, BC: tl.constexpr):
    b, pt, pc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pt * BL + tl.arange(0, BL)
    c = pc * BC + tl.arange(0, BC)
    mt, mc = t < L, c < C
    pre = _pre(X, P, W, BIAS, b, t, c, L, C, sxb, sxl, mt, mc, K, HAS_P, HAS_B)
    out = pre / (1.0 + tl.exp(-pre))
    tl.store(OUT + b * L * C + t[:, None] * C + c[None, :], out.to(OUT.dtype.element_ty),
             mask=mt[:, None] & mc[None, :])


@triton.jit
def _conv_dpre(X, P, W, BIAS, DOUT, DPRE, L, C, sxb, sxl, K: tl.constexpr, HAS_P: tl.constexpr,
               HAS_B: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr):
    b, pt, pc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pt * BL + tl.arange(0, BL)
    c = pc * BC + tl.arange(0, BC)
    mt, mc = t < L, c < C
    m = mt[:, None] & mc[None, :]
    pre = _pre(X, P, W, BIAS, b, t, c, L, C, sxb, sxl, mt, mc, K, HAS_P, HAS_B)
    sig = 1.0 / (1.0 + tl.exp(-pre))
    do = tl.load(DOUT + b * L * C + t[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(DPRE + b * L * C + t[:, None] * C + c[None, :], do * sig * (1.0 + pre * (1.0 - sig)), mask=m)


@triton.jit
def _conv_dx(DPRE, W, DXP, L, C, K: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr):
    """d(input) at positions i in [-(K-1), L): sum_k w[c, k] dpre[i + (K-1) - k], into DXP[b, i + K-1, c]."""
    b, pt, pc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i = pt * BL + tl.arange(0, BL) - (K - 1)
    c = pc * BC + tl.arange(0, BC)
    mi, mc = i < L, c < C
    acc = tl.zeros((BL, BC), dtype=tl.float32)
    for k in tl.static_range(K):
        t = i + (K - 1) - k
        wk = tl.load(W + c * K + k, mask=mc, other=0.0).to(tl.float32)
        d = tl.load(DPRE + b * L * C + t[:, None] * C + c[None, :],
                    mask=(t[:, None] >= 0) & (t[:, None] < L) & mc[None, :], other=0.0)
        acc += d * wk[None, :]
    tl.store(DXP + b * (L + K - 1) * C + (i[:, None] + K - 1) * C + c[None, :], acc,
             mask=mi[:, None] & mc[None, :])


def _blocks(L, C):
    BL, BC = 16, min(128, triton.next_power_of_2(C))
    return BL, BC


class TritonConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, prev):
        b, L, C = x.shape
        K = weight.shape[-1]
        if x.stride(-1) != 1:
            x = x.contiguous()
        w = weight.reshape(C, K).contiguous()
        out = torch.empty(b, L, C, device=x.device, dtype=torch.float32)
        BL, BC = _blocks(L, C)
        grid = (b, triton.cdiv(L, BL), triton.cdiv(C, BC))
        _conv_fwd[grid](x, prev if prev is not None else x, w, bias if bias is not None else w, out, L, C,
                        x.stride(0), x.stride(1), K=K, HAS_P=prev is not None, HAS_B=bias is not None, BL=BL, BC=BC)
        ctx.save_for_backward(x, w, bias, prev)
        ctx.K = K
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w, bias, prev = ctx.saved_tensors
        b, L, C = x.shape
        K = ctx.K
        dout = dout.contiguous()
        BL, BC = _blocks(L, C)
        dpre = torch.empty(b, L, C, device=x.device, dtype=torch.float32)
        _conv_dpre[(b, triton.cdiv(L, BL), triton.cdiv(C, BC))](
            x, prev if prev is not None else x, w, bias if bias is not None else w, dout, dpre, L, C,
            x.stride(0), x.stride(1), K=K, HAS_P=prev is not None, HAS_B=bias is not None, BL=BL, BC=BC)
        dxp = torch.empty(b, L + K - 1, C, device=x.device, dtype=torch.float32)
        _conv_dx[(b, triton.cdiv(L + K - 1, BL), triton.cdiv(C, BC))](dpre, w, dxp, L, C, K=K, BL=BL, BC=BC)
        hist = prev.transpose(1, 2).float() if prev is not None else x.new_zeros(b, K - 1, C, dtype=torch.float32)
        xp = torch.cat([hist, x.float()], dim=1)                                         # (b, K-1+L, C)
        dw = torch.stack([(dpre * xp[:, k:k + L]).sum((0, 1)) for k in range(K)], -1)    # (C, K)
        dbias = dpre.sum((0, 1)) if bias is not None else None
        dprev = dxp[:, :K - 1].transpose(1, 2) if prev is not None else None
        return dxp[:, K - 1:].to(x.dtype), dw.view(C, 1, K).to(w.dtype), dbias, dprev


def conv_silu(xBC, weight, bias, conv_state):
    """Same signature and result as `ops.conv.conv_silu_ref`."""
    b, L, C = xBC.shape
    K = weight.shape[-1]
    prev = conv_state.contiguous() if conv_state is not None else None
    out = TritonConvSiLU.apply(xBC, weight, bias, prev)
    hist = conv_state.transpose(1, 2) if conv_state is not None else xBC.new_zeros(b, K - 1, C)
    new_state = torch.cat([hist.to(xBC.dtype), xBC], dim=1)[:, -(K - 1):].transpose(1, 2)
    return out, new_state
