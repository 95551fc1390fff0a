"""Error along the recurrence: how far a quantized model's SSM states and layer outputs drift from its
teacher's, as a function of token position.

Both models are run token by token with `step()` on the same held-out sequences, each on its *own*
trajectory (the quantized model's later layers see its own earlier layers' outputs), so the measured error
is the accumulated one.  For layer l and position t:

    state error   ‖S_q^l(t) − S^l(t)‖_F / ‖S^l(t)‖_F        (S: the (heads, headdim, d_state) SSM state)
    output error  ‖h_q^l(t) − h^l(t)‖ / ‖h^l(t)‖               (h: the residual stream after block l)

averaged over the sequences.  `inject_noise` makes the controlled variant: Gaussian noise of the size of
the ternary quantization error, put into one layer's weights of the full-precision teacher.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from ..quant.ternary import absmean_scale, dequantize, round_scale, ternary_codes


@torch.no_grad()
def trajectories(model, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """tokens (b, T) -> (states (T, L, b, H·P·N), outputs (T, L, b, d_model)), recorded with step()."""
    model.eval()
    b, T = tokens.shape
    state = model.empty_state(b)
    S, O = [], []
    for t in range(T):
        h = model.backbone.embedding(tokens[:, t])
        st, out, new = [], [], []
        for layer, s in zip(model.backbone.layers, state):
            h, s = layer.step(h, s)
            new.append(s)
            st.append(s.ssm.reshape(b, -1).clone())
            out.append(h.clone())
        state = new
        S.append(torch.stack(st))
        O.append(torch.stack(out))
    return torch.stack(S), torch.stack(O)


def relative_error(a: Tensor, ref: Tensor) -> Tensor:
    """(T, L, b, D) pairs -> (T, L): per-sequence relative error, averaged over the sequences."""
    return ((a - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)).mean(-1)


@torch.no_grad()
def error_vs_position(model, teacher, tokens: Tensor, ref: tuple[Tensor, Tensor] | None = None) -> dict:
    """{'state': (T, L) list, 'output': (T, L) list}; pass `ref` = trajectories(teacher, tokens) to reuse it."""
    S_t, O_t = ref if ref is not None else trajectories(teacher, tokens)
    S_q, O_q = trajectories(model, tokens)
    return {"state": relative_error(S_q, S_t).tolist(), "output": relative_error(O_q, O_t).tolist()}


@torch.no_grad()
def inject_noise(teacher, layer: int, group_size: int = 128, seed: int = 0):
    """A copy of the teacher whose block `layer` has in_proj/out_proj weights W + ε, with ε Gaussian of
    the same per-group RMS as that group's ternary error W − Q(W)."""
    noisy = copy.deepcopy(teacher)
    gen = torch.Generator().manual_seed(seed)
    mixer = noisy.backbone.layers[layer].mixer
    for lin in (mixer.in_proj, mixer.out_proj):
        W = lin.weight.float()
        s16 = round_scale(absmean_scale(W, group_size))
        E = W - dequantize(ternary_codes(W, s16, group_size), s16, group_size)
        out, inn = W.shape
        rms = E.view(out, inn // group_size, group_size).pow(2).mean(-1, keepdim=True).sqrt()
        eps = torch.randn(out, inn // group_size, group_size, generator=gen) * rms
        lin.weight.copy_(W + eps.view(out, inn))
    return noisy


def growth(curve: list[float], early: int = 16) -> float:
    """Mean of the second half of a position curve over the mean of its first `early` positions."""
    T = len(curve)
    first = sum(curve[:early]) / early
    second = sum(curve[T // 2:]) / (T - T // 2)
    return second / max(first, 1e-12)
