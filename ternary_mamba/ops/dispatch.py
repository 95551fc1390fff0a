"""The one place that decides which implementation runs: a compiled C kernel or the PyTorch reference.

- `kernels_for(*tensors)`: the C kernels may take these tensors — the library is built, no reference path is
  in force, and every tensor is a CPU tensor of the dtype the kernels were written for (fp32 unless told).
  Anything else (CUDA, meta, bf16/fp16 tensors) takes the PyTorch path; C never sees a foreign pointer.
- `reference_path()`: a context manager that forces the pure-PyTorch reference everywhere inside it —
  the model's scan, conv and norms, packed linears, heads, losses and the whole-model decode engine.
  `reference_path("sequential")` also replaces the chunked scan by the token-by-token recurrence.
  The environment variable TERNARY_MAMBA_REFERENCE=1 (or =sequential) sets the same switch for a process.
- `triton_for(*tensors)` / `mamba_ssm_scan()`: the GPU side of the same decision — our Triton kernels
  (ops/triton_kernels.py) for CUDA tensors when triton imports, and mamba_ssm's fused chunked scan when it
  imports (the `gpu` extra); otherwise the PyTorch path, as everywhere off the CPU.
Which kernel paths a ternary group size can take is a fact of the format: `spec.group_paths(G)`.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator

import torch

from .build import get_kernel

REFERENCE_KINDS = ("torch", "sequential")
_stack: list[str] = []       # innermost reference_path() last


ENV_REFERENCE = {"": None, "0": None, "1": "torch", "torch": "torch", "sequential": "sequential"}


def _env_reference() -> str | None:
    v = os.environ.get("TERNARY_MAMBA_REFERENCE") or ("torch" if os.environ.get("TERNARY_MAMBA_NO_KERNEL") else "")
    if v not in ENV_REFERENCE:
        from ..errors import UserError
        raise UserError(f"TERNARY_MAMBA_REFERENCE={v!r}: use 1 (or torch), sequential, or 0 / unset")
    return ENV_REFERENCE[v]


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


_last_impl: dict[str, str] = {}
_impl_counts: dict[str, dict[str, int]] = {}


def ran(op: str, impl: str) -> None:
    """Each op's dispatcher says which implementation it ran (cheap: a dictionary update)."""
    _last_impl[op] = impl
    c = _impl_counts.setdefault(op, {})
    c[impl] = c.get(impl, 0) + 1


def last_impl(op: str) -> str | None:
    """The implementation the latest call of `op` ran, e.g. last_impl("ssd_scan") == "c-train"."""
    return _last_impl.get(op)


def impls_run() -> dict[str, dict[str, int]]:
    """{op: {implementation: calls}} in this process: what a run records (summary.json "kernel_paths")."""
    return {op: dict(c) for op, c in _impl_counts.items()}


_optional: dict[str, object] = {}


def _try_import(name: str):
    """An optional module, or None: silently when it is not installed, with one warning when it is installed but
    fails to import (a broken CUDA extension, a version mismatch): never a silent fallback from a broken install."""
    if name not in _optional:
        import importlib
        try:
            _optional[name] = importlib.import_module(name)
        except ModuleNotFoundError as e:
            _optional[name] = None
            if e.name is not None and not name.startswith(e.name) and not e.name.startswith(name.split(".")[0]):
                warnings.warn(f"{name} is installed but needs {e.name}: using the PyTorch path", stacklevel=2)
        except Exception as e:  # noqa: BLE001 - installed but broken
            _optional[name] = None
            warnings.warn(f"{name} is installed but failed to import ({type(e).__name__}: {str(e)[:160]}); "
                          "using the PyTorch path", stacklevel=2)
    return _optional[name]


def triton_for(*tensors: torch.Tensor | None) -> bool:
    """True when our Triton kernels may take these tensors: all on CUDA, no reference path, triton importable."""
    if reference_kind() is not None:
        return False
    if not all(t is None or t.device.type == "cuda" for t in tensors):
        return False
    return _try_import("ternary_mamba.ops.triton_kernels") is not None


def triton_kernels():
    return _try_import("ternary_mamba.ops.triton_kernels")


def triton_conv():
    """ops/triton_conv.py (the causal conv + SiLU's Triton kernels), or None where triton does not import."""
    return _try_import("ternary_mamba.ops.triton_conv")


def triton_norms():
    """ops/triton_norms.py (the RMS norms' Triton kernels), or None where triton does not import."""
    return _try_import("ternary_mamba.ops.triton_norms")


def triton_scan():
    """ops/triton_scan.py (the SSD scan's forward in Triton, for tensors that need no gradient), or None."""
    return _try_import("ternary_mamba.ops.triton_scan")


def mamba_ssm_scan(x: torch.Tensor):
    """mamba_ssm's `mamba_chunk_scan_combined` for CUDA tensors when it imports, else None (untested here: it
    cannot be imported without CUDA)."""
    if reference_kind() is not None or x.device.type != "cuda":
        return None
    mod = _try_import("mamba_ssm.ops.triton.ssd_combined")
    return getattr(mod, "mamba_chunk_scan_combined", None) if mod is not None else None


def cpu_has_bf16_kernels() -> bool:
    """The compiled kernels use AVX512-BF16 dot products (else the bf16-activation GEMV runs a portable loop)."""
    from .build import get_kernel
    lib = get_kernel()
    return bool(lib is not None and lib.tq2_has_bf16())


def cpu_has_vnni512() -> bool:
    """The compiled kernels use AVX512-VNNI (the 512-bit int8-activation decode GEMVs of csrc/decode_a8.c)."""
    from .build import get_kernel
    lib = get_kernel()
    return bool(lib is not None and lib.tq2_has_vnni512())


def q4_a8_kernel() -> str | None:
    """The int8-activation kernel of the 4-bit head in this build: "vnni512", "avx2" (vpmaddubsw), or None (the
    head multiplies in fp32)."""
    from .build import get_kernel
    lib = get_kernel()
    return {2: "vnni512", 1: "avx2"}.get(int(lib.q4_a8_kernel())) if lib is not None else None
