"""The SSD chunked scan in Triton for CUDA tensors: `ssd_scan_fwd` (no gradient: the frozen teacher's forward in
QAT+KD, evaluation, prefill) and `ssd_scan_train` (forward + backward, gradients for x, B, C, dt, A, D and the
initial state).  Same results as `ops.scan.ssd_scan_ref` (the tests hold values and every gradient to it under
TRITON_INTERPRET=1 on CPU tensors).

The forward is three kernels instead of the PyTorch scan's ~40 ops per layer, each reading its inputs once:
  1. per (batch, chunk, head): the within-chunk cumulative decay, the diagonal block
     y = (C Bᵀ ∘ L)(x·dt) and the chunk's state contribution (x·dt·decay)ᵀ B — one tile in registers;
  2. per (batch, head, state tile): the short recurrence over chunks (state entering each chunk, final state);
  3. per (batch, chunk, head): y += exp(a_cum) · C prevᵀ, + D·x.
Everything is fp32 with IEEE products (no TF32), as the reference computes it."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _chunk_fwd(X, DT, A, B, C, Y, ACUM, STATES, L, H, G, P, N, nchunks,
               K: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = pid // nchunks
    c = pid % nchunks
    g = h // (H // G)
    t = c * K + tl.arange(0, K)
    tm = t < L
    pp = tl.arange(0, BP)
    nn = tl.arange(0, BN)
    dt = tl.load(DT + (b * L + t) * H + h, mask=tm, other=0.0).to(tl.float32)
    a = dt * tl.load(A + h).to(tl.float32)
    a_cum = tl.cumsum(a, 0)
    x = tl.load(X + ((b * L + t[:, None]) * H + h) * P + pp[None, :], mask=tm[:, None] & (pp[None, :] < P),
                other=0.0).to(tl.float32)
    bm = tm[:, None] & (nn[None, :] < N)
    Bt = tl.load(B + ((b * L + t[:, None]) * G + g) * N + nn[None, :], mask=bm, other=0.0).to(tl.float32)
    Ct = tl.load(C + ((b * L + t[:, None]) * G + g) * N + nn[None, :], mask=bm, other=0.0).to(tl.float32)
    xdt = x * dt[:, None]
    cb = tl.dot(Ct, tl.trans(Bt), input_precision="ieee")                     # (K, K)
    diff = tl.minimum(a_cum[:, None] - a_cum[None, :], 0.0)
    causal = tl.arange(0, K)[:, None] >= tl.arange(0, K)[None, :]
    lmat = tl.where(causal, tl.exp(diff), 0.0)
    y = tl.dot(cb * lmat, xdt, input_precision="ieee")                      # (K, BP)
    tl.store(Y + ((b * L + t[:, None]) * H + h) * P + pp[None, :], y, mask=tm[:, None] & (pp[None, :] < P))
    tl.store(ACUM + ((b * H + h) * nchunks + c) * K + tl.arange(0, K), a_cum)
    a_last = tl.sum(tl.where(tl.arange(0, K) == K - 1, a_cum, 0.0), 0)
    w = xdt * tl.exp(a_last - a_cum)[:, None]
    st = tl.dot(tl.trans(w), Bt, input_precision="ieee")                    # (BP, BN)
    sm = (pp[:, None] < P) & (nn[None, :] < N)
    tl.store(STATES + (((b * nchunks + c) * H + h) * P + pp[:, None]) * N + nn[None, :], st, mask=sm)


@triton.jit
def _state_pass(STATES, ACUM, INIT, PREV, FINAL, H, PN, nchunks, HAS_INIT: tl.constexpr,
                K: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    if HAS_INIT:
        s = tl.load(INIT + (b * H + h) * PN + offs, mask=m, other=0.0).to(tl.float32)
    else:
        s = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(nchunks):
        tl.store(PREV + ((b * nchunks + c) * H + h) * PN + offs, s, mask=m)
        decay = tl.exp(tl.load(ACUM + ((b * H + h) * nchunks + c) * K + K - 1))
        s = s * decay + tl.load(STATES + ((b * nchunks + c) * H + h) * PN + offs, mask=m, other=0.0)
    tl.store(FINAL + (b * H + h) * PN + offs, s, mask=m)


@triton.jit
def _chunk_out(X, C, D, Y, ACUM, PREV, L, H, G, P, N, nchunks,
               K: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = pid // nchunks
    c = pid % nchunks
    g = h // (H // G)
    t = c * K + tl.arange(0, K)
    tm = t < L
    pp = tl.arange(0, BP)
    nn = tl.arange(0, BN)
    ym = tm[:, None] & (pp[None, :] < P)
    Ct = tl.load(C + ((b * L + t[:, None]) * G + g) * N + nn[None, :], mask=tm[:, None] & (nn[None, :] < N),
                 other=0.0).to(tl.float32)
    prev = tl.load(PREV + (((b * nchunks + c) * H + h) * P + pp[:, None]) * N + nn[None, :],
                   mask=(pp[:, None] < P) & (nn[None, :] < N), other=0.0)
    a_cum = tl.load(ACUM + ((b * H + h) * nchunks + c) * K + tl.arange(0, K))
    y_off = tl.dot(Ct, tl.trans(prev), input_precision="ieee") * tl.exp(a_cum)[:, None]
    x = tl.load(X + ((b * L + t[:, None]) * H + h) * P + pp[None, :], mask=ym, other=0.0).to(tl.float32)
    y = tl.load(Y + ((b * L + t[:, None]) * H + h) * P + pp[None, :], mask=ym, other=0.0)
    y = y + y_off + x * tl.load(D + h).to(tl.float32)
    tl.store(Y + ((b * L + t[:, None]) * H + h) * P + pp[None, :], y, mask=ym)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


@torch.no_grad()
def ssd_scan_fwd(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 D: torch.Tensor, chunk_size: int, initial_state: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (b,l,h,p), dt (b,l,h) softplus'ed, A (h,), B/C (b,l,g,n), D (h,), state (b,h,p,n) -> y (b,l,h,p) fp32
    including D·x, final state (b,h,p,n) fp32."""
    if _block(chunk_size) != chunk_size:
        raise ValueError(f"the Triton scan takes chunk sizes that are powers of two >= 16, not {chunk_size}")
    x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
    y, final, _, _ = _forward_saving(x, dt, A, B, C, D, chunk_size, initial_state)
    return y, final


# ---- training: the same forward, keeping what the backward needs, and the backward in three kernels ----------------
#
# With a = dt·A, ac its cumulative sum within a chunk, u = dt·x, M = (C Bᵀ) ∘ L (L_ts = exp(ac_t − ac_s), t ≥ s),
# w_s = exp(ac_last − ac_s), prev_c the state entering chunk c and G_c the gradient of the state leaving it:
#   y = M u + exp(ac) ∘ (C prev_cᵀ) + D x;  st_c = Σ_s w_s u_s B_sᵀ;  prev_{c+1} = exp(ac_last) prev_c + st_c
#   G_{c−1} = exp(ac_last_c) G_c + Σ_t exp(ac_t) dy_t C_tᵀ          (kernels 1 and 2: the reverse pass)
#   and per chunk (kernel 3): dU = Mᵀ dY + w ∘ (B G_cᵀ), dM = dY uᵀ, dC = (dM ∘ L) B + exp(ac) ∘ (dY prev_c),
#   dB = (dM ∘ L)ᵀ C + w ∘ (u G_c), d ac from L, the output decay, w and the carried state, then
#   da = reverse cumsum(d ac), ddt = A·da + Σ_p x·dU, dx = dt·dU + D·dy, dA = Σ da·dt, dD = Σ x·dy.


@triton.jit
def _bwd_dstate_in(DY, C, ACUM, Q, L, H, G, P, N, nchunks, K: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """Q_c = Σ_t exp(ac_t) dy_t C_tᵀ: what the chunk's outputs send back to the state entering it."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = pid // nchunks
    c = pid % nchunks
    g = h // (H // G)
    t = c * K + tl.arange(0, K)
    tm = t < L
    pp = tl.arange(0, BP)
    nn = tl.arange(0, BN)
    dy = tl.load(DY + ((b * L + t[:, None]) * H + h) * P + pp[None, :], mask=tm[:, None] & (pp[None, :] < P),
                 other=0.0).to(tl.float32)
    Ct = tl.load(C + ((b * L + t[:, None]) * G + g) * N + nn[None, :], mask=tm[:, None] & (nn[None, :] < N),
                 other=0.0).to(tl.float32)
    ac = tl.load(ACUM + ((b * H + h) * nchunks + c) * K + tl.arange(0, K))
    q = tl.dot(tl.trans(dy * tl.exp(ac)[:, None]), Ct, input_precision="ieee")   # (BP, BN)
    tl.store(Q + (((b * nchunks + c) * H + h) * P + pp[:, None]) * N + nn[None, :], q,
             mask=(pp[:, None] < P) & (nn[None, :] < N))


@triton.jit
def _bwd_state_pass(Q, ACUM, DFINAL, GC, DINIT, H, PN, nchunks, HAS_DFINAL: tl.constexpr, K: tl.constexpr,
                    BLOCK: tl.constexpr):
    """The reverse recurrence over chunks: G_c for every chunk and the initial state's gradient."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    if HAS_DFINAL:
        gs = tl.load(DFINAL + (b * H + h) * PN + offs, mask=m, other=0.0).to(tl.float32)
    else:
        gs = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(nchunks):
        c = nchunks - 1 - i
        tl.store(GC + ((b * nchunks + c) * H + h) * PN + offs, gs, mask=m)
        decay = tl.exp(tl.load(ACUM + ((b * H + h) * nchunks + c) * K + K - 1))
        gs = gs * decay + tl.load(Q + ((b * nchunks + c) * H + h) * PN + offs, mask=m, other=0.0)
    tl.store(DINIT + (b * H + h) * PN + offs, gs, mask=m)


@triton.jit
def _bwd_chunk(X, DT, A, B, C, D, DY, PREV, GC, DX, DDT, DB, DC, DA, DD, L, H, G, P, N, nchunks,
               K: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = pid // nchunks
    c = pid % nchunks
    g = h // (H // G)
    t = c * K + tl.arange(0, K)
    tm = t < L
    kk = tl.arange(0, K)
    pp = tl.arange(0, BP)
    nn = tl.arange(0, BN)
    xm = tm[:, None] & (pp[None, :] < P)
    bm = tm[:, None] & (nn[None, :] < N)
    sm = (pp[:, None] < P) & (nn[None, :] < N)
    Ah = tl.load(A + h).to(tl.float32)
    Dh = tl.load(D + h).to(tl.float32)
    dt = tl.load(DT + (b * L + t) * H + h, mask=tm, other=0.0).to(tl.float32)
    ac = tl.cumsum(dt * Ah, 0)
    ac_last = tl.sum(tl.where(kk == K - 1, ac, 0.0), 0)
    x = tl.load(X + ((b * L + t[:, None]) * H + h) * P + pp[None, :], mask=xm, other=0.0).to(tl.float32)
    dy = tl.load(DY + ((b * L + t[:, None]) * H + h) * P + pp[None, :], mask=xm, other=0.0).to(tl.float32)
    Bt = tl.load(B + ((b * L + t[:, None]) * G + g) * N + nn[None, :], mask=bm, other=0.0).to(tl.float32)
    Ct = tl.load(C + ((b * L + t[:, None]) * G + g) * N + nn[None, :], mask=bm, other=0.0).to(tl.float32)
    soff = (((b * nchunks + c) * H + h) * P + pp[:, None]) * N + nn[None, :]
    prev = tl.load(PREV + soff, mask=sm, other=0.0)
    gst = tl.load(GC + soff, mask=sm, other=0.0)
    u = x * dt[:, None]
    cb = tl.dot(Ct, tl.trans(Bt), input_precision="ieee")
    lmat = tl.where(kk[:, None] >= kk[None, :], tl.exp(tl.minimum(ac[:, None] - ac[None, :], 0.0)), 0.0)
    mmat = cb * lmat
    # within the chunk
    du = tl.dot(tl.trans(mmat), dy, input_precision="ieee")
    dm = tl.dot(dy, tl.trans(u), input_precision="ieee")
    dcb = dm * lmat
    e = dm * cb * lmat
    dac = tl.sum(e, 1) - tl.sum(e, 0)
    dc = tl.dot(dcb, Bt, input_precision="ieee")
    db = tl.dot(tl.trans(dcb), Ct, input_precision="ieee")
    # the carried state's contribution to the outputs
    eac = tl.exp(ac)
    yoff = tl.dot(Ct, tl.trans(prev), input_precision="ieee") * eac[:, None]
    dc += tl.dot(dy, prev, input_precision="ieee") * eac[:, None]
    dac += tl.sum(yoff * dy, 1)
    # the chunk's contribution to the state it passes on
    w = tl.exp(ac_last - ac)
    bg = tl.dot(Bt, tl.trans(gst), input_precision="ieee")                     # (K, BP)
    du += bg * w[:, None]
    db += tl.dot(u, gst, input_precision="ieee") * w[:, None]
    dw = tl.sum(u * bg, 1) * w
    dac -= dw
    last = tl.sum(dw, 0) + tl.sum(tl.sum(gst * prev, 1), 0) * tl.exp(ac_last)
    dac += tl.where(kk == K - 1, last, 0.0)
    da = tl.sum(dac, 0) - tl.cumsum(dac, 0) + dac                              # reverse cumsum
    ddt = da * Ah + tl.sum(x * du, 1)
    dx = du * dt[:, None] + dy * Dh
    tl.store(DX + ((b * L + t[:, None]) * H + h) * P + pp[None, :], dx, mask=xm)
    tl.store(DDT + (b * L + t) * H + h, ddt, mask=tm)
    tl.store(DB + ((b * L + t[:, None]) * H + h) * N + nn[None, :], db, mask=bm)
    tl.store(DC + ((b * L + t[:, None]) * H + h) * N + nn[None, :], dc, mask=bm)
    tl.store(DA + (b * nchunks + c) * H + h, tl.sum(tl.where(tm, da * dt, 0.0), 0))
    tl.store(DD + (b * nchunks + c) * H + h, tl.sum(tl.sum(x * dy, 1), 0))


def _forward_saving(x, dt, A, B, C, D, chunk_size, initial_state):
    """The forward kernels, returning also the cumulative decays and the states entering each chunk."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    K = chunk_size
    nchunks = triton.cdiv(l, K)
    dev = x.device
    y = torch.empty(b, l, h, p, device=dev, dtype=torch.float32)
    acum = torch.empty(b, h, nchunks, K, device=dev, dtype=torch.float32)
    states = torch.empty(b, nchunks, h, p, n, device=dev, dtype=torch.float32)
    prev = torch.empty_like(states)
    final = torch.empty(b, h, p, n, device=dev, dtype=torch.float32)
    BP, BN = _block(p), _block(n)
    grid = (b * nchunks, h)
    A32, D32 = A.float().contiguous(), D.float().contiguous()
    _chunk_fwd[grid](x, dt, A32, B, C, y, acum, states, l, h, g, p, n, nchunks, K=K, BP=BP, BN=BN)
    init = initial_state.float().contiguous() if initial_state is not None else final
    _state_pass[(b, h, triton.cdiv(p * n, 256))](states, acum, init, prev, final, h, p * n, nchunks,
                                                  HAS_INIT=initial_state is not None, K=K, BLOCK=256)
    _chunk_out[grid](x, C, D32, y, acum, prev, l, h, g, p, n, nchunks, K=K, BP=BP, BN=BN)
    return y, final, acum, prev


class TritonSSD(torch.autograd.Function):
    """The scan with gradients for every input: xBC (as x | B | C), dt, A, D and the initial state."""

    @staticmethod
    def forward(ctx, xBC, dt, A, D, initial_state, dims):
        h, p, g, n, k = dims
        b, l, _ = xBC.shape
        x, B, C = (t.contiguous() for t in xBC.float().split([h * p, g * n, g * n], dim=-1))
        x, B, C = x.view(b, l, h, p), B.view(b, l, g, n), C.view(b, l, g, n)
        dt32 = dt.float().contiguous()
        y, final, acum, prev = _forward_saving(x, dt32, A, B, C, D, k, initial_state)
        ctx.save_for_backward(x, dt32, A, B, C, D, acum, prev)
        ctx.dims, ctx.has_init = dims, initial_state is not None
        ctx.xdtype = xBC.dtype
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, acum, prev = ctx.saved_tensors
        h, p, g, n, k = ctx.dims
        b, l = x.shape[:2]
        nchunks = triton.cdiv(l, k)
        dev = x.device
        dy = (dy if dy is not None else torch.zeros_like(x)).float().contiguous()
        BP, BN = _block(p), _block(n)
        grid = (b * nchunks, h)
        q = torch.empty_like(prev)
        _bwd_dstate_in[grid](dy, C, acum, q, l, h, g, p, n, nchunks, K=k, BP=BP, BN=BN)
        gc = torch.empty_like(prev)
        dinit = torch.empty(b, h, p, n, device=dev, dtype=torch.float32)
        dfin = dfinal.float().contiguous() if dfinal is not None else dinit
        _bwd_state_pass[(b, h, triton.cdiv(p * n, 256))](q, acum, dfin, gc, dinit, h, p * n, nchunks,
                                                          HAS_DFINAL=dfinal is not None, K=k, BLOCK=256)
        dx = torch.empty(b, l, h, p, device=dev, dtype=torch.float32)
        ddt = torch.empty(b, l, h, device=dev, dtype=torch.float32)
        dBh = torch.empty(b, l, h, n, device=dev, dtype=torch.float32)
        dCh = torch.empty(b, l, h, n, device=dev, dtype=torch.float32)
        dA = torch.empty(b, nchunks, h, device=dev, dtype=torch.float32)
        dD = torch.empty(b, nchunks, h, device=dev, dtype=torch.float32)
        _bwd_chunk[grid](x, dt, A.float().contiguous(), B, C, D.float().contiguous(), dy, prev, gc, dx, ddt, dBh,
                         dCh, dA, dD, l, h, g, p, n, nchunks, K=k, BP=BP, BN=BN)
        r = h // g
        dB = dBh.view(b, l, g, r, n).sum(3)        # the heads of a group share B and C
        dC = dCh.view(b, l, g, r, n).sum(3)
        dxBC = torch.cat([dx.view(b, l, h * p), dB.view(b, l, g * n), dC.view(b, l, g * n)], dim=-1).to(ctx.xdtype)
        return (dxBC, ddt, dA.sum((0, 1)).to(A.dtype), dD.sum((0, 1)).to(D.dtype),
                dinit if ctx.has_init else None, None)


def ssd_scan_train(xBC: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, D: torch.Tensor, dims,
                   initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`ops.scan.ssd_scan_ref`'s signature and result, with gradients for every input."""
    if _block(dims.chunk_size) != dims.chunk_size:
        raise ValueError(f"the Triton scan takes chunk sizes that are powers of two >= 16, not {dims.chunk_size}")
    return TritonSSD.apply(xBC, dt, A, D, initial_state, tuple(dims))
