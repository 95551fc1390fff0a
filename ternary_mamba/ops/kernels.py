"""ctypes bindings of the compiled kernels (csrc/*.c), one Python function per C entry point.

Each binding takes CPU tensors of the dtype its C code was written for and checks that at the call
(`_cpu`): a CUDA, meta or half-precision tensor raises instead of handing a foreign pointer to C.  Whether a
kernel should run at all is decided by `ops.dispatch`, not here."""
from __future__ import annotations

import torch

from ..spec import A8_GROUP_MULTIPLE, BF16_GROUP_MULTIPLE, Q4_GROUP, SCAN_KERNEL_MULTIPLE, KernelKind
from .build import check_rc, get_kernel
from .ctypes_checks import require as _check, require_cpu as _cpu, require_dtype as _dtype


def _lib():
    lib = get_kernel()
    if lib is None:
        raise RuntimeError("the C kernel library is not built (ops.dispatch decides before calling a kernel)")
    return lib


def tq2_gemv(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes (out, in/4) uint8, scales (out, in/G) fp32, x (nb, in) fp32 -> y (nb, out) fp32."""
    _cpu(codes, scales, x)
    _dtype(torch.uint8, codes)
    _dtype(torch.float32, scales, x)
    lib = get_kernel()
    _check(lib is not None, 'library built')
    x = x.contiguous()
    out_f, in_f = codes.size(0), codes.size(1) * 4
    y = torch.empty(x.size(0), out_f, dtype=torch.float32)
    lib.tq2_gemv(codes.data_ptr(), scales.data_ptr(), x.data_ptr(), y.data_ptr(), out_f, in_f, group_size, x.size(0))
    return y


def tq2_gemv_bf16(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Like tq2_gemv with x rounded to bf16 (the paper's A16): codes (out, in/4) uint8, scales (out, in/G) fp32,
    x (nb, in) fp32 or bf16 -> y (nb, out) fp32.  Requires G % 64 == 0."""
    _cpu(codes, scales, x)
    _dtype(torch.uint8, codes)
    _dtype(torch.float32, scales)
    _check(group_size % BF16_GROUP_MULTIPLE == 0 and codes.is_contiguous() and scales.is_contiguous(),
           'bf16 GEMV: groups of a multiple of 64, contiguous codes and scales')
    lib = get_kernel()
    xb = x.to(torch.bfloat16).contiguous()            # round to nearest even, as the kernel's own conversion
    out_f, in_f = codes.size(0), codes.size(1) * 4
    y = torch.empty(xb.size(0), out_f, dtype=torch.float32)
    lib.tq2_gemv_bf16(codes.data_ptr(), scales.data_ptr(), xb.data_ptr(), y.data_ptr(), out_f, in_f, group_size,
                      xb.size(0))
    return y


def tq2_dequant_bf16(codes: torch.Tensor, scales: torch.Tensor, group_size: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """codes (out, in/4) uint8, scales (out, in/G) fp32 -> bf16(scale * t) (out, in), for prefill's bf16 GEMM."""
    _cpu(codes, scales, out)
    _dtype(torch.uint8, codes)
    _dtype(torch.float32, scales)
    _dtype(torch.bfloat16, out)
    lib = get_kernel()
    out_f, in_f = codes.size(0), codes.size(1) * 4
    w = out if out is not None else torch.empty(out_f, in_f, dtype=torch.bfloat16)
    lib.tq2_dequant_bf16(codes.data_ptr(), scales.data_ptr(), w.data_ptr(), out_f, in_f, group_size)
    return w


def tq2_gemm_a8(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor | None:
    """Prefill with int8 activations: codes (out, in/4) uint8, scales (out, in/G) fp32, x (nt, in) fp32 -> y (nt, out),
    the arithmetic of tq2_gemv_a8 (per-token int8, integer group sums).  None without AVX512-VNNI or AVX2, or
    with groups over 256 on AVX2."""
    _cpu(codes, scales, x)
    _dtype(torch.uint8, codes)
    _dtype(torch.float32, scales, x)
    _check(codes.is_contiguous() and scales.is_contiguous(), 'contiguous codes and scales')
    lib = get_kernel()
    x = x.contiguous()
    out_f, in_f = codes.size(0), codes.size(1) * 4
    y = torch.empty(x.size(0), out_f, dtype=torch.float32)
    rc = lib.tq2_gemm_a8(codes.data_ptr(), scales.data_ptr(), x.data_ptr(), y.data_ptr(), out_f, in_f, group_size,
                         x.size(0))
    if rc == -1:
        return None
    check_rc(rc, "int8-activation prefill")
    return y


def tq2_dequant(codes: torch.Tensor, scales: torch.Tensor, group_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """codes (out, in/4) uint8, scales (out, in/G) fp32 -> the fp32 weight (out, in)."""
    _cpu(codes, scales, out)
    _dtype(torch.uint8, codes)
    _dtype(torch.float32, scales, out)
    lib = get_kernel()
    _check(lib is not None, 'library built')
    out_f, in_f = codes.size(0), codes.size(1) * 4
    w = out if out is not None else torch.empty(out_f, in_f, dtype=torch.float32)
    lib.tq2_dequant(codes.data_ptr(), scales.data_ptr(), w.data_ptr(), out_f, in_f, group_size)
    return w


def ssd_step_inplace(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, dA: torch.Tensor,
                     B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Fused recurrent step (see ssd.ssd_step for the reference); updates `state` in place, returns y."""
    _cpu(state, x, dt, dA, B, C)
    _dtype(torch.float32, state)
    lib = get_kernel()
    b, h, p, n = state.shape
    _dtype(torch.float32, state)
    _check(state.is_contiguous(), 'contiguous state')
    x, dt, dA, B, C = (t.contiguous().float() for t in (x, dt, dA, B, C))
    y = torch.empty(b, h, p)
    lib.ssd_step_inplace(state.data_ptr(), x.data_ptr(), dt.data_ptr(), dA.data_ptr(), B.data_ptr(), C.data_ptr(),
                         y.data_ptr(), b, h, p, B.size(1), n)
    return y


def i8_gemv(w: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    _cpu(w, scale, x)
    _dtype(torch.int8, w)
    _dtype(torch.float32, scale, x)
    lib = get_kernel()
    x = x.contiguous()
    y = torch.empty(x.size(0), w.size(0))
    lib.i8_gemv(w.data_ptr(), scale.data_ptr(), x.data_ptr(), y.data_ptr(), w.size(0), w.size(1), x.size(0))
    return y


def q4_gemv(q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, a8: bool = False) -> torch.Tensor:
    """q (out, in/2) uint8 (4-bit codes, quant/tables.py), scale (out, in/32) fp32, x (nb, in) fp32 -> (nb, out).
    a8: x quantized to int8 per 128 values and VNNI dot products where the build has them and in % 128 == 0
    (csrc/decode_a8.c; reference `runtime.heads.q4_head_a8_ref`), else the fp32-activation kernel."""
    _cpu(q, scale, x)
    _dtype(torch.uint8, q)
    _dtype(torch.float32, scale, x)
    _check(q.is_contiguous() and scale.is_contiguous() and q.size(1) * 2 == scale.size(1) * Q4_GROUP == x.size(-1),
           'contiguous q4 table, scales and matching row length')
    lib = get_kernel()
    x = x.contiguous()
    y = torch.empty(x.size(0), q.size(0))
    if a8:
        work = torch.empty(lib.a8z_work_bytes(x.size(1), x.size(0)), dtype=torch.int8)
        if lib.q4_gemv_a8_auto(q.data_ptr(), scale.data_ptr(), x.data_ptr(), y.data_ptr(), work.data_ptr(),
                               q.size(0), x.size(1), x.size(0)) == 0:
            return y
    xsum = torch.empty(x.size(0), scale.size(1))
    lib.q4_gemv(q.data_ptr(), scale.data_ptr(), x.data_ptr(), y.data_ptr(), xsum.data_ptr(), q.size(0), x.size(1),
                x.size(0))
    return y


TABLE_KINDS = {torch.float32: KernelKind.F32, torch.float16: KernelKind.F16, torch.int8: KernelKind.I8,
               torch.uint8: KernelKind.Q4}   # uint8: q4 (two per byte)


def table_rows(w: torch.Tensor, scale: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (int64) of a table w (fp32 / fp16 / int8 with fp32 scale per row / q4 uint8 with fp32 scale per
    group of 32) as fp32 (n, d)."""
    _cpu(w, scale, ids)
    _dtype(torch.int64, ids)
    kind = TABLE_KINDS.get(w.dtype)
    if kind is None or not w.is_contiguous():
        raise TypeError(f"table_rows: unsupported table {w.dtype} {tuple(w.shape)}")
    if kind in (KernelKind.I8, KernelKind.Q4):
        _dtype(torch.float32, scale)
        _check(scale is not None and scale.is_contiguous() and scale.size(0) == w.size(0),
               'int8/q4 table: contiguous per-row scales')
    d = w.size(1) * (2 if kind == KernelKind.Q4 else 1)
    ids = ids.contiguous()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= w.size(0)):
        raise IndexError(f"token id out of range [0, {w.size(0)})")
    out = torch.empty(ids.numel(), d)
    get_kernel().table_rows(kind, w.data_ptr(), scale.data_ptr() if scale is not None else None, ids.data_ptr(),
                            ids.numel(), d, out.data_ptr())
    return out


def rows_view(t: torch.Tensor, inner: int) -> tuple[torch.Tensor, int]:
    """t (b, l, ...) whose trailing `inner` elements per position are contiguous -> (t, stride between
    positions); copies only when positions are not evenly strided."""
    b, l = t.shape[:2]
    inner_ok = t[0, 0].is_contiguous() if b and l else True
    if not inner_ok or (b > 1 and l > 1 and t.stride(0) != l * t.stride(1)) or t.dtype != torch.float32:
        t = t.contiguous().float()
    return t, (t.stride(1) if l > 1 else t.stride(0) if b > 1 else inner)


def ssd_prefill(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                chunk_size: int, initial_state: torch.Tensor | None = None, D: torch.Tensor | None = None):
    """The chunked SSD scan fused in C for inference (the signature and result of ops.ssd_torch.ssd_chunked, plus
    the skip D x when D (h,) is given); x, B and C may be views into a wider (b, l, ·) tensor.  Returns None when
    it cannot run (no kernel, headdim not a multiple of 16, not fp32)."""
    _cpu(x, dt, A, B, C, initial_state, D)
    lib = get_kernel()
    if lib is None or any(t.dtype != torch.float32 for t in (x, dt, A, B, C)):
        return None
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    if p % SCAN_KERNEL_MULTIPLE or l == 0:
        return None
    x, x_rs = rows_view(x, h * p)
    B, bc_rs = rows_view(B, g * n)
    C, c_rs = rows_view(C, g * n)
    if c_rs != bc_rs:
        B, C = B.contiguous(), C.contiguous()
        bc_rs = g * n
    dt, A = dt.contiguous(), A.contiguous()
    init = initial_state.contiguous().float() if initial_state is not None else None
    D = D.detach().contiguous().float() if D is not None else None
    y = torch.empty(b, l, h, p)
    state = torch.empty(b, h, p, n)
    rc = lib.ssd_prefill(x.data_ptr(), dt.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(),
                         init.data_ptr() if init is not None else None, y.data_ptr(), state.data_ptr(),
                         b, l, h, p, g, n, chunk_size, x_rs, bc_rs, None, D.data_ptr() if D is not None else None)
    if rc == -1:
        return None      # a shape the kernel does not take: the caller uses the PyTorch scan
    check_rc(rc, "ssd_prefill")
    return y, state


def conv_silu_prefill(xbc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      prev: torch.Tensor | None):
    """Causal depthwise conv + SiLU over a sequence, in C.  xbc (b, l, conv_dim) (a view is fine), weight
    (conv_dim, 1, K), prev (b, conv_dim, K-1) or None -> (silu(conv) (b, l, conv_dim), new conv state)."""
    _cpu(xbc, weight, bias, prev)
    lib = get_kernel()
    if lib is None:
        return None
    b, l, cd = xbc.shape
    K = weight.size(-1)
    xbc, rs = rows_view(xbc, cd)
    w = weight.detach().reshape(cd, K).contiguous().float()
    bias = bias.detach().contiguous().float() if bias is not None else None
    prev = prev.contiguous().float() if prev is not None else None
    out = torch.empty(b, l, cd)
    new_state = torch.empty(b, cd, K - 1)
    rc = lib.conv_silu_prefill(xbc.data_ptr(), rs, prev.data_ptr() if prev is not None else None, w.data_ptr(),
                               bias.data_ptr() if bias is not None else None, out.data_ptr(), new_state.data_ptr(),
                               b, l, cd, K)
    if rc == -1:
        return None
    check_rc(rc, "conv_silu_prefill")
    return out, new_state


def f16_gemv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w (out, in) fp16, x (nb, in) fp32 -> x w^T (nb, out) fp32, the fp16 weights converted exactly."""
    _cpu(w, x)
    lib = get_kernel()
    _dtype(torch.float16, w)
    _check(w.is_contiguous(), 'contiguous fp16 weight')
    x = x.contiguous().float()
    y = torch.empty(x.size(0), w.size(0))
    lib.f16_gemv(w.data_ptr(), x.data_ptr(), y.data_ptr(), w.size(0), w.size(1), x.size(0))
    return y


def mixer_step_inplace(mixer, zxbcdt: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
    """Everything of Mamba2Mixer.step between in_proj and out_proj in one C call (conv, SSM step, D skip,
    gated RMSNorm); conv_state (contiguous fp32) and ssm_state (contiguous fp32, or bf16: stored in bf16, fp32
    arithmetic, each new value rounded once) are updated in place.  Returns y (b, d_inner)."""
    _cpu(zxbcdt, conv_state, ssm_state)
    _dtype(torch.float32, zxbcdt, conv_state)
    _check(ssm_state.dtype in (torch.float32, torch.bfloat16), 'fp32 or bf16 ssm_state')
    lib = get_kernel()
    c = mixer.cfg
    zxbcdt = zxbcdt.contiguous()
    _check(conv_state.is_contiguous() and ssm_state.is_contiguous(), 'contiguous states')
    nb = zxbcdt.size(0)
    y = torch.empty(nb, c.d_inner)
    work = torch.empty(c.conv_dim)
    params = [mixer.conv1d.weight, mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight]
    _dtype(torch.float32, *params)
    _check(all(t.is_contiguous() for t in params), 'contiguous parameters')
    bias = mixer.conv1d.bias
    fn = lib.mixer_step_inplace if ssm_state.dtype == torch.float32 else lib.mixer_step_inplace_bf16state
    fn(zxbcdt.data_ptr(), conv_state.data_ptr(), mixer.conv1d.weight.data_ptr(),
       bias.data_ptr() if bias is not None else None, mixer.dt_bias.data_ptr(),
       mixer.A_log.data_ptr(), mixer.D.data_ptr(), mixer.norm.weight.data_ptr(),
       ssm_state.data_ptr(), y.data_ptr(), work.data_ptr(),
       nb, c.d_inner, c.ngroups, c.d_state, c.nheads, c.headdim, c.d_conv, float(mixer.norm.eps))
    return y


def tq2_gemv_a8(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Like tq2_gemv, but with x quantized to int8 (one absmax scale per row) and integer dot products — the
    opt-in fast path (llama.cpp's TQ2_0 does the same); needs group_size % A8_GROUP_MULTIPLE == 0."""
    _cpu(codes, scales, x)
    _dtype(torch.uint8, codes)
    _dtype(torch.float32, scales)
    lib = get_kernel()
    _check(lib is not None and group_size % A8_GROUP_MULTIPLE == 0,
           'int8-activation GEMV: groups of a multiple of 128')
    x = x.contiguous().float()
    nb, in_f = x.shape
    out_f = codes.size(0)
    y = torch.empty(nb, out_f)
    # AVX512-VNNI and rows of a multiple of 256: the 512-bit kernel (csrc/decode_a8.c), the engine's choice too
    work = torch.empty(lib.a8z_work_bytes(in_f, nb), dtype=torch.int8)
    if lib.tq2_gemv_a8z_auto(codes.data_ptr(), scales.data_ptr(), x.data_ptr(), y.data_ptr(), work.data_ptr(),
                             out_f, in_f, group_size, nb) == 0:
        return y
    xq = torch.empty(nb, in_f, dtype=torch.int8)
    xs = torch.empty(nb)
    qsum = torch.empty(nb, in_f // group_size, dtype=torch.int32)
    lib.tq2_quantize_x(x.data_ptr(), xq.data_ptr(), xs.data_ptr(), qsum.data_ptr(), in_f, group_size, nb)
    lib.tq2_gemv_a8(codes.data_ptr(), scales.data_ptr(), xq.data_ptr(), xs.data_ptr(), qsum.data_ptr(), y.data_ptr(),
                    out_f, in_f, group_size, nb)
    return y

