"""Building and loading the compiled kernels (csrc/*.c), once with the system C compiler and loaded with ctypes.
The sources, one concept each: tq2_gemv.c (ternary GEMV, exact and int8-activation), decode_a8.c and
decode_r32.c (the decode engine's int8-activation GEMVs: plane layout, and 32 rows interleaved, fp16 scales),
decode_lut.c (its exact GEMV by triple-sum tables), tq2_bf16.c (bf16-activation
GEMV), tq2_gemm_a8.c (int8 prefill GEMM), dense_gemv.c (fp32 / fp16 / int8 GEMVs), ssm_step.c (the SSM step),
mixer_step.c (a mixer's whole step), lm_step.c (the one-call decode step), ssd_prefill.c (conv and chunked scan),
ssd_train.c, conv_train.c, norm_train.c (training's backward passes and the norms), losses.c (CE and KL),
tables.c (quantized embedding rows), bandwidth.c (the benchmarks' probe), threads.c.  Built with -march=native
(AVX2 + FMA where the CPU has them, a portable loop otherwise) and OpenMP.  If no compiler is available,
`get_kernel()` returns None after one warning and callers use the pure-PyTorch reference (where
TERNARY_MAMBA_REQUIRE_KERNELS=1, it raises).  Callers never ask this module whether to use a kernel: each op's
dispatcher decides (ops/dispatch.py: device, dtype, the reference-path switch)."""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(so: Path) -> bool:
    """The cached library is the one that was built: its hash sidecar matches (a truncated or tampered file,
    which would crash the process when loaded, is rebuilt instead)."""
    side = so.with_suffix(".so.sha256")
    try:
        return side.read_text().strip() == _sha256(so)
    except OSError:
        return False


def _check_cache_dir(d: Path) -> None:
    """A cache others can write to could hand us their code to load: refuse it."""
    st = d.stat()
    if st.st_mode & 0o022 and not os.environ.get("TERNARY_MAMBA_ALLOW_SHARED_CACHE"):
        raise RuntimeError(f"the kernel cache {d} is group- or world-writable; chmod go-w it, or point "
                           "TERNARY_MAMBA_CACHE elsewhere")


def _fsync(path: Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _strict() -> bool:
    """TERNARY_MAMBA_REQUIRE_KERNELS=1 (the tests and CI, where a compiler exists): a kernel build that fails
    raises, with the compiler's first error, instead of falling back to a portable build or to PyTorch."""
    return os.environ.get("TERNARY_MAMBA_REQUIRE_KERNELS") == "1"


def _first_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    return next((ln for ln in lines if "error" in ln), lines[-1] if lines else "?")


def _compile() -> Path:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler found (gcc/cc/clang)")
    sources = sorted(CSRC.glob("*.c"))
    src = b"".join(p.read_bytes() for p in sorted(CSRC.iterdir()) if p.suffix in (".c", ".h"))
    flags = ["-O3", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c11", "-Wno-psabi"]   # a*b+c as one FMA
    if os.environ.get("TERNARY_MAMBA_SANITIZE"):   # AddressSanitizer build (scripts/test_asan.sh)
        flags = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-shared", "-fPIC", "-std=c11"]
    # TERNARY_MAMBA_MARCH: the target instead of the build machine's (e.g. haswell = AVX2 without AVX-512, to
    # build for, or test the code paths of, older CPUs)
    march = os.environ.get("TERNARY_MAMBA_MARCH", "native")
    # the CPU's feature flags are part of the key: a cache shared between machines must not hand an AVX-512
    # build to an AVX2-only CPU
    tag = hashlib.sha256(src + cc.encode() + os.uname().machine.encode() + " ".join(flags).encode()
                         + march.encode() + _cpu_flags()).hexdigest()[:16]
    out = _build_dir() / f"kernels-{tag}.so"
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    _check_cache_dir(out.parent)
    if out.exists() and _intact(out):
        return out
    tmp = out.with_suffix(f".tmp{os.getpid()}.so")
    try:
        attempts = [[f"-march={march}", "-fopenmp"]] + ([] if _strict() else [["-fopenmp"], []])
        first_error = None
        for extra in attempts:
            r = subprocess.run([cc, *flags, *extra, *map(str, sources), "-o", str(tmp), "-lm"], capture_output=True,
                               text=True)
            if r.returncode and first_error is None:
                first_error = _first_error(r.stderr)
            if r.returncode == 0:
                if first_error is not None:      # a generic build runs, but 1.5-3x slower: say so, once per build
                    from ..log import logger
                    logger.warning("C kernels built without -march=%s (%s): the portable, slower code paths run",
                                   march, first_error[:200])
                side = out.with_suffix(".so.sha256")
                side_tmp = side.with_suffix(f".tmp{os.getpid()}")
                side_tmp.write_text(_sha256(tmp) + "\n")
                _fsync(tmp)
                _fsync(side_tmp)
                os.replace(tmp, out)            # the library first: a sidecar never vouches for a missing file
                os.replace(side_tmp, side)
                _fsync(out.parent)
                return out
    finally:
        tmp.unlink(missing_ok=True)
    raise RuntimeError(f"compiling {CSRC} with {cc} -march={march} failed: {_first_error(r.stderr)}")


def _load():
    so = _compile()
    try:
        return ctypes.CDLL(str(so))
    except OSError:                   # unloadable although its hash matched (e.g. another libc): build again
        so.unlink(missing_ok=True)
        so.with_suffix(".so.sha256").unlink(missing_ok=True)
        return ctypes.CDLL(str(_compile()))


def get_kernel():
    """The loaded library, or None (after one warning) when it cannot be built."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    try:
        lib = _load()
    except (RuntimeError, OSError) as e:
        if _strict():
            raise RuntimeError(f"{e} (TERNARY_MAMBA_REQUIRE_KERNELS=1: no fallback)") from e
        from ..log import logger    # one line (the CLI's handler prints it on stderr), not a warning's two
        logger.warning("ternary kernels unavailable (%s); using the slower pure-PyTorch path",
                       str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
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
    lib.mixer_step_inplace_bf16state.argtypes = [p] * 11 + [i64] * 7 + [ctypes.c_float]
    lib.mixer_step_inplace_bf16state.restype = None
    lib.tq2_quantize_x.argtypes = [p, p, p, p, i64, i64, i64]
    lib.tq2_quantize_x.restype = None
    lib.tq2_gemv_a8.argtypes = [p] * 6 + [i64] * 4
    lib.tq2_gemv_a8.restype = None
    lib.i8_gemv.argtypes = [p, p, p, p, i64, i64, i64]
    lib.i8_gemv.restype = None
    lib.tq2_gemv_bf16.argtypes = [p, p, p, p, i64, i64, i64, i64]
    lib.tq2_gemv_bf16.restype = None
    lib.tq2_dequant_bf16.argtypes = [p, p, p, i64, i64, i64]
    lib.tq2_dequant_bf16.restype = None
    lib.tq2_has_bf16.restype = ctypes.c_int
    lib.stream_read.argtypes, lib.stream_read.restype = [p, i64], ctypes.c_float
    lib.vector_probe.argtypes, lib.vector_probe.restype = [i64], ctypes.c_float
    lib.stream_ranges.argtypes, lib.stream_ranges.restype = [p, p, p, i64, i64], i64
    lib.tq2_gemm_a8.argtypes, lib.tq2_gemm_a8.restype = [p, p, p, p, i64, i64, i64, i64], ctypes.c_int
    lib.tq2_has_vnni512.restype = ctypes.c_int
    lib.q4_a8_kernel.restype = ctypes.c_int
    lib.q4_gemv.argtypes = [p, p, p, p, p, i64, i64, i64]
    lib.q4_gemv.restype = None
    lib.a8z_work_bytes.argtypes = [i64, i64]
    lib.a8z_work_bytes.restype = i64
    lib.tq2_gemv_a8z_auto.argtypes = [p] * 5 + [i64] * 4
    lib.tq2_gemv_a8z_auto.restype = ctypes.c_int
    lib.tq2r32_available.restype = ctypes.c_int
    lib.tq2lut_available.restype = ctypes.c_int
    lib.tq2lut_pack.argtypes, lib.tq2lut_pack.restype = [p] * 4 + [i64] * 3, ctypes.c_int
    lib.tq2lut_block_bytes.argtypes, lib.tq2lut_block_bytes.restype = [i64, i64], i64
    lib.tq2lut_work_bytes.argtypes, lib.tq2lut_work_bytes.restype = [i64, i64], i64
    lib.tq2lut_gemv.argtypes, lib.tq2lut_gemv.restype = [p] * 5 + [i64] * 4, ctypes.c_int
    lib.tq2r32_pack.argtypes, lib.tq2r32_pack.restype = [p] * 4 + [i64] * 3, ctypes.c_int
    lib.tq2r32_work_bytes.argtypes, lib.tq2r32_work_bytes.restype = [i64, i64], i64
    lib.tq2r32_gemv_auto.argtypes, lib.tq2r32_gemv_auto.restype = [p] * 5 + [i64] * 4, ctypes.c_int
    lib.q4_gemv_a8_auto.argtypes = [p] * 5 + [i64] * 3
    lib.q4_gemv_a8_auto.restype = ctypes.c_int
    lib.table_rows.argtypes = [i64, p, p, p, i64, i64, p]
    lib.table_rows.restype = None
    lib.ssd_prefill.argtypes = [p] * 8 + [i64] * 9 + [p, p]
    lib.ssd_backward.argtypes = [p, i64] + [p] * 11 + [i64] * 7
    lib.ssd_backward.restype = ctypes.c_int
    lib.conv_silu_backward.argtypes = [p, i64] + [p] * 8 + [i64] * 4
    lib.conv_silu_backward.restype = ctypes.c_int
    f = ctypes.c_float
    lib.ce_forward.argtypes = [p, i64, p, p, p, i64, i64]
    lib.ce_backward.argtypes = [p, i64, p, p, f, p, i64, i64]
    lib.kl_forward.argtypes = [p, i64, p, i64, f, p, p, p, i64, i64]
    lib.kl_backward.argtypes = [p, i64, p, i64, f, p, p, f, p, i64, i64]
    lib.gated_norm_fwd.argtypes = [p, p, i64, p, p, p, i64, i64, i64, f]
    lib.gated_norm_bwd.argtypes = [p, p, i64] + [p] * 6 + [i64] * 3
    lib.rms_norm_fwd.argtypes = [p, p, p, p, i64, i64, f]
    lib.rms_norm_bwd.argtypes = [p] * 6 + [i64, i64]
    for fn in (lib.ce_forward, lib.ce_backward, lib.kl_forward, lib.kl_backward, lib.gated_norm_fwd, lib.rms_norm_fwd):
        fn.restype = None
    lib.gated_norm_bwd.restype = lib.rms_norm_bwd.restype = ctypes.c_int
    lib.conv_silu_prefill.argtypes = [p, i64, p, p, p, p, p, i64, i64, i64, i64]
    lib.conv_silu_prefill.restype = ctypes.c_int
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
    lib.tm_set_threads.argtypes, lib.tm_set_threads.restype = [i64], None
    lib.tm_get_threads.argtypes, lib.tm_get_threads.restype = [], i64
    lib.tm_abi.argtypes, lib.tm_abi.restype = [p, i64], i64
    from .abi import check_abi
    check_abi(lib)                    # the structs and kinds the Python side writes are the ones C reads
    import torch
    lib.tm_set_threads(torch.get_num_threads())   # the kernels follow torch's thread count
    _lib = lib
    return lib


def set_threads(n: int) -> None:
    """Threads of torch *and* of the C kernels (which run on their own OpenMP runtime): what `--threads` sets."""
    import torch
    torch.set_num_threads(n)
    lib = get_kernel() if _tried else None    # not loaded yet: it takes torch's count when it loads
    if lib is not None:
        lib.tm_set_threads(n)


def kernel_threads() -> int:
    lib = get_kernel()
    return int(lib.tm_get_threads()) if lib is not None else 0


def check_rc(rc: int, what: str) -> None:
    """A kernel's status: 0 ok; -2 out of memory (a clean error, nothing written); anything else a bug."""
    if rc == 0:
        return
    if rc == -2:
        from ..errors import UserError
        raise UserError(f"{what}: out of memory in the C kernel; lower --batch-size / --seq-len / --chunk-size")
    raise RuntimeError(f"{what}: C kernel returned {rc}")
