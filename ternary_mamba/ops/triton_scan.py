"""The SSD chunked scan's forward in Triton, for CUDA tensors that need no gradient: the frozen teacher's forward
in QAT+KD (a quarter of a training step), evaluation and prefill.  Same signature and result as
`ops.scan.ssd_scan_ref` (the tests hold it to the reference under TRITON_INTERPRET=1 on CPU tensors).

Three kernels instead of the PyTorch scan's ~40 ops per layer, each reading its inputs once:
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
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    K = _block(chunk_size)
    if K != chunk_size:
        raise ValueError(f"the Triton scan takes chunk sizes that are powers of two >= 16, not {chunk_size}")
    nchunks = triton.cdiv(l, K)
    x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
    dev = x.device
    y = torch.empty(b, l, h, p, device=dev, dtype=torch.float32)
    acum = torch.empty(b, h, nchunks, K, device=dev, dtype=torch.float32)
    states = torch.empty(b, nchunks, h, p, n, device=dev, dtype=torch.float32)
    prev = torch.empty_like(states)
    final = torch.empty(b, h, p, n, device=dev, dtype=torch.float32)
    BP, BN = _block(p), _block(n)
    grid = (b * nchunks, h)
    _chunk_fwd[grid](x, dt, A.float().contiguous(), B, C, y, acum, states, l, h, g, p, n, nchunks, K=K, BP=BP, BN=BN)
    init = initial_state.float().contiguous() if initial_state is not None else final
    BLOCK = 256
    _state_pass[(b, h, triton.cdiv(p * n, BLOCK))](states, acum, init, prev, final, h, p * n, nchunks,
                                                    HAS_INIT=initial_state is not None, K=K, BLOCK=BLOCK)
    _chunk_out[grid](x, C, D.float().contiguous(), y, acum, prev, l, h, g, p, n, nchunks, K=K, BP=BP, BN=BN)
    return y, final
