"""Memory and time of a QAT+KD run, from a config alone: what `ternary-mamba plan` prints.

Static memory is counted from the modules themselves (built on the `meta` device: no bytes allocated): the
student's fp32 master weights and ternary scales, their gradients and AdamW's two moments (each divided by the
ranks under FSDP), and the frozen teacher in the run's dtype.  Activations are *traced*, not guessed: one
QAT+KD forward of the real config runs on `meta` with autograd's saved-tensor hooks counting every tensor kept
for the backward (deduplicated by storage, parameters excluded).  On `meta` that is the PyTorch path, the one a
GPU runs today; the CPU's C kernels keep less.  Activations are traced in fp32: under 16-bit autocast the
saved linear inputs are smaller, so the figure is an upper bound there.  The backward's transient peak adds
the gradient of the logits and about two blocks' activations (one block's gradients beside its saved tensors).  `tests/test_plan.py` checks the total
against the peak memory of a real CPU step at small scale.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..core.config import Mamba2Config, train_flops_per_token
from ..core.model import Mamba2LM
from ..quant.config import TernaryConfig
from ..quant.qat import quantize_
from .distill import DistillObjective, frozen_teacher

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class MemoryPlan:
    """Bytes per rank."""
    student_weights: int
    gradients: int
    optimizer: int
    teacher: int
    activations: int
    backward_transient: int

    @property
    def peak(self) -> int:
        return (self.student_weights + self.gradients + self.optimizer + self.teacher + self.activations
                + self.backward_transient)

    def rows(self) -> list[tuple[str, int]]:
        return [("student master weights (fp32) + scales", self.student_weights), ("gradients (fp32)", self.gradients),
                ("AdamW moments (2 x fp32)", self.optimizer), ("frozen teacher", self.teacher),
                ("activations kept for backward", self.activations),
                ("backward transient (logit grads, 2 blocks)", self.backward_transient), ("peak", self.peak)]


def meta_models(cfg: Mamba2Config, qcfg: TernaryConfig, dtype: str):
    with torch.device("meta"):
        teacher = Mamba2LM(cfg, init=False)
    student = copy.deepcopy(teacher)
    quantize_(student, qcfg)
    teacher = frozen_teacher(teacher, "meta", {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    return teacher, student.train()


class _GemmOperands(TorchDispatchMode):
    """Records the tensors that enter a projection GEMM (mm / addmm): under 16-bit autocast those are 16-bit
    copies, so a saved one costs half its traced (fp32) size."""

    def __init__(self):
        super().__init__()
        self.ids: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("mm", "addmm"):
            for a in args:
                if isinstance(a, torch.Tensor):
                    self.ids.add(id(a._base if a._base is not None else a))
        return func(*args, **(kwargs or {}))


def traced_activation_bytes(teacher, student, batch: int, seq_len: int, device: str = "meta",
                            fused: bool = False, autocast16: bool = False, kernels: tuple[str, ...] | None = None) -> int:
    """Bytes autograd keeps for the backward of one QAT+KD loss (parameters excluded, views counted once).
    fused=True: as on CUDA, where the fake-quant and the KD loss are fused kernels that keep no temporaries.
    autocast16=True: what a projection GEMM saves (its input and the fake-quantized weight) is 16-bit."""
    kept: dict[int, tuple[torch.Tensor, int]] = {}
    params = {id(p) for p in student.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in params and not isinstance(base, nn.Parameter):
            kept[id(base)] = (base, base.numel() * base.element_size())
        return t

    ids = torch.zeros(batch, seq_len + 1, dtype=torch.long, device=device)
    objective = DistillObjective(teacher)
    from .standins import fused_kernels
    gemm = _GemmOperands()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            (fused_kernels(None, *([kernels] if kernels is not None else [])) if fused else contextlib.nullcontext()), \
            (gemm if autocast16 else contextlib.nullcontext()):
        objective.loss(student, ids)
    return sum(n // 2 if autocast16 and i in gemm.ids and t.element_size() == 4 else n for i, (t, n) in kept.items())


def plan_memory(cfg: Mamba2Config, qcfg: TernaryConfig, batch: int, seq_len: int, dtype: str = "bf16",
                ranks: int = 1, fsdp: bool = False, checkpointing: bool = False, device: str = "cpu",
                kernels: tuple[str, ...] | None = None) -> MemoryPlan:
    """Bytes per rank.  On CUDA with a 16-bit dtype the logits are 16-bit (autocast) and the fused KD kernel keeps
    only the two logit tensors for its backward; on the CPU (and in fp32) the head keeps fp32 logits, the KL's
    inputs and the final norm (the trace's view, checked against a measured CPU step).  `kernels`: the fused CUDA
    kernels whose saved tensors replace their PyTorch chains' (default: today's, `standins.FUSED`; a measurement of
    older code names its own)."""
    teacher, student = meta_models(cfg, qcfg, dtype)
    seen, weights, trainable = set(), 0, 0
    for p in student.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        weights += p.numel() * 4
        trainable += p.numel() * 4 if p.requires_grad else 0
    shard = ranks if fsdp else 1
    t_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in teacher.parameters()}.values())
    cuda = device.startswith("cuda")
    gpu16 = cuda and dtype != "fp32"    # autocast to a 16-bit type
    traced = traced_activation_bytes(teacher, student, batch, seq_len, fused=cuda, autocast16=gpu16, kernels=kernels)
    logits = batch * seq_len * cfg.padded_vocab_size * (2 if gpu16 else 4)
    if cuda:   # the fused KD kernel keeps the student's and the teacher's logits; the trace holds the rest
        blocks, head = traced, 2 * logits
    else:      # the trace holds the logits, the KL's inputs and the final norm too
        head = 4 * batch * seq_len * (cfg.padded_vocab_size * 4 + cfg.d_model * 2)
        blocks = max(traced - head, 0)
    layer = blocks // cfg.n_layer                                        # one block's activations
    # the backward's transient: the logits' gradient with the softmax and log-softmax gradients beside all
    # saved tensors; under checkpointing the saved set is small and one dlogits remains, plus one block
    # recomputed.  In a block's backward its gradients live beside its activations: one block more.
    # (Calibrated against measured peaks: tests/test_plan.py.)
    transient = (logits if checkpointing else 3 * logits) + 2 * layer
    if checkpointing:   # each block keeps its fp32 input; the rest is recomputed in its backward
        acts = cfg.n_layer * batch * seq_len * cfg.d_model * 4 + head
    else:
        acts = blocks + head
    return MemoryPlan(weights // shard, trainable // shard, 2 * trainable // shard, t_bytes, acts, transient)


def qat_kd_flops_per_token(cfg: Mamba2Config, checkpointing: bool = False) -> float:
    """QAT+KD FLOPs per training token: the student's forward + backward, the teacher's forward (a third of
    that), and with activation checkpointing the student's forward once more."""
    return train_flops_per_token(cfg) * (5 if checkpointing else 4) / 3
