"""A Mamba-2 mixer's whole recurrent step between its projections (conv, SSM step, D skip, gated norm) as one C
call, where the tensors allow it.  Its reference is the step op by op (`core.model.Mamba2Mixer.step` with
inplace=False, built from `ops.scan.ssd_step` and `ops.norms.gated_norm`); tests compare the two."""
from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import kernels_for
from .kernels import mixer_step_inplace


def fused_mixer_step(mixer, zxbcdt: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor] | None:
    """(y (b, d_inner), the conv state now holding the new window) with `ssm_state` updated in place, or None
    when the fused kernel may not run (autograd on, not fp32 CPU tensors, a non-contiguous state or parameter,
    a reference path in force): the caller then runs the step op by op."""
    params = (mixer.conv1d.weight, mixer.conv1d.bias, mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight)
    if torch.is_grad_enabled() or not ssm_state.is_contiguous() \
            or not all(p is None or p.is_contiguous() for p in params) \
            or not kernels_for(zxbcdt, conv_state, ssm_state, *params):
        return None
    conv = conv_state if conv_state.is_contiguous() else conv_state.contiguous()
    return mixer_step_inplace(mixer, zxbcdt, conv, ssm_state), conv
