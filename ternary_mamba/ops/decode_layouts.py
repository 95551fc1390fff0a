"""ctypes bindings of the decode engine's re-laid ternary kernels (csrc/decode_r4.c, csrc/decode_lut.c): the
packers that turn tq2 codes and fp32 scales into each kernel's layout once, and the products for tests and tools.
The engine (runtime/decode_engine.py) packs once and hands the layouts to lm_step.c; the plain tq2 kernels in
ops/kernels.py are their references."""
from __future__ import annotations

import torch

from .build import get_kernel
from .ctypes_checks import require as _check, require_cpu as _cpu, require_dtype as _dtype


def tq2r4_available() -> bool:
    """Whether this build has the row-interleaved int8-activation decode GEMV (csrc/decode_r4.c: AVX512-VNNI)."""
    lib = get_kernel()
    return lib is not None and bool(lib.tq2r4_available())


def tq2r4_pack(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """codes (out, in/4) uint8 tq2 and scales (out, in/G) fp32 -> the r4 layout of csrc/decode_r4.c: codes
    (ceil(out/4)*4, in/4) uint8 and fp16 scales (bit patterns, int16).  None where it does not apply: no kernel in
    this build, in or G not a multiple of 128, or a scale that is not exactly an fp16 value (packed files store
    fp16 scales, so theirs always are)."""
    _cpu(codes, scales)
    _dtype(torch.uint8, codes)
    _dtype(torch.float32, scales)
    lib = get_kernel()
    if lib is None:
        return None
    codes, scales = codes.contiguous(), scales.contiguous()
    out_f, in_f = codes.size(0), codes.size(1) * 4
    _check(scales.shape == (out_f, in_f // group_size), 'scales (out, in / group_size)')
    out4 = (out_f + 3) // 4 * 4
    dst = torch.empty(out4, in_f // 4, dtype=torch.uint8)
    dsc = torch.empty(out4 // 4, in_f // group_size, 4, dtype=torch.int16)
    rc = lib.tq2r4_pack(codes.data_ptr(), scales.data_ptr(), dst.data_ptr(), dsc.data_ptr(), out_f, in_f, group_size)
    return (dst, dsc) if rc == 0 else None


def tq2r4_gemv(packed: tuple[torch.Tensor, torch.Tensor], out_features: int, x: torch.Tensor,
               group_size: int) -> torch.Tensor:
    """x (nb, in) fp32 through tq2r4_pack's layout -> (nb, out): int8 activations, as tq2_gemv_a8 (same quantized
    values and integer sums; fp32 sums in another order)."""
    codes, sc = packed
    _cpu(codes, sc, x)
    _dtype(torch.float32, x)
    lib = get_kernel()
    x = x.contiguous()
    nb, in_f = x.shape
    _check(codes.size(1) * 4 == in_f and codes.size(0) >= out_features > codes.size(0) - 4, 'r4 codes match x')
    y = torch.empty(nb, out_features)
    work = torch.empty(lib.tq2r4_work_bytes(in_f, nb), dtype=torch.int8)
    rc = lib.tq2r4_gemv_auto(codes.data_ptr(), sc.data_ptr(), x.data_ptr(), y.data_ptr(), work.data_ptr(),
                             out_features, in_f, group_size, nb)
    _check(rc == 0, 'the r4 kernel in this build (tq2r4_available) and in, G multiples of 128')
    return y


def tq2lut_available() -> bool:
    """Whether this build has the exact table-lookup decode GEMV (csrc/decode_lut.c: AVX-512)."""
    lib = get_kernel()
    return lib is not None and bool(lib.tq2lut_available())


def tq2lut_pack(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """codes (out, in/4) uint8 tq2 and scales (out, in/G) fp32 -> csrc/decode_lut.c's layout: per 16-row block and
    quad of inputs, 16 bytes of pos | neg << 4 masks, and fp16 scales (bit patterns, int16) per block, group and
    row.  None where it does not apply: no kernel in this build, G not a multiple of 8, or a scale that is not
    exactly an fp16 value."""
    _cpu(codes, scales)
    _dtype(torch.uint8, codes)
    _dtype(torch.float32, scales)
    lib = get_kernel()
    if lib is None:
        return None
    codes, scales = codes.contiguous(), scales.contiguous()
    out_f, in_f = codes.size(0), codes.size(1) * 4
    _check(scales.shape == (out_f, in_f // group_size), 'scales (out, in / group_size)')
    nblk = (out_f + 15) // 16
    dst = torch.empty(nblk, in_f // 4, 16, dtype=torch.uint8)
    dsc = torch.empty(nblk, in_f // group_size, 16, dtype=torch.int16)
    rc = lib.tq2lut_pack(codes.data_ptr(), scales.data_ptr(), dst.data_ptr(), dsc.data_ptr(), out_f, in_f, group_size)
    return (dst, dsc) if rc == 0 else None


def tq2lut_gemv(packed: tuple[torch.Tensor, torch.Tensor], out_features: int, x: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """x (nb, in) fp32 through tq2lut_pack's layout -> (nb, out): the exact product (fp32 activations), as tq2_gemv
    up to fp32 summation order."""
    codes, sc = packed
    _cpu(codes, sc, x)
    _dtype(torch.float32, x)
    lib = get_kernel()
    x = x.contiguous()
    nb, in_f = x.shape
    _check(codes.size(1) * 4 == in_f and codes.size(0) * 16 >= out_features > codes.size(0) * 16 - 16,
           'lut codes match x')
    y = torch.empty(nb, out_features)
    work = torch.empty(lib.tq2lut_work_bytes(in_f, nb), dtype=torch.int8)
    rc = lib.tq2lut_gemv(codes.data_ptr(), sc.data_ptr(), x.data_ptr(), y.data_ptr(), work.data_ptr(),
                         out_features, in_f, group_size, nb)
    _check(rc == 0, 'the lut kernel in this build (tq2lut_available) and G a multiple of 8')
    return y
