"""Time of one QAT+KD step on a GPU, predicted op by op from the traced step (what `ternary-mamba plan` prints).

The real step (teacher forward, student forward and backward, with activation checkpointing's recomputation when
asked) runs on the `meta` device under a dispatch mode that sees every aten op: its FLOPs (matrix products and
the depthwise convolution), the bytes it reads and writes, and its kind.  Each op then costs what bounds it on
the GPU — max(FLOPs / attainable compute, bytes / attainable bandwidth, one kernel's minimum time) — and the
step is their sum plus AdamW's pass over the parameters.  What each op costs on a GPU, by kind:
  - `mm` / `addmm` (projections and head, under autocast): 16-bit tensor cores, operands 2 bytes;
  - `bmm` / `baddbmm` (the scan's contractions, which keep fp32 as mamba_ssm does): fp32 CUDA cores;
  - everything else (elementwise, reductions, casts, the scan's recurrence): memory-bound at the traced bytes;
  - the fused Triton kernels that replace a chain of PyTorch ops on CUDA (ternary fake-quant, the KD loss, the
    scan's forward and backward, causal conv + SiLU, the norms: `standins.FUSED`) are one op each way, costed
    by what they move and compute; a measurement of older code names the kernels it had.
The attainable fractions of the data-sheet peaks are fixed constants (not fitted to our measurements); the test
compares the prediction with the GPU measurements in docs/GPU.md.  Known blind spots: kernel launch gaps (each
kernel costs at least `MIN_KERNEL_S`), cache reuse between ops (none assumed), and elementwise tensors that are
16-bit under autocast (counted at their traced fp32 size)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..core.config import Mamba2Config, count_params_by_component
from ..quant.config import TernaryConfig
from ..spec import GPU, GPUS  # noqa: F401 - GPUS re-exported for callers
from .standins import FUSED, fused_kernels


# attainable shares of the data-sheet peaks: large bf16 GEMMs reach ~75 % (an H200 measured 799 of 989 TFLOP/s
# on 8192^3, smaller projection shapes less); fp32 SIMT GEMMs of the scan's small shapes ~50 %; streaming kernels
# ~80 % of HBM bandwidth.  Every kernel costs at least MIN_KERNEL_S (launch and tail).
GEMM_EFF, FP32_EFF, BW_EFF, MIN_KERNEL_S = 0.75, 0.5, 0.8, 4e-6
ADAMW_BYTES_PER_PARAM = 28    # fused AdamW reads param, grad, 2 moments (16 B) and writes param, 2 moments (12 B)


@dataclass
class OpCosts:
    """What the traced step does, by kind: FLOPs, bytes and kernel count of each."""
    tensor_flops: float = 0.0
    tensor_bytes: float = 0.0
    fp32_flops: float = 0.0
    fp32_bytes: float = 0.0
    stream_bytes: float = 0.0
    kernels: dict[str, int] = field(default_factory=lambda: {"tensor": 0, "fp32": 0, "stream": 0})
    seconds: dict[str, float] = field(default_factory=lambda: {"tensor": 0.0, "fp32": 0.0, "stream": 0.0})


GEMM_16 = {"mm", "addmm"}
GEMM_32 = {"bmm", "baddbmm"}
FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
        "_to_copy_noop", "alias", "set_", "_local_scalar_dense", "scalar_tensor"}


def _nbytes(x) -> int:
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


def _gemm_flops(name: str, args, out) -> float:
    if name in ("mm", "addmm"):
        a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
        return 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
    a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
    return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


class _Tracer(TorchDispatchMode):
    def __init__(self, gpu: GPU):
        super().__init__()
        self.gpu, self.costs, self.fused = gpu, OpCosts(), 0      # fused > 0: inside a stand-in, not counted

    def add(self, kind: str, flops: float, nbytes: float) -> None:
        g, c = self.gpu, self.costs
        if kind == "tensor":
            t = max(flops / (g.tensor_tflops * 1e12 * GEMM_EFF), nbytes / (g.hbm_tbps * 1e12 * BW_EFF))
            c.tensor_flops += flops
            c.tensor_bytes += nbytes
        elif kind == "fp32":
            t = max(flops / (g.fp32_tflops * 1e12 * FP32_EFF), nbytes / (g.hbm_tbps * 1e12 * BW_EFF))
            c.fp32_flops += flops
            c.fp32_bytes += nbytes
        else:
            t = nbytes / (g.hbm_tbps * 1e12 * BW_EFF)
            c.stream_bytes += nbytes
        c.kernels[kind] += 1
        c.seconds[kind] += max(t, MIN_KERNEL_S)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if self.fused or func.is_view or name in FREE:
            return out
        ins = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        outs = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
        if name in GEMM_16:          # autocast: 16-bit operands and result
            self.add("tensor", _gemm_flops(name, args, out), sum(_nbytes(x) for x in ins + outs) / 2)
        elif name in GEMM_32:
            self.add("fp32", _gemm_flops(name, args, out), sum(_nbytes(x) for x in ins + outs))
        elif name.startswith("convolution"):   # the depthwise causal conv: memory-bound
            self.add("stream", 0.0, sum(_nbytes(x) for x in ins + outs))
        else:
            self.add("stream", 0.0, sum(_nbytes(x) for x in ins + outs))
        return out


def trace_step_costs(cfg: Mamba2Config, qcfg: TernaryConfig, batch: int, seq_len: int, gpu: GPU, dtype: str = "bf16",
                     checkpointing: bool = False, kernels: tuple[str, ...] = FUSED) -> OpCosts:
    """The traced QAT+KD step's costs on `gpu` (see the module docstring); nothing is allocated.  `kernels`: the
    fused CUDA kernels costed as one op each (a measurement of older code names the ones it had)."""
    from .checkpointing import checkpoint_blocks_
    from .distill import DistillObjective
    from .memory import meta_models
    teacher, student = meta_models(cfg, qcfg, dtype)
    if checkpointing:
        checkpoint_blocks_(student)
    tracer = _Tracer(gpu)
    ids = torch.zeros(batch, seq_len + 1, dtype=torch.long, device="meta")
    # the trace's forward: the fused kernels stand in for their PyTorch chains, which are not what a GPU runs
    with fused_kernels(tracer, kernels), tracer:
        loss, _ = DistillObjective(teacher).loss(student, ids)
        loss.backward()
    n = sum(p.numel() for p in {id(p): p for p in student.parameters() if p.requires_grad}.values())
    tracer.add("stream", 0.0, ADAMW_BYTES_PER_PARAM * n)
    return tracer.costs


@dataclass
class StepPrediction:
    seconds: float
    tokens: int
    costs: OpCosts
    model_flops: float     # conventional, per token: 6 N (the student's training) + 2 N (the teacher's forward)
    gpu: GPU

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def mfu(self) -> float:
        """Conventional model-FLOPs utilisation against the data-sheet 16-bit peak."""
        return self.model_flops * self.tokens / self.seconds / (self.gpu.tensor_tflops * 1e12)

    def bound(self) -> str:
        """Where the time goes, largest share first."""
        parts = sorted(((k, v) for k, v in self.costs.seconds.items() if self.costs.kernels[k]), key=lambda kv: -kv[1])
        names = {"tensor": "16-bit GEMMs", "fp32": "fp32 scan GEMMs", "stream": "memory-bound ops"}
        return ", ".join(f"{names[k]} {v / self.seconds:.0%} ({self.costs.kernels[k]:,} kernels)" for k, v in parts)


def predict_step(cfg: Mamba2Config, qcfg: TernaryConfig, batch: int, seq_len: int, gpu: GPU, dtype: str = "bf16",
                 checkpointing: bool = False, kernels: tuple[str, ...] = FUSED) -> StepPrediction:
    costs = trace_step_costs(cfg, qcfg, batch, seq_len, gpu, dtype, checkpointing, kernels)
    n = sum(count_params_by_component(cfg).values())
    return StepPrediction(sum(costs.seconds.values()), batch * seq_len, costs, 8.0 * n, gpu)
