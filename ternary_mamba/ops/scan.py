"""The SSD scan, one op: `ssd_scan` chooses the implementation, `ssd_scan_ref` is the PyTorch reference with the
same signature and result.  `ssd_step` / `ssd_step_ref`: one recurrent step of the same recurrence.

    ssd_scan(xBC, dt, A, D, dims, initial_state) -> y (b, l, h, p) including the D skip, final state (b, h, p, n)

xBC (b, l, h·p + 2·g·n) is the conv + SiLU output (x | B | C side by side; the kernels read it in place), dt
(b, l, h) is already softplus'ed, A (h,) negative, D (h,).  Which implementation runs:
  - CPU fp32, gradients needed: the C forward + hand-written backward (ops/autograd.py, csrc/ssd_train.c);
  - CPU fp32, no gradients: the C chunked scan (csrc/ssd_prefill.c);
  - CUDA with mamba_ssm installed: its fused Triton scan (`mamba_chunk_scan_combined`);
  - CUDA without mamba_ssm: our Triton kernels (ops/triton_scan.py): forward + backward when gradients are
    needed ("triton"), the forward alone otherwise ("triton-fwd": the frozen teacher, evaluation, prefill);
  - anything else, or inside `reference_path()`: the reference (chunked PyTorch; "sequential": token by token).
`ops.dispatch.last_impl("ssd_scan")` names the implementation the latest call took (recorded by runs).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import autograd as fused
from .dispatch import kernels_for, mamba_ssm_scan, ran, reference_kind, triton_for, triton_scan
from .kernels import ssd_prefill, ssd_step_inplace
from .ssd_torch import ssd_chunked, ssd_sequential
from .ssd_torch import ssd_step as _torch_step


class ScanDims(NamedTuple):
    nheads: int
    headdim: int
    ngroups: int
    d_state: int
    chunk_size: int




def needs_grad(*tensors: Tensor | None) -> bool:
    """Autograd will want gradients of this op's output."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def split_xbc(xBC: Tensor, dims: ScanDims) -> tuple[Tensor, Tensor, Tensor]:
    """Views x (b, l, h, p), B and C (b, l, g, n) of the conv output."""
    b, l, _ = xBC.shape
    h, p, g, n = dims.nheads, dims.headdim, dims.ngroups, dims.d_state
    x, B, C = xBC.split([h * p, g * n, g * n], dim=-1)
    return x.view(b, l, h, p), B.view(b, l, g, n), C.view(b, l, g, n)


def ssd_scan_ref(xBC: Tensor, dt: Tensor, A: Tensor, D: Tensor, dims: ScanDims,
                 initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The reference: `ssd_chunked` (or, inside `reference_path("sequential")`, the recurrence) plus D x."""
    x, B, C = split_xbc(xBC, dims)
    if reference_kind() == "sequential":
        y, state = ssd_sequential(x, dt, A, B, C, initial_state)
    else:
        y, state = ssd_chunked(x, dt, A, B, C, dims.chunk_size, initial_state)
    return y + x * D[:, None], state


def ssd_scan(xBC: Tensor, dt: Tensor, A: Tensor, D: Tensor, dims: ScanDims,
             initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The SSD scan by the fastest implementation these tensors may take (see the module's docstring)."""
    ref = reference_kind()
    if ref is None and kernels_for(xBC, dt, A, D, initial_state):
        if needs_grad(xBC, dt, A, D, initial_state):
            if fused.ssd_supported(xBC, dims.headdim, dims.d_state, dims.chunk_size):
                ran("ssd_scan", "c-train")
                y, state = fused.ssd_train(xBC, dt, A, D, *dims, initial_state)
                return y, state
        else:
            x, B, C = split_xbc(xBC, dims)
            out = ssd_prefill(x, dt, A, B, C, dims.chunk_size, initial_state, D=D)
            if out is not None:
                ran("ssd_scan", "c-prefill")
                return out
    if ref is None:
        scan = mamba_ssm_scan(xBC)
        if scan is not None:
            x, B, C = split_xbc(xBC, dims)
            ran("ssd_scan", "mamba_ssm")
            return scan(x, dt, A, B, C, dims.chunk_size, D=D, initial_states=initial_state,
                        return_final_states=True)
        k = dims.chunk_size
        if triton_for(xBC, dt, A, D, initial_state) and k >= 16 and k & (k - 1) == 0 and triton_scan() is not None:
            if needs_grad(xBC, dt, A, D, initial_state):     # training: forward + backward kernels
                ran("ssd_scan", "triton")
                return triton_scan().ssd_scan_train(xBC, dt, A, D, dims, initial_state)
            x, B, C = split_xbc(xBC, dims)       # no gradient wanted (the teacher, evaluation, prefill)
            ran("ssd_scan", "triton-fwd")
            return triton_scan().ssd_scan_fwd(x, dt, A, B, C, D, k, initial_state)
    ran("ssd_scan", ref or "torch")
    return ssd_scan_ref(xBC, dt, A, D, dims, initial_state)


def ssd_step_ref(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                 inplace: bool = False) -> tuple[Tensor, Tensor]:
    """One step: state (b, h, p, n), x (b, h, p), dt (b, h), B/C (b, g, n) -> y (b, h, p), new state.
    (`inplace` is accepted for the same signature; the reference always returns a new state.)"""
    return _torch_step(state.float(), x, dt, A, B, C)


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             inplace: bool = False) -> tuple[Tensor, Tensor]:
    """One recurrent step; inplace=True lets the C kernel update a contiguous fp32 CPU state in place."""
    if inplace and reference_kind() is None and state.is_contiguous() and not needs_grad(state, x, dt, A, B, C) \
            and kernels_for(state, x, dt, B, C):
        ran("ssd_step", "c-inplace")
        return ssd_step_inplace(state, x, dt, torch.exp(dt * A), B, C), state
    ran("ssd_step", "torch")
    return ssd_step_ref(state, x, dt, A, B, C)
