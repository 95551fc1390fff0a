"""Cross-entropy and the distillation KL as fused C kernels (csrc/losses.c) with hand-written backward passes.

PyTorch's versions make several passes over (tokens x vocab) temporaries (log_softmax, its backward, the zero-
filled gradient of nll_loss); at a small model's size these are ~15 % of a training step on a CPU.  Each
function here falls back to the PyTorch formula (the reference the tests compare against) whenever the fused
kernel does not apply: no compiler, not fp32 on CPU, or a gradient wanted for the teacher's logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .build import get_kernel
from .dispatch import kernels_for, ran, triton_for, triton_kernels


def _rows(x: Tensor) -> Tensor:
    """(…, V) -> (N, V) with unit stride along V and evenly spaced rows (a view when possible)."""
    x2 = x.reshape(-1, x.size(-1))
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _fusable(*ts: Tensor) -> bool:
    return kernels_for(*ts)


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, target: Tensor) -> Tensor:
        N, V = x.shape
        lse, loss = x.new_empty(N), x.new_empty(N)
        get_kernel().ce_forward(x.data_ptr(), x.stride(0), target.data_ptr(), lse.data_ptr(), loss.data_ptr(), N, V)
        count = int((target >= 0).sum())
        ctx.save_for_backward(x, target, lse)
        ctx.count = count
        return loss.double().sum().float() / max(count, 1)

    @staticmethod
    @once_differentiable   # the C backward is not itself differentiable: double backward raises
    def backward(ctx, g: Tensor):
        x, target, lse = ctx.saved_tensors
        N, V = x.shape
        dx = x.new_empty(N, V)
        get_kernel().ce_backward(x.data_ptr(), x.stride(0), target.data_ptr(), lse.data_ptr(),
                                 float(g) / max(ctx.count, 1), dx.data_ptr(), N, V)
        return dx, None


def cross_entropy_ref(logits: Tensor, target: Tensor, ignore_index: int = -100) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=ignore_index)


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy; logits (…, V), target (…) int64 (ignore_index: no loss, no gradient)."""
    if not _fusable(logits) or ignore_index >= 0:
        ran("cross_entropy", "torch")
        return cross_entropy_ref(logits, target, ignore_index)
    t = target.reshape(-1).to(torch.int64)
    t = torch.where(t == ignore_index, -1, t).contiguous()
    V = logits.size(-1)
    if t.numel() and (t.max() >= V):
        raise IndexError(f"target {int(t.max())} is out of bounds for {V} classes")
    ran("cross_entropy", "c")
    return _CrossEntropy.apply(_rows(logits), t)


class _KL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, s: Tensor, tau: float) -> Tensor:
        N, V = s.shape
        lse_t, lse_s, kl = s.new_empty(N), s.new_empty(N), s.new_empty(N)
        get_kernel().kl_forward(t.data_ptr(), t.stride(0), s.data_ptr(), s.stride(0), tau, lse_t.data_ptr(),
                                lse_s.data_ptr(), kl.data_ptr(), N, V)
        ctx.save_for_backward(t, s, lse_t, lse_s)
        ctx.tau = tau
        return kl.double().mean().float()

    @staticmethod
    @once_differentiable   # the C backward is not itself differentiable: double backward raises
    def backward(ctx, g: Tensor):
        t, s, lse_t, lse_s = ctx.saved_tensors
        N, V = s.shape
        ds = s.new_empty(N, V)
        get_kernel().kl_backward(t.data_ptr(), t.stride(0), s.data_ptr(), s.stride(0), ctx.tau, lse_t.data_ptr(),
                                 lse_s.data_ptr(), float(g) / N, ds.data_ptr(), N, V)
        return None, ds, None


def kl_div_ref(t_logits: Tensor, s_logits: Tensor, tau: float = 1.0) -> Tensor:
    t = F.log_softmax(t_logits.float() / tau, dim=-1)
    s = F.log_softmax(s_logits.float() / tau, dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def kl_div(t_logits: Tensor, s_logits: Tensor, tau: float = 1.0) -> Tensor:
    """Mean over tokens of KL(softmax(t/τ) ‖ softmax(s/τ)); logits (…, V).  The teacher's side gets no gradient
    from the fused kernel, so a teacher logits tensor that requires grad takes the reference."""
    if t_logits.requires_grad and torch.is_grad_enabled():
        ran("kl_div", "torch")
        return kl_div_ref(t_logits, s_logits, tau)
    if triton_for(t_logits, s_logits):          # CUDA: the Triton kernel (ops/triton_kernels.py)
        ran("kl_div", "triton")
        return triton_kernels().kl_div(t_logits, s_logits, tau)   # reads 16-bit logits as they are, sums in fp32
    if not _fusable(t_logits, s_logits):
        ran("kl_div", "torch")
        return kl_div_ref(t_logits, s_logits, tau)
    ran("kl_div", "c")
    return _KL.apply(_rows(t_logits), _rows(s_logits), float(tau))
