"""The compiled kernels (csrc/*.c), built once with the system C compiler and loaded with ctypes:
tq2_gemv.c the ternary and int8 products and the fused mixer step; lm_step.c the whole-model decode step;
ssd_prefill.c the fused conv and chunked scan for inference (and the forward of training); ssd_train.c,
conv_train.c and norm_train.c the backward passes of training (and the norm's forward); losses.c cross-entropy and the distillation KL.  Built with
-march=native (AVX2 + FMA where the CPU has them, a portable loop otherwise) and OpenMP.  If no compiler is
available, `get_kernel()` returns None after one warning and callers use the pure-PyTorch reference."""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"   # every .c file here is built into one library
_lib = None
_tried = False


def _build_dir() -> Path:
    return Path(os.environ.get("TERNARY_MAMBA_CACHE", Path.home() / ".cache" / "ternary-mamba")) / "kernels"


def _cpu_flags() -> bytes:
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return next((line for line in f if line.startswith((b"flags", b"Features"))), b"")
    except OSError:
        return b""


def _compile() -> Path:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler found (gcc/cc/clang)")
    sources = sorted(CSRC.glob("*.c"))
    src = b"".join(p.read_bytes() for p in sorted(CSRC.iterdir()) if p.suffix in (".c", ".h"))
    flags = ["-O3", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c11"]   # fp-contract: a*b+c as one FMA
    # TERNARY_MAMBA_MARCH: the target instead of the build machine's (e.g. haswell = AVX2 without AVX-512, to
    # build for, or test the code paths of, older CPUs)
    march = os.environ.get("TERNARY_MAMBA_MARCH", "native")
    # the CPU's feature flags are part of the key: a cache shared between machines must not hand an AVX-512
    # build to an AVX2-only CPU
    tag = hashlib.sha256(src + cc.encode() + os.uname().machine.encode() + " ".join(flags).encode()
                         + march.encode() + _cpu_flags()).hexdigest()[:16]
    out = _build_dir() / f"kernels-{tag}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}.so")
    for extra in ([f"-march={march}", "-fopenmp"], ["-fopenmp"], []):
        r = subprocess.run([cc, *flags, *extra, *map(str, sources), "-o", str(tmp), "-lm"], capture_output=True, text=True)
        if r.returncode == 0:
            os.replace(tmp, out)
            return out
    raise RuntimeError(f"compiling {CSRC} failed: {r.stderr.strip().splitlines()[-1] if r.stderr else '?'}")


def get_kernel():
    """The loaded library, or None (after one warning) when it cannot be built."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("TERNARY_MAMBA_NO_KERNEL"):
        return None
    try:
        lib = ctypes.CDLL(str(_compile()))
    except (RuntimeError, OSError) as e:
        warnings.warn(f"ternary kernel unavailable ({e}); using the slower pure-PyTorch path", stacklevel=2)
        return None
    i64, p = ctypes.c_int64, ctypes.c_void_p
    lib.tq2_gemv.argtypes = [p, p, p, p, i64, i64, i64, i64]
    lib.tq2_gemv.restype = None
    lib.tq2_dequant.argtypes = [p, p, p, i64, i64, i64]
    lib.tq2_dequant.restype = None
    lib.ssd_step_inplace.argtypes = [p] * 7 + [i64] * 5
    lib.ssd_step_inplace.restype = None
    lib.mixer_step_inplace.argtypes = [p] * 11 + [i64] * 7 + [ctypes.c_float]
    lib.mixer_step_inplace.restype = None
    lib.tq2_quantize_x.argtypes = [p, p, p, p, i64, i64, i64]
    lib.tq2_quantize_x.restype = None
    lib.tq2_gemv_a8.argtypes = [p] * 6 + [i64] * 4
    lib.tq2_gemv_a8.restype = None
    lib.i8_gemv.argtypes = [p, p, p, p, i64, i64, i64]
    lib.i8_gemv.restype = None
    lib.ssd_prefill.argtypes = [p] * 8 + [i64] * 9 + [p, p]
    lib.ssd_backward.argtypes = [p, i64] + [p] * 11 + [i64] * 7
    lib.ssd_backward.restype = ctypes.c_int
    lib.conv_silu_backward.argtypes = [p, i64] + [p] * 8 + [i64] * 4
    lib.conv_silu_backward.restype = None
    f = ctypes.c_float
    lib.ce_forward.argtypes = [p, i64, p, p, p, i64, i64]
    lib.ce_backward.argtypes = [p, i64, p, p, f, p, i64, i64]
    lib.kl_forward.argtypes = [p, i64, p, i64, f, p, p, p, i64, i64]
    lib.kl_backward.argtypes = [p, i64, p, i64, f, p, p, f, p, i64, i64]
    lib.gated_norm_fwd.argtypes = [p, p, i64, p, p, p, i64, i64, i64, f]
    lib.gated_norm_bwd.argtypes = [p, p, i64] + [p] * 6 + [i64] * 3
    lib.rms_norm_fwd.argtypes = [p, p, p, p, i64, i64, f]
    lib.rms_norm_bwd.argtypes = [p] * 6 + [i64, i64]
    for fn in (lib.ce_forward, lib.ce_backward, lib.kl_forward, lib.kl_backward, lib.gated_norm_fwd, lib.gated_norm_bwd,
               lib.rms_norm_fwd, lib.rms_norm_bwd):
        fn.restype = None
    lib.conv_silu_prefill.argtypes = [p, i64, p, p, p, p, p, i64, i64, i64, i64]
    lib.conv_silu_prefill.restype = None
    lib.gated_norm_prefill.argtypes = [p, p, i64, p, i64, p, p, i64, i64, i64, i64, ctypes.c_float]
    lib.gated_norm_prefill.restype = None
    lib.ssd_prefill.restype = ctypes.c_int
    lib.f32_gemv.argtypes = [p, p, p, i64, i64, i64]
    lib.f16_gemv.argtypes = [p, p, p, i64, i64, i64]
    lib.f16_gemv.restype = None
    lib.f32_gemv.restype = None
    lib.tm_step.argtypes = [p, p, i64, p, p, p, p, p, p]
    lib.tm_step.restype = ctypes.c_int
    lib.tm_step_greedy.argtypes = [p, p, p, i64, p, p, i64, p, p, p, p, p, p]
    lib.tm_step_greedy.restype = ctypes.c_int
    lib.tm_work_floats.argtypes = [p, i64]
    lib.tm_work_floats.restype = i64
    lib.tm_qwork_bytes.argtypes = [p, i64]
    lib.tm_qwork_bytes.restype = i64
    lib.tq2_has_avx2.restype = ctypes.c_int
    _lib = lib
    return lib


def tq2_gemv(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes (out, in/4) uint8, scales (out, in/G) fp32, x (nb, in) fp32 -> y (nb, out) fp32."""
    lib = get_kernel()
    assert lib is not None
    x = x.contiguous()
    out_f, in_f = codes.size(0), codes.size(1) * 4
    y = torch.empty(x.size(0), out_f, dtype=torch.float32)
    lib.tq2_gemv(codes.data_ptr(), scales.data_ptr(), x.data_ptr(), y.data_ptr(), out_f, in_f, group_size, x.size(0))
    return y


def tq2_dequant(codes: torch.Tensor, scales: torch.Tensor, group_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """codes (out, in/4) uint8, scales (out, in/G) fp32 -> the fp32 weight (out, in)."""
    lib = get_kernel()
    assert lib is not None
    out_f, in_f = codes.size(0), codes.size(1) * 4
    w = out if out is not None else torch.empty(out_f, in_f, dtype=torch.float32)
    lib.tq2_dequant(codes.data_ptr(), scales.data_ptr(), w.data_ptr(), out_f, in_f, group_size)
    return w


def ssd_step_inplace(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, dA: torch.Tensor,
                     B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Fused recurrent step (see ssd.ssd_step for the reference); updates `state` in place, returns y."""
    lib = get_kernel()
    b, h, p, n = state.shape
    assert state.is_contiguous() and state.dtype == torch.float32
    x, dt, dA, B, C = (t.contiguous().float() for t in (x, dt, dA, B, C))
    y = torch.empty(b, h, p)
    lib.ssd_step_inplace(state.data_ptr(), x.data_ptr(), dt.data_ptr(), dA.data_ptr(), B.data_ptr(), C.data_ptr(),
                         y.data_ptr(), b, h, p, B.size(1), n)
    return y


def i8_gemv(w: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    lib = get_kernel()
    x = x.contiguous()
    y = torch.empty(x.size(0), w.size(0))
    lib.i8_gemv(w.data_ptr(), scale.data_ptr(), x.data_ptr(), y.data_ptr(), w.size(0), w.size(1), x.size(0))
    return y


def _rows(t: torch.Tensor, inner: int) -> tuple[torch.Tensor, int]:
    """t (b, l, ...) whose trailing `inner` elements per position are contiguous -> (t, stride between
    positions); copies only when positions are not evenly strided."""
    b, l = t.shape[:2]
    inner_ok = t[0, 0].is_contiguous() if b and l else True
    if not inner_ok or (b > 1 and l > 1 and t.stride(0) != l * t.stride(1)) or t.dtype != torch.float32:
        t = t.contiguous().float()
    return t, (t.stride(1) if l > 1 else t.stride(0) if b > 1 else inner)


def ssd_prefill(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                chunk_size: int, initial_state: torch.Tensor | None = None):
    """The chunked SSD scan fused in C for inference (same signature and result as ssd.ssd_chunked); x, B and C
    may be views into a wider (b, l, ·) tensor.  Returns None when it cannot run (no kernel, headdim not a
    multiple of 16, not fp32)."""
    lib = get_kernel()
    if lib is None or any(t.dtype != torch.float32 for t in (x, dt, A, B, C)):
        return None
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    if p % 16 or l == 0:
        return None
    x, x_rs = _rows(x, h * p)
    B, bc_rs = _rows(B, g * n)
    C, c_rs = _rows(C, g * n)
    if c_rs != bc_rs:
        B, C = B.contiguous(), C.contiguous()
        bc_rs = g * n
    dt, A = dt.contiguous(), A.contiguous()
    init = initial_state.contiguous().float() if initial_state is not None else None
    y = torch.empty(b, l, h, p)
    state = torch.empty(b, h, p, n)
    rc = lib.ssd_prefill(x.data_ptr(), dt.data_ptr(), A.data_ptr(), B.data_ptr(), C.data_ptr(),
                         init.data_ptr() if init is not None else None, y.data_ptr(), state.data_ptr(),
                         b, l, h, p, g, n, chunk_size, x_rs, bc_rs, None, None)
    return (y, state) if rc == 0 else None


def gated_norm_prefill(y: torch.Tensor, x: torch.Tensor, z: torch.Tensor, mixer) -> torch.Tensor:
    """GatedRMSNorm(y + D x, z) of a whole sequence in one C pass; y (b, l, h, p) contiguous is overwritten and
    returned as (b, l, d_inner).  x (b, l, h, p) and z (b, l, d_inner) may be views."""
    lib = get_kernel()
    c = mixer.cfg
    b, l = y.shape[:2]
    assert y.is_contiguous()
    x, x_rs = _rows(x, c.d_inner)
    z, z_rs = _rows(z, c.d_inner)
    D, w = mixer.D.detach().contiguous().float(), mixer.norm.weight.detach().contiguous().float()
    lib.gated_norm_prefill(y.data_ptr(), x.data_ptr(), x_rs, z.data_ptr(), z_rs, D.data_ptr(), w.data_ptr(),
                           b * l, c.nheads, c.headdim, c.ngroups, float(mixer.norm.eps))
    return y.view(b, l, c.d_inner)


def conv_silu_prefill(xbc: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      prev: torch.Tensor | None):
    """Causal depthwise conv + SiLU over a sequence, in C.  xbc (b, l, conv_dim) (a view is fine), weight
    (conv_dim, 1, K), prev (b, conv_dim, K-1) or None -> (silu(conv) (b, l, conv_dim), new conv state)."""
    lib = get_kernel()
    if lib is None:
        return None
    b, l, cd = xbc.shape
    K = weight.size(-1)
    xbc, rs = _rows(xbc, cd)
    w = weight.detach().reshape(cd, K).contiguous().float()
    bias = bias.detach().contiguous().float() if bias is not None else None
    prev = prev.contiguous().float() if prev is not None else None
    out = torch.empty(b, l, cd)
    new_state = torch.empty(b, cd, K - 1)
    lib.conv_silu_prefill(xbc.data_ptr(), rs, prev.data_ptr() if prev is not None else None, w.data_ptr(),
                          bias.data_ptr() if bias is not None else None, out.data_ptr(), new_state.data_ptr(),
                          b, l, cd, K)
    return out, new_state


def f16_gemv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w (out, in) fp16, x (nb, in) fp32 -> x w^T (nb, out) fp32, the fp16 weights converted exactly."""
    lib = get_kernel()
    assert w.dtype == torch.float16 and w.is_contiguous()
    x = x.contiguous().float()
    y = torch.empty(x.size(0), w.size(0))
    lib.f16_gemv(w.data_ptr(), x.data_ptr(), y.data_ptr(), w.size(0), w.size(1), x.size(0))
    return y


def mixer_step_inplace(mixer, zxbcdt: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
    """Everything of Mamba2Mixer.step between in_proj and out_proj in one C call (conv, SSM step, D skip,
    gated RMSNorm); conv_state / ssm_state (contiguous fp32) are updated in place.  Returns y (b, d_inner)."""
    lib = get_kernel()
    c = mixer.cfg
    zxbcdt = zxbcdt.contiguous()
    assert conv_state.is_contiguous() and ssm_state.is_contiguous() and zxbcdt.dtype == torch.float32
    nb = zxbcdt.size(0)
    y = torch.empty(nb, c.d_inner)
    work = torch.empty(c.conv_dim)
    params = [mixer.conv1d.weight, mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight]
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in params)
    bias = mixer.conv1d.bias
    lib.mixer_step_inplace(zxbcdt.data_ptr(), conv_state.data_ptr(), mixer.conv1d.weight.data_ptr(),
                           bias.data_ptr() if bias is not None else None, mixer.dt_bias.data_ptr(),
                           mixer.A_log.data_ptr(), mixer.D.data_ptr(), mixer.norm.weight.data_ptr(),
                           ssm_state.data_ptr(), y.data_ptr(), work.data_ptr(),
                           nb, c.d_inner, c.ngroups, c.d_state, c.nheads, c.headdim, c.d_conv, float(mixer.norm.eps))
    return y


def tq2_gemv_a8(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Like tq2_gemv, but with x quantized to int8 (one absmax scale per row) and integer dot products — the
    opt-in fast path (llama.cpp's TQ2_0 does the same); needs group_size % 128 == 0."""
    lib = get_kernel()
    assert lib is not None and group_size % 128 == 0
    x = x.contiguous().float()
    nb, in_f = x.shape
    out_f = codes.size(0)
    xq = torch.empty(nb, in_f, dtype=torch.int8)
    xs = torch.empty(nb)
    qsum = torch.empty(nb, in_f // group_size, dtype=torch.int32)
    lib.tq2_quantize_x(x.data_ptr(), xq.data_ptr(), xs.data_ptr(), qsum.data_ptr(), in_f, group_size, nb)
    y = torch.empty(nb, out_f)
    lib.tq2_gemv_a8(codes.data_ptr(), scales.data_ptr(), xq.data_ptr(), xs.data_ptr(), qsum.data_ptr(), y.data_ptr(),
                    out_f, in_f, group_size, nb)
    return y


def a8_reference(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Pure-PyTorch reference of tq2_gemv_a8 (same int8 rounding, exact integer group sums)."""
    from .quant.packing import unpack
    out_f, in_f = codes.size(0), codes.size(1) * 4
    t = unpack(codes.reshape(-1), "tq2", (out_f, in_f)).to(torch.int64)            # {-1, 0, 1}
    m = x.abs().amax(-1, keepdim=True)
    q = torch.round(x * torch.where(m > 0, 127.0 / m, torch.zeros_like(m))).to(torch.int64)   # (nb, in)
    G = group_size
    isum = torch.einsum("ogi,bgi->bog", t.view(out_f, in_f // G, G), q.view(-1, in_f // G, G))  # exact ints
    return (isum.double() * scales.double()).sum(-1).mul(m.double() / 127.0).float()
