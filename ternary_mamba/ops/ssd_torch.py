"""The SSD scan of Mamba-2 in PyTorch: the chunked form (the reference `ops.scan.ssd_scan_ref` runs, and what every
device without a fused kernel trains with) and the token-by-token recurrence it is checked against.

Notation (mamba_ssm): b batch, l sequence, h heads, p headdim, g groups (B/C shared by h/g heads),
n d_state, c chunks of length k.  Recurrence, per head:
    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t B_t^T        # (p, n)
    y_t     = state_t C_t                                           # (p,)
(the D skip connection is added by the caller).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _DecayMatrix(torch.autograd.Function):
    """L[i, j] = exp(a_cum[i] - a_cum[j]) for i >= j, else 0, with a hand-written backward:
    dL[i, j]/da_cum[i] = L[i, j] and dL[i, j]/da_cum[j] = -L[i, j], so with G = grad_L * L
    grad_a_cum[i] = sum_j G[i, j] - sum_i' G[i', i]  (two reductions instead of autograd's chain of
    k x k temporaries through sub, clamp, exp and the mask)."""

    @staticmethod
    def forward(ctx, a_cum: Tensor) -> Tensor:
        k = a_cum.size(-1)
        causal = torch.ones(k, k, dtype=a_cum.dtype, device=a_cum.device).tril()
        # Entries with i >= j are <= 0 (a <= 0), so clamping at 0 changes nothing there and keeps exp finite
        # above the diagonal, which the mask then zeroes.  (Masking with -inf before exp gives the same values
        # but hits a ~10x slower path of the vectorised exp on CPU.)
        L = torch.exp((a_cum[..., :, None] - a_cum[..., None, :]).clamp_max_(0)).mul_(causal)
        ctx.save_for_backward(L)
        return L

    @staticmethod
    def backward(ctx, grad_L: Tensor) -> Tensor:
        (L,) = ctx.saved_tensors
        G = grad_L * L
        return G.sum(-1) - G.sum(-2)


def decay_matrix(a_cum: Tensor) -> Tensor:
    """a_cum (..., k) cumulative log-decays within a chunk -> L (..., k, k), L[i, j] = exp(a_cum[i] - a_cum[j])
    for i >= j, else 0.  Differences of a within-chunk cumsum: exact enough in fp32 for chunks of <= 256."""
    return _DecayMatrix.apply(a_cum)


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x (b,l,h,p), dt (b,l,h) already softplus'ed, A (h,), B/C (b,l,g,n), state (b,h,p,n).

    Returns y (b,l,h,p) and the final state (b,h,p,n)."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    k = chunk_size
    pad = (-l) % k
    if pad:  # zero dt => no decay and no input: the padded tail leaves the state unchanged
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c = x.size(1) // k
    a = (dt * A).view(b, c, k, h).permute(0, 3, 1, 2)                     # (b,h,c,k)
    a_cum = a.cumsum(-1)                                                   # (b,h,c,k)
    xdt = (x * dt[..., None]).view(b, c, k, g, r, p)
    Bc = B.view(b, c, k, g, n).permute(0, 1, 3, 2, 4)                      # (b,c,g,k,n)
    Cc = C.view(b, c, k, g, n).permute(0, 1, 3, 2, 4)                      # (b,c,g,k,n)

    # 1) within-chunk (diagonal blocks): y = (C B^T ∘ L) x
    L = decay_matrix(a_cum).view(b, g, r, c, k, k).permute(0, 3, 1, 2, 4, 5)  # (b,c,g,r,k,k)
    CB = Cc @ Bc.transpose(-1, -2)                                         # (b,c,g,k,k)
    xg = xdt.permute(0, 1, 3, 4, 2, 5)                                     # (b,c,g,r,k,p)
    y = (CB[:, :, :, None] * L) @ xg                                       # (b,c,g,r,k,p)

    # 2) state contributed by each chunk, decayed to the chunk's end
    decay_states = torch.exp(a_cum[..., -1:] - a_cum)                      # (b,h,c,k)
    ds = decay_states.view(b, g, r, c, k).permute(0, 3, 1, 2, 4)           # (b,c,g,r,k)
    xw = (xg * ds[..., None]).transpose(-1, -2).reshape(b, c, g, r * p, k)
    states = (xw @ Bc).view(b, c, h, p, n)                                 # (b,c,h,p,n)

    # 3) pass states between chunks (a short recurrence over c)
    if initial_state is None:
        initial_state = x.new_zeros(b, h, p, n)
    chunk_decay = torch.exp(a_cum[..., -1])                                # (b,h,c)
    # unbind, not states[:, i]: the backward of c slices would write c zero-filled full-size gradients and add
    # them up (O(c^2) memory traffic: 21 % of a 1.3B training step on a GPU); unbind's backward is one stack
    states_i, decay_i = states.unbind(1), chunk_decay.unbind(-1)
    carried = []
    s = initial_state
    for i in range(c):
        carried.append(s)
        s = s * decay_i[i][:, :, None, None] + states_i[i]
    prev = torch.stack(carried, dim=1)                                     # (b,c,h,p,n) state entering chunk

    # 4) output from the carried state: y += exp(a_cum) * C prev^T
    prev_g = prev.view(b, c, g, r * p, n)
    y_off = (Cc @ prev_g.transpose(-1, -2)).view(b, c, g, k, r, p)         # (b,c,g,k,r,p)
    out_decay = torch.exp(a_cum).view(b, g, r, c, k).permute(0, 3, 1, 4, 2)  # (b,c,g,k,r)
    y = y.permute(0, 1, 2, 4, 3, 5) + y_off * out_decay[..., None]         # (b,c,g,k,r,p)
    y = y.permute(0, 1, 3, 2, 4, 5).reshape(b, c * k, h, p)
    return y[:, :l], s


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """One recurrent step. state (b,h,p,n), x (b,h,p), dt (b,h), B/C (b,g,n) -> y (b,h,p), new state."""
    h, g = x.size(1), B.size(1)
    Bh = B.repeat_interleave(h // g, dim=1)                                # (b,h,n)
    Ch = C.repeat_interleave(h // g, dim=1)
    dA = torch.exp(dt * A)                                                 # (b,h)
    state = state * dA[..., None, None] + (dt[..., None] * x)[..., None] * Bh[:, :, None, :]
    y = (state @ Ch[..., None]).squeeze(-1)
    return y, state


def ssd_sequential(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Slow reference: the recurrence token by token. Same signature as `ssd_chunked` minus chunk_size."""
    b, l, h, p = x.shape
    state = initial_state if initial_state is not None else x.new_zeros(b, h, p, B.size(-1))
    ys = []
    for t in range(l):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
        ys.append(y)
    return torch.stack(ys, dim=1), state
