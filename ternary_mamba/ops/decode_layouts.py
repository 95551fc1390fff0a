"""ctypes bindings of the decode engine's re-laid ternary kernels (csrc/decode_r32.c, csrc/decode_lut.c): the
packers that turn tq2 codes and fp32 scales into each kernel's layout once, and the products for tests and tools.
The engine (runtime/decode_engine.py) packs once and hands the layouts to lm_step.c; the plain tq2 kernels in
ops/kernels.py are their references.

  r32  int8 activations; rows in blocks of 32, code bytes interleaved per dword (one vpdpbusd lane = one row, one
       broadcast activation dword for all 32); G a multiple of 16; AVX512-VNNI, or AVX2 + FMA + F16C
       (vpmaddubsw).
  lut  exact (fp32 activations) by 27-entry tables of the sums over each triple of inputs; rows in blocks of 64,
       one 5-bit index per row and triple, six per dword; G a multiple of 16 (at most tq2's bytes, equal at 128);
       AVX-512.
Both keep the scales in fp16 (the packed file's precision): a scale that is not exactly an fp16 value declines."""
from __future__ import annotations

import torch

from .build import get_kernel
from .ctypes_checks import require as _check, require_cpu as _cpu, require_dtype as _dtype

ROWS_PER_BLOCK = {"r32": 32, "lut": 64}


def block_bytes(layout: str, in_features: int, group_size: int) -> int:
    """Bytes of the layout's codes per block of rows."""
    if layout == "lut":
        return int(get_kernel().tq2lut_block_bytes(in_features, group_size))
    return in_features // 4 * ROWS_PER_BLOCK[layout]


def available(layout: str) -> bool:
    """Whether this build has the layout's kernel."""
    lib = get_kernel()
    return lib is not None and bool(getattr(lib, f"tq2{layout}_available")())


def pack(layout: str, codes: torch.Tensor, scales: torch.Tensor,
         group_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """codes (out, in/4) uint8 tq2 and scales (out, in/G) fp32 -> the layout's codes (blocks of rows, in/4 bytes
    per row) and fp16 scales (bit patterns, int16: blocks, in/G, rows per block).  None where it does not apply
    (no kernel in this build, a shape it was not written for, a scale that is not exactly an fp16 value)."""
    _cpu(codes, scales)
    _dtype(torch.uint8, codes)
    _dtype(torch.float32, scales)
    lib = get_kernel()
    if lib is None:
        return None
    codes, scales = codes.contiguous(), scales.contiguous()
    out_f, in_f = codes.size(0), codes.size(1) * 4
    _check(scales.shape == (out_f, in_f // group_size), 'scales (out, in / group_size)')
    rows, nbytes = ROWS_PER_BLOCK[layout], block_bytes(layout, in_f, group_size)
    if nbytes <= 0:
        return None
    nblk = (out_f + rows - 1) // rows
    dst = torch.empty(nblk, nbytes, dtype=torch.uint8)
    dsc = torch.empty(nblk, in_f // group_size, rows, dtype=torch.int16)
    rc = getattr(lib, f"tq2{layout}_pack")(codes.data_ptr(), scales.data_ptr(), dst.data_ptr(), dsc.data_ptr(),
                                           out_f, in_f, group_size)
    return (dst, dsc) if rc == 0 else None


def gemv(layout: str, packed: tuple[torch.Tensor, torch.Tensor], out_features: int, x: torch.Tensor,
         group_size: int) -> torch.Tensor:
    """x (nb, in) fp32 through `pack`'s layout -> (nb, out).  r32: int8 activations, the same quantized values and
    integer sums as tq2_gemv_a8; lut: the exact product, as tq2_gemv; both up to fp32 summation order."""
    codes, sc = packed
    _cpu(codes, sc, x)
    _dtype(torch.float32, x)
    lib = get_kernel()
    x = x.contiguous()
    nb, in_f = x.shape
    rows = ROWS_PER_BLOCK[layout]
    _check(codes.size(1) == block_bytes(layout, in_f, group_size)
           and codes.size(0) * rows >= out_features > (codes.size(0) - 1) * rows, f'{layout} codes match x')
    y = torch.empty(nb, out_features)
    work = torch.empty(getattr(lib, f"tq2{layout}_work_bytes")(in_f, nb), dtype=torch.int8)
    fn = lib.tq2r32_gemv_auto if layout == "r32" else lib.tq2lut_gemv       # the same arguments
    rc = fn(codes.data_ptr(), sc.data_ptr(), x.data_ptr(), y.data_ptr(), work.data_ptr(), out_features, in_f,
            group_size, nb)
    _check(rc == 0, f'the {layout} kernel in this build and a group size it was written for')
    return y
