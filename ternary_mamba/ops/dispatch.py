"""The one place that decides which implementation runs: a compiled C kernel or the PyTorch reference.

- `kernels_for(*tensors)`: the C kernels may take these tensors — the library is built, no reference path is
  in force, and every tensor is a CPU tensor of the dtype the kernels were written for (fp32 unless told).
  Anything else (CUDA, meta, bf16/fp16 tensors) takes the PyTorch path; C never sees a foreign pointer.
- `reference_path()`: a context manager that forces the pure-PyTorch reference everywhere inside it —
  the model's scan, conv and norms, packed linears, heads, losses and the whole-model decode engine.
  `reference_path("sequential")` also replaces the chunked scan by the token-by-token recurrence.
  The environment variable TERNARY_MAMBA_REFERENCE=1 (or =sequential) sets the same switch for a process.
- `group_paths(G)`: which kernel paths a ternary group size can take (the exact GEMV and decode engine, the
  int8-activation GEMV, llama.cpp's TQ blocks); every caller asks here instead of testing `G % n` itself.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch

from .build import get_kernel

GEMV_MAX_ROWS = 16           # up to this many rows (tokens) per call use the GEMV kernels; more use a GEMM
REFERENCE_KINDS = ("torch", "sequential")
_stack: list[str] = []       # innermost reference_path() last


def _env_reference() -> str | None:
    v = os.environ.get("TERNARY_MAMBA_REFERENCE") or ("torch" if os.environ.get("TERNARY_MAMBA_NO_KERNEL") else "")
    if not v or v == "0":
        return None
    return "sequential" if v == "sequential" else "torch"


@contextlib.contextmanager
def reference_path(kind: str = "torch") -> Iterator[None]:
    """Run the pure-PyTorch reference inside the block ("torch": chunked scan; "sequential": step by step)."""
    if kind not in REFERENCE_KINDS:
        raise ValueError(f"reference_path({kind!r}): choose one of {REFERENCE_KINDS}")
    _stack.append(kind)
    try:
        yield
    finally:
        _stack.pop()


def reference_kind() -> str | None:
    """None when fast paths may run, else "torch" or "sequential"."""
    return _stack[-1] if _stack else _env_reference()


def kernels_available() -> bool:
    """The compiled library is built and no reference path is in force."""
    return reference_kind() is None and get_kernel() is not None


def kernels_for(*tensors: torch.Tensor | None, dtype: torch.dtype | None = torch.float32) -> bool:
    """True when the C kernels may take these tensors (None entries are skipped): kernels available, every
    tensor on the CPU and (unless dtype is None) of `dtype`."""
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or (dtype is not None and t.dtype != dtype):
            return False
    return kernels_available()


@dataclass(frozen=True)
class GroupPaths:
    """Kernel paths open to ternary weights with one scale per `group_size` weights along a row."""
    group_size: int
    gemv: bool       # exact ternary GEMV and the whole-model decode engine (csrc/tq2_gemv.c, lm_step.c)
    gemv_a8: bool    # the int8-activation GEMV (opt-in, not bit-exact): integer sums per group of 128
    gguf_tq: bool    # llama.cpp's TQ1_0 / TQ2_0 (blocks of 256 weights, one scale each) hold it exactly


def group_paths(group_size: int) -> GroupPaths:
    G = int(group_size)
    if G < 1:
        raise ValueError(f"group size {G} must be resolved (>= 1) before asking for kernel paths")
    return GroupPaths(G, gemv=G % 8 == 0, gemv_a8=G % 128 == 0, gguf_tq=G % 256 == 0)
