"""Triton kernels of the two RMS norms for CUDA, forward and backward, each beside its PyTorch reference
(`ops.norms.rms_norm_ref`, `ops.norms.gated_norm_ref`), which the tests hold them to under TRITON_INTERPRET=1:

- `rms_norm(x, weight, eps)`: x * rsqrt(mean(x²) + eps) * weight, one program per row.
- `gated_norm(y, z, weight, ngroups, eps)`: v = y * silu(z), then one RMS statistic per group of d / ngroups
  channels, times weight (norm_before_gate=False), one program per (row, group).
Both read any float dtype, compute in fp32 and keep only the per-row (per-group) rstd for the backward, which
recomputes the rest: one read of the inputs per pass instead of PyTorch's chain of fp32 temporaries.  The
weight's gradient is summed over rows from per-row partials."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_fwd(X, W, Y, RSTD, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(X + row * N + cols, mask=m, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    tl.store(Y + row * N + cols, (x * rstd * w).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _rms_bwd(X, W, RSTD, DY, DX, DWP, N, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(X + row * N + cols, mask=m, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * N + cols, mask=m, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    u = x * rstd
    du = dy * w
    dx = rstd * (du - u * (tl.sum(du * u, axis=0) / N))
    tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=m)
    tl.store(DWP + row * N + cols, dy * u, mask=m)


class TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        N = x.shape[-1]
        x2 = x.reshape(-1, N).contiguous()
        y = torch.empty_like(x2)
        rstd = torch.empty(x2.shape[0], device=x.device, dtype=torch.float32)
        BLOCK = triton.next_power_of_2(N)
        _rms_fwd[(x2.shape[0],)](x2, weight.contiguous(), y, rstd, N, eps, BLOCK=BLOCK)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        N = x2.shape[-1]
        dy2 = dy.reshape(-1, N).contiguous()
        dx = torch.empty_like(x2)
        dwp = torch.empty(x2.shape, device=x2.device, dtype=torch.float32)
        _rms_bwd[(x2.shape[0],)](x2, weight.contiguous(), rstd, dy2, dx, dwp, N, BLOCK=triton.next_power_of_2(N))
        return dx.view(ctx.shape), dwp.sum(0).to(weight.dtype), None


@triton.jit
def _gated_fwd(Y, Z, W, OUT, RSTD, N, GS, NG, eps, BLOCK: tl.constexpr):
    row, g = tl.program_id(0), tl.program_id(1)
    cols = g * GS + tl.arange(0, BLOCK)
    m = tl.arange(0, BLOCK) < GS
    y = tl.load(Y + row * N + cols, mask=m, other=0.0).to(tl.float32)
    z = tl.load(Z + row * N + cols, mask=m, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    v = y * (z / (1.0 + tl.exp(-z)))
    rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / GS + eps)
    tl.store(RSTD + row * NG + g, rstd)
    tl.store(OUT + row * N + cols, (v * rstd * w).to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _gated_bwd(Y, Z, W, RSTD, DOUT, DY, DZ, DWP, N, GS, NG, BLOCK: tl.constexpr):
    row, g = tl.program_id(0), tl.program_id(1)
    cols = g * GS + tl.arange(0, BLOCK)
    m = tl.arange(0, BLOCK) < GS
    y = tl.load(Y + row * N + cols, mask=m, other=0.0).to(tl.float32)
    z = tl.load(Z + row * N + cols, mask=m, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    do = tl.load(DOUT + row * N + cols, mask=m, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row * NG + g)
    sig = 1.0 / (1.0 + tl.exp(-z))
    silu = z * sig
    v = y * silu
    u = v * rstd
    du = do * w
    dv = rstd * (du - u * (tl.sum(du * u, axis=0) / GS))
    tl.store(DY + row * N + cols, (dv * silu).to(DY.dtype.element_ty), mask=m)
    tl.store(DZ + row * N + cols, (dv * y * sig * (1.0 + z * (1.0 - sig))).to(DZ.dtype.element_ty), mask=m)
    tl.store(DWP + row * N + cols, do * u, mask=m)


class TritonGatedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, z, weight, ngroups: int, eps: float):
        N = y.shape[-1]
        y2, z2 = y.reshape(-1, N).contiguous(), z.reshape(-1, N).contiguous()
        out = torch.empty(y2.shape, device=y.device, dtype=torch.promote_types(y.dtype, weight.dtype))
        GS = N // ngroups
        rstd = torch.empty(y2.shape[0], ngroups, device=y.device, dtype=torch.float32)
        BLOCK = triton.next_power_of_2(GS)
        _gated_fwd[(y2.shape[0], ngroups)](y2, z2, weight.contiguous(), out, rstd, N, GS, ngroups, eps, BLOCK=BLOCK)
        ctx.save_for_backward(y2, z2, weight, rstd)
        ctx.shape, ctx.ngroups = y.shape, ngroups
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, dout):
        y2, z2, weight, rstd = ctx.saved_tensors
        N, ng = y2.shape[-1], ctx.ngroups
        GS = N // ng
        do2 = dout.reshape(-1, N).contiguous()
        dy, dz = torch.empty_like(y2), torch.empty_like(z2)
        dwp = torch.empty(y2.shape, device=y2.device, dtype=torch.float32)
        _gated_bwd[(y2.shape[0], ng)](y2, z2, weight.contiguous(), rstd, do2, dy, dz, dwp, N, GS, ng,
                                      BLOCK=triton.next_power_of_2(GS))
        return dy.view(ctx.shape), dz.view(ctx.shape), dwp.sum(0).to(weight.dtype), None, None


def rms_norm(x, weight, eps: float):
    return TritonRMSNorm.apply(x, weight, float(eps))


def gated_norm(y, z, weight, ngroups: int, eps: float):
    return TritonGatedNorm.apply(y, z, weight, int(ngroups), float(eps))
