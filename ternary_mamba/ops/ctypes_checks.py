"""What every ctypes binding checks before it hands a tensor's memory to C (ops/kernels.py, ops/decode_layouts.py):
CPU memory, the dtype the C code reads, and each kernel's preconditions (exceptions, not asserts)."""
from __future__ import annotations

import torch


def require_cpu(*tensors: torch.Tensor | None) -> None:
    """Every tensor handed to C lives in CPU memory (a device pointer would crash the process or read garbage)."""
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            raise TypeError(f"C kernel given a {t.device.type} tensor {tuple(t.shape)}; only CPU tensors are accepted")


def require(ok: bool, what: str) -> None:
    """A precondition of a C kernel (an exception, not an assert: it must hold under `python -O` too)."""
    if not ok:
        raise ValueError(f"C kernel precondition failed: {what}")


def require_dtype(dtype: torch.dtype, *tensors: torch.Tensor | None) -> None:
    """Tensors whose memory C reads as `dtype` (no conversion happens on the way)."""
    for t in tensors:
        if t is not None and t.dtype != dtype:
            raise TypeError(f"C kernel expects {dtype} but was given {t.dtype} {tuple(t.shape)}")
