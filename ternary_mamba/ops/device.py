"""Where and in what precision a command computes: `--device` and `--dtype`.

- `resolve_device(None)`: `cuda` when available (under torchrun `cuda:LOCAL_RANK`), else `cpu`.
- `DTYPES`: the names the CLI takes.  Master weights and optimizer state stay fp32 whatever the dtype; the
  forward runs under `autocast(device, dtype)` (a no-op for fp32, and on devices autocast does not know, such as
  `meta`); a frozen teacher is stored in the 16-bit dtype itself (the paper's FP16 teacher).
- `check_precision`: a one-line error for combinations that cannot work (CUDA requested without CUDA), and a
  warning where a dtype is slow on this CPU (bf16 without AVX512-BF16, fp16 on any CPU).
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from ..errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST_DEVICES = ("cpu", "cuda")


def resolve_device(spec: str | None = None) -> torch.device:
    if spec is None or spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's parameters live (the device its inputs must be moved to)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def scalar(t: torch.Tensor) -> float:
    """A 0-d tensor as a Python float for logs (nan on `meta`, which holds no values: a meta run logs nothing)."""
    return float("nan") if t.device.type == "meta" else t.item()


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """The forward's precision context: autocast to a 16-bit dtype, or nothing for fp32 / unknown devices."""
    if dtype == torch.float32 or device.type not in AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def full_precision(device_type: str):
    """Inside an autocast region: compute in fp32 (the SSD scan, its conv and norms, as mamba_ssm does)."""
    if device_type not in AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(flag in line.split() for line in f if line.startswith("flags"))
    except OSError:
        return False


def check_precision(device: torch.device, dtype_name: str) -> str | None:
    """Raise ValueError for what cannot run; return a warning (also issued) for what runs slowly."""
    if device.type not in ("cpu", "cuda"):
        avail = "cpu" + (", cuda" if torch.cuda.is_available() else "")
        raise ValueError(f"--device {device}: commands run on the CPU or a CUDA GPU (available here: {avail})")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                         f"cuda {torch.version.cuda}); use --device cpu")
    if dtype_name not in DTYPES:
        raise ValueError(f"--dtype {dtype_name}: choose one of {', '.join(DTYPES)}")
    msg = None
    if device.type == "cpu" and dtype_name == "bf16" and not cpu_has("avx512_bf16") and not cpu_has("amx_bf16"):
        msg = "bf16 on this CPU has no native bf16 dot products (no AVX512-BF16 / AMX): expect it ~100x slower than fp32"
    if device.type == "cpu" and dtype_name == "fp16":
        msg = "fp16 matmuls are not accelerated on CPUs: expect them far slower than fp32 (use bf16 or fp32 here)"
    if msg:
        warnings.warn(msg, stacklevel=2)
    return msg


def auto_dtype(device: torch.device) -> tuple[str, str]:
    """`--dtype auto` for training: (dtype name, why).  bf16 where the hardware multiplies bf16 natively (CUDA
    with bf16 support; CPUs with AVX512-BF16 or AMX, where bf16 autocast trained 1.36-1.51x faster than fp32 in
    `bench model`), else fp32."""
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16", "bf16 autocast (this GPU supports bf16)"
    if device.type == "cpu" and (cpu_has("avx512_bf16") or cpu_has("amx_bf16")):
        return "bf16", "bf16 autocast (this CPU has AVX512-BF16 dot products; --dtype fp32 for full precision)"
    return "fp32", ("fp32 (this CPU has no native bf16 dot products)" if device.type == "cpu"
                    else f"fp32 ({device.type})")


def precision(device: str | None, dtype: str) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) of a command's --device / --dtype, checked (a UserError for what cannot run)."""
    try:
        dev = resolve_device(device)
    except RuntimeError as e:
        raise UserError(f"--device {device}: {e}") from None
    try:
        check_precision(dev, dtype)
    except ValueError as e:
        raise UserError(str(e)) from None
    return dev, DTYPES[dtype]


def measured_gemm_tflops(dtype: str = "fp32", n: int = 1024, repeats: int = 5) -> float:
    """This CPU's matmul rate in `dtype` right now (best of a few n x n products), in TFLOP/s."""
    import time
    a = torch.randn(n, n).to(DTYPES[dtype])
    best = float("inf")
    for _ in range(repeats + 1):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e12


ISA_FLAGS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"),
             ("amx_tile", "AMX"))


def cpu_description() -> str:
    """The CPU model and the instruction sets the kernels use, e.g. 'AMD EPYC (AVX2, AVX-512, VNNI, BF16), 2 cores':
    every benchmark prints it, because figures differ between machine kinds."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [name for flag, name in ISA_FLAGS if flag in flags] or ["no AVX2"]
    out = f"{model} ({', '.join(isa)}), {os.cpu_count()} cores"
    march = os.environ.get("TERNARY_MAMBA_MARCH", "native")
    if march != "native":   # an emulated kind: the kernels use what -march gives, not every flag the CPU has
        out += f"; C kernels built for -march={march} (TERNARY_MAMBA_MARCH)"
    return out
