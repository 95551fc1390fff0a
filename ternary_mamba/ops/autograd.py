"""The training path's fused kernels: forward and backward in C, each as one autograd.Function.

- `ssd_train`: the chunked SSD scan plus the D skip.  Reference: `ops.scan.ssd_scan_ref`.  The PyTorch version spends most of a training step building (chunks x heads x k x k) and
  (chunks x p x n) temporaries and their gradients; the C kernels (csrc/ssd_prefill.c forward, csrc/ssd_train.c
  backward) work per (batch, head) on small in-cache GEMMs and keep only the state entering every chunk.
- `conv_silu_train`: the causal depthwise conv + SiLU (csrc/ssd_prefill.c forward, csrc/conv_train.c backward).
  Reference: `ops.conv.conv_silu_ref`.
- `gated_norm_train`: the mixer's gated RMSNorm (csrc/norm_train.c).  Reference: `ops.norms.gated_norm_ref`.
- `rms_norm_train`: the block RMSNorm (csrc/norm_train.c).  Reference: `ops.norms.rms_norm_ref`.

Tests compare values and every gradient with the references (tests/test_fused_train.py).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .build import check_rc, get_kernel
from ..spec import SCAN_KERNEL_MULTIPLE
from .dispatch import kernels_for
from .kernels import conv_silu_prefill, rows_view


class _SSDTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xbc: Tensor, dt: Tensor, A: Tensor, D: Tensor, init: Tensor | None, dims: tuple):
        nh, p, ng, n, k = dims
        b, l, cd = xbc.shape
        nc = (l + k - 1) // k
        lib = get_kernel()
        y = xbc.new_empty(b, l, nh, p)
        final = xbc.new_empty(b, nh, p, n)
        states = xbc.new_empty(b, nh, nc, p, n)
        base, f32 = xbc.data_ptr(), 4
        rc = lib.ssd_prefill(base, dt.data_ptr(), A.data_ptr(), base + nh * p * f32, base + (nh * p + ng * n) * f32,
                             init.data_ptr() if init is not None else None, y.data_ptr(), final.data_ptr(),
                             b, l, nh, p, ng, n, k, cd, cd, states.data_ptr(), D.data_ptr())
        check_rc(rc, "ssd_train forward")
        ctx.save_for_backward(xbc, dt, A, D, states)
        ctx.dims = dims
        return y, final

    @staticmethod
    @once_differentiable   # the C backward is not itself differentiable: double backward raises
    def backward(ctx, dy: Tensor | None, dfinal: Tensor | None):
        xbc, dt, A, D, states = ctx.saved_tensors
        nh, p, ng, n, k = ctx.dims
        b, l, cd = xbc.shape
        dy = dy.contiguous() if dy is not None else xbc.new_zeros(b, l, nh, p)
        dfinal = dfinal.contiguous() if dfinal is not None else None
        dxbc, ddt = xbc.new_empty(b, l, cd), dt.new_empty(b, l, nh)
        dA, dD = A.new_empty(nh), D.new_empty(nh)
        dinit = xbc.new_empty(b, nh, p, n) if ctx.needs_input_grad[4] else None
        rc = get_kernel().ssd_backward(
            xbc.data_ptr(), cd, dt.data_ptr(), A.data_ptr(), D.data_ptr(), states.data_ptr(), dy.data_ptr(),
            dfinal.data_ptr() if dfinal is not None else None, dxbc.data_ptr(), ddt.data_ptr(), dA.data_ptr(),
            dD.data_ptr(), dinit.data_ptr() if dinit is not None else None, b, l, nh, p, ng, n, k)
        check_rc(rc, "ssd_train backward")
        return dxbc, ddt, dA, dD, dinit, None


def ssd_supported(xbc: Tensor, headdim: int, d_state: int, chunk_size: int) -> bool:
    """Whether the fused kernels can run: fp32 on CPU, headdim / d_state / chunk_size multiples of 16."""
    return (all(v % SCAN_KERNEL_MULTIPLE == 0 for v in (headdim, d_state, chunk_size)) and xbc.size(1) > 0
            and kernels_for(xbc))


def ssd_train(xbc: Tensor, dt: Tensor, A: Tensor, D: Tensor, nheads: int, headdim: int, ngroups: int,
              d_state: int, chunk_size: int, initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """xbc (b, l, nheads*headdim + 2*ngroups*d_state) after the conv and SiLU (x, B, C side by side), dt (b, l, h)
    after softplus, A (h), D (h), initial state (b, h, p, n) or None -> y + D x (b, l, h, p), final state.
    Differentiable in all tensor inputs.  Check `supported` first."""
    f32 = torch.float32
    xbc, dt = xbc.contiguous(), dt.contiguous().to(f32)
    A, D = A.contiguous().to(f32), D.contiguous().to(f32)
    init = initial_state.contiguous().to(f32) if initial_state is not None else None
    return _SSDTrain.apply(xbc, dt, A, D, init, (nheads, headdim, ngroups, d_state, chunk_size))


class _ConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xbc: Tensor, weight: Tensor, bias: Tensor | None, prev: Tensor | None):
        out, new_state = conv_silu_prefill(xbc, weight, bias, prev)
        ctx.save_for_backward(xbc, weight, bias, prev)
        return out, new_state

    @staticmethod
    @once_differentiable   # the C backward is not itself differentiable: double backward raises
    def backward(ctx, dout: Tensor | None, dnew: Tensor | None):
        xbc, weight, bias, prev = ctx.saved_tensors
        b, l, cd = xbc.shape
        K = weight.size(-1)
        x, rs = rows_view(xbc, cd)
        dout = dout.contiguous() if dout is not None else xbc.new_zeros(b, l, cd)
        w = weight.detach().reshape(cd, K).contiguous()
        dx, dw = xbc.new_empty(b, l, cd), torch.empty_like(w)
        dbias = torch.empty_like(bias) if bias is not None else None
        dprev = xbc.new_empty(b, cd, K - 1) if prev is not None and ctx.needs_input_grad[3] else None
        rc = get_kernel().conv_silu_backward(
            x.data_ptr(), rs, prev.data_ptr() if prev is not None else None, w.data_ptr(),
            bias.data_ptr() if bias is not None else None, dout.data_ptr(), dx.data_ptr(), dw.data_ptr(),
            dbias.data_ptr() if dbias is not None else None, dprev.data_ptr() if dprev is not None else None,
            b, l, cd, K)
        check_rc(rc, "conv_silu backward")
        if dnew is not None:   # the returned conv state is the last K-1 inputs: route its gradient back
            j0 = max(0, K - 1 - l)                                   # entries j < j0 still come from prev
            dx[:, l - (K - 1 - j0):] += dnew[:, :, j0:].transpose(1, 2)
            if dprev is not None and j0:
                dprev[:, :, K - 1 - j0:] += dnew[:, :, :j0]
        return dx, dw.view_as(weight), dbias, dprev


def conv_supported(xbc: Tensor, weight: Tensor) -> bool:
    return xbc.size(1) > 0 and weight.size(-1) <= 16 and kernels_for(xbc, weight)


def conv_silu_train(xbc: Tensor, weight: Tensor, bias: Tensor | None, prev: Tensor | None = None
                    ) -> tuple[Tensor, Tensor]:
    """xbc (b, l, conv_dim) (a view is fine), weight (conv_dim, 1, K), bias (conv_dim) or None, prev
    (b, conv_dim, K-1): the inputs before position 0, or None for zeros -> (silu(causal conv) (b, l, conv_dim),
    the new conv state (b, conv_dim, K-1)).  Differentiable in all tensor inputs.  Check `conv_supported`."""
    prev = prev.contiguous() if prev is not None else None
    return _ConvSiLU.apply(xbc, weight, bias, prev)


class _GatedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, z: Tensor, weight: Tensor, ngroups: int, eps: float):
        b, l, d = y.shape
        zr, z_rs = rows_view(z, d)
        out, rstd = y.new_empty(b, l, d), y.new_empty(b * l, ngroups)
        get_kernel().gated_norm_fwd(y.data_ptr(), zr.data_ptr(), z_rs, weight.data_ptr(), out.data_ptr(),
                                    rstd.data_ptr(), b * l, d, ngroups, eps)
        ctx.save_for_backward(y, zr, weight, rstd)
        ctx.z_rs, ctx.ngroups = z_rs, ngroups
        return out

    @staticmethod
    @once_differentiable   # the C backward is not itself differentiable: double backward raises
    def backward(ctx, dout: Tensor):
        y, zr, weight, rstd = ctx.saved_tensors
        b, l, d = y.shape
        dout = dout.contiguous()
        dy, dz, dw = y.new_empty(b, l, d), y.new_empty(b, l, d), torch.empty_like(weight)
        rc = get_kernel().gated_norm_bwd(y.data_ptr(), zr.data_ptr(), ctx.z_rs, weight.data_ptr(), rstd.data_ptr(),
                                         dout.data_ptr(), dy.data_ptr(), dz.data_ptr(), dw.data_ptr(), b * l, d,
                                         ctx.ngroups)
        check_rc(rc, "gated_norm backward")
        return dy, dz, dw, None, None


def gated_norm_supported(y: Tensor, z: Tensor, weight: Tensor) -> bool:
    return weight.is_contiguous() and kernels_for(y, z, weight)


def gated_norm_train(y: Tensor, z: Tensor, weight: Tensor, ngroups: int, eps: float) -> Tensor:
    """GatedRMSNorm(y, z) with `weight`: y (b, l, d) (made contiguous), z (b, l, d) (a view is fine)."""
    return _GatedNorm.apply(y.contiguous(), z, weight, ngroups, float(eps))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float):
        d = x.size(-1)
        rows = x.numel() // d
        out, rstd = torch.empty_like(x), x.new_empty(rows)
        get_kernel().rms_norm_fwd(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rstd.data_ptr(), rows, d, eps)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    @once_differentiable   # the C backward is not itself differentiable: double backward raises
    def backward(ctx, dout: Tensor):
        x, weight, rstd = ctx.saved_tensors
        d = x.size(-1)
        dout = dout.contiguous()
        dx, dw = torch.empty_like(x), torch.empty_like(weight)
        rc = get_kernel().rms_norm_bwd(x.data_ptr(), weight.data_ptr(), rstd.data_ptr(), dout.data_ptr(),
                                       dx.data_ptr(), dw.data_ptr(), x.numel() // d, d)
        check_rc(rc, "rms_norm backward")
        return dx, dw, None


def rms_norm_supported(x: Tensor, weight: Tensor) -> bool:
    return weight.is_contiguous() and x.numel() > 0 and kernels_for(x, weight)


def rms_norm_train(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x^2, -1) + eps) * weight, forward and backward in C; x (..., d) is made contiguous."""
    return _RMSNorm.apply(x.contiguous(), weight, float(eps))
