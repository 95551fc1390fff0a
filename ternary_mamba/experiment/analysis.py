"""Error along the recurrence: how far a quantized model's SSM states and layer outputs drift from its
teacher's, per head and as a function of token position, and how much of it the state carries.

Both models are run token by token with `step()` on the same held-out sequences, each on its *own*
trajectory (the quantized model's later layers see its own earlier layers' outputs).  For layer l, head h
and position t:

    state error   ‖S_q^{l,h}(t) − S^{l,h}(t)‖_F, absolute and relative to ‖S^{l,h}(t)‖_F
    output error  ‖h_q^l(t) − h^l(t)‖ / ‖h^l(t)‖               (h: the residual stream after block l)

averaged over the sequences.  Heads are binned by their decay horizon 1 / (mean_t dt_h(t) · |A_h|): the
number of tokens over which the state forgets by a factor e.  A relative error cannot show accumulation (it
grows in numerator and denominator alike) and an average over heads hides the few long-memory heads, hence
per head, absolute and relative.

`injection` separates the error carried in the state from the per-token error: at position t0 the quantized
model continues from the *teacher's* state (what its weights alone cost from there on), and the teacher
continues from the *quantized model's* state (what the carried state alone costs, and how fast it decays).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from ..quant.ternary import absmean_scale, dequantize, round_scale, ternary_codes

HORIZON_BINS = (0, 8, 32, 128, 512, float("inf"))


@torch.no_grad()
def trajectories(model, tokens: Tensor, start: int = 0, state=None) -> tuple[Tensor, Tensor]:
    """tokens (b, T) -> (states (T', L, b, H, P·N), outputs (T', L, b, d_model)) for positions start..T-1,
    recorded with step() from `state` (the model's own empty state when None)."""
    model.eval()
    b, T = tokens.shape
    H = model.config.nheads
    state = model.empty_state(b) if state is None else [copy.deepcopy(s) for s in state]
    S, O = [], []
    for t in range(start, T):
        h = model.backbone.embedding(tokens[:, t])
        st, out, new = [], [], []
        for layer, s in zip(model.backbone.layers, state):
            h, s = layer.step(h, s)
            new.append(s)
            st.append(s.ssm.reshape(b, H, -1).clone())
            out.append(h.clone())
        state = new
        S.append(torch.stack(st))
        O.append(torch.stack(out))
    return torch.stack(S), torch.stack(O)


@torch.no_grad()
def states_at(model, tokens: Tensor, t: int):
    """The per-layer states after the first t tokens."""
    return model(tokens[:, :t], return_state=True)[1]


@torch.no_grad()
def decay_horizons(model, tokens: Tensor) -> Tensor:
    """(L, H): 1 / (mean dt · |A|) per head over the given tokens, in tokens."""
    dts = []
    hooks = [layer.mixer.in_proj.register_forward_hook(
        lambda m, _i, out, mixer=layer.mixer: dts.append(
            torch.nn.functional.softplus(out[..., -mixer.cfg.nheads:].float() + mixer.dt_bias.float())
            .flatten(0, -2).mean(0)))
        for layer in model.backbone.layers]
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    A = torch.stack([-torch.exp(layer.mixer.A_log.float()) for layer in model.backbone.layers])
    return 1.0 / (torch.stack(dts) * A.abs()).clamp_min(1e-12)


def relative_error(a: Tensor, ref: Tensor) -> Tensor:
    """(T, L, b, D) pairs -> (T, L): per-sequence relative error, averaged over the sequences."""
    return ((a - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)).mean(-1)


def head_errors(S_q: Tensor, S_t: Tensor) -> tuple[Tensor, Tensor]:
    """(T, L, b, H, PN) pairs -> (absolute (T, L, H), relative (T, L, H)), averaged over the sequences."""
    d = (S_q - S_t).norm(dim=-1)
    return d.mean(2), (d / S_t.norm(dim=-1).clamp_min(1e-12)).mean(2)


def binned(err: Tensor, horizons: Tensor, every: int = 4) -> dict:
    """(T, L, H) errors -> {bin label: {'heads': n, 'curve': mean over the bin's heads, every `every` positions}}."""
    flat, hz = err.flatten(1), horizons.flatten()
    out = {}
    for lo, hi in zip(HORIZON_BINS[:-1], HORIZON_BINS[1:]):
        sel = (hz >= lo) & (hz < hi)
        if sel.any():
            label = f"{lo:g}-{hi:g}" if hi != float("inf") else f">={lo:g}"
            out[label] = {"heads": int(sel.sum()), "curve": flat[::every, sel].mean(-1).tolist()}
    return out


@torch.no_grad()
def recurrence_analysis(model, teacher, tokens: Tensor, ref, horizons: Tensor, t0: int) -> dict:
    """Per-head binned state errors, per-layer output errors, and the injection split at t0."""
    S_t, O_t = ref
    S_q, O_q = trajectories(model, tokens)
    absolute, rel = head_errors(S_q, S_t)
    out_err = relative_error(O_q, O_t)                                    # (T, L)
    fresh = trajectories(model, tokens, t0, states_at(teacher, tokens, t0))[1]      # student, teacher's state
    carried = trajectories(teacher, tokens, t0, states_at(model, tokens, t0))[1]    # teacher, student's state
    last = -1

    def per_sequence(a: Tensor, ref_o: Tensor) -> list[float]:     # last layer, mean over positions t0..T-1
        return ((a - ref_o).norm(dim=-1) / ref_o.norm(dim=-1).clamp_min(1e-12))[:, last].mean(0).tolist()
    return {"injection_sequences": {"own": per_sequence(O_q[t0:], O_t[t0:]),
                                    "weights_only": per_sequence(fresh, O_t[t0:]),
                                    "state_only": per_sequence(carried, O_t[t0:])},
            "state_abs": binned(absolute, horizons), "state_rel": binned(rel, horizons),
            "output": out_err.mean(-1).tolist(), "output_last_layer": out_err[:, last].tolist(),
            "injection": {"t0": t0, "own": out_err[t0:, last].tolist(),
                          "weights_only": relative_error(fresh, O_t[t0:])[:, last].tolist(),
                          "state_only": relative_error(carried, O_t[t0:])[:, last].tolist()}}


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
