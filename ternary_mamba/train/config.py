"""Typed settings of training: `TrainConfig` (the optimizer, schedule and budget every run shares) and
`DistillConfig` (the QAT+KD loss).  No torch here: the CLI builds its flags from these fields."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..config_base import Config, option
from ..errors import UserError


def _number(v: float, flag: str, low: float | None = None, high: float | None = None, low_open: bool = False) -> None:
    """A finite number within its range (NaN passes every comparison, so it is refused first)."""
    if not math.isfinite(v):
        raise UserError(f"{flag} {v}: must be a finite number")
    if low is not None and (v < low or (low_open and v == low)):
        raise UserError(f"{flag} {v}: must be {'>' if low_open else '>='} {low:g}")
    if high is not None and v > high:
        raise UserError(f"{flag} {v}: must be <= {high:g}")


@dataclass
class TrainConfig(Config):
    tokens: int = option(1_000_000, help="token budget (inputs seen by the model)")
    seq_len: int = option(256, help="tokens per training window")
    batch_size: int = option(8, help="sequences per micro-batch (per rank)")
    grad_accum: int = option(1, help="micro-batches per optimizer step")
    lr: float = option(1e-3, help="peak learning rate (AdamW)")
    min_lr_ratio: float = option(0.1, help="the cosine schedule decays to lr x this")
    warmup_frac: float = option(0.05, help="fraction of the steps spent warming up the learning rate")
    weight_decay: float = option(0.1, help="AdamW weight decay of the matrices")
    grad_clip: float = option(1.0, help="gradient-norm clipping")
    eval_every: int = option(100, help="steps between held-out evaluations (0: never)", resume_free=True)
    eval_batches: int = option(8, help="held-out batches per evaluation")
    save_every: int = option(100, help="steps between checkpoints", resume_free=True)
    log_every: int = option(10, help="steps between progress lines", resume_free=True)
    seed: int = option(0, help="seed of the data order and initialisation")

    def __post_init__(self):
        for k in ("tokens", "seq_len", "batch_size", "grad_accum", "eval_batches", "save_every", "log_every"):
            if getattr(self, k) < 1:
                raise UserError(f"--{k.replace('_', '-')} must be >= 1")
        if self.eval_every < 0:
            raise UserError("--eval-every must be >= 0 (0: never)")
        _number(self.lr, "--lr", low=0.0, low_open=True, high=10.0)
        _number(self.min_lr_ratio, "--min-lr-ratio", low=0.0, high=1.0)
        _number(self.warmup_frac, "--warmup-frac", low=0.0, high=1.0)
        _number(self.weight_decay, "--weight-decay", low=0.0, high=10.0)
        _number(self.grad_clip, "--grad-clip", low=0.0, low_open=True)

    @property
    def tokens_per_step(self) -> int:
        world = int(os.environ.get("WORLD_SIZE", 1))
        return self.batch_size * self.seq_len * self.grad_accum * world

    @property
    def total_steps(self) -> int:
        steps = self.tokens // self.tokens_per_step
        if steps < 1:
            raise UserError(f"--tokens {self.tokens:,} is smaller than one optimizer step "
                            f"({self.tokens_per_step:,} tokens = batch x seq-len x grad-accum x ranks)")
        return steps


@dataclass
class DistillConfig(Config):
    """loss = tau^2 KL(teacher^tau || student^tau) + alpha_ce CE(student, data) + beta_hidden hidden-state MSE
    + gamma_state SSM-state MSE at segment boundaries."""
    tau: float = option(1.0, help="distillation temperature")
    alpha_ce: float = option(0.0, help="weight of the cross-entropy on the data")
    beta_hidden: float = option(0.0, help="weight of per-block hidden-state matching")
    scale_lr_mult: float = option(1.0, help="lr multiplier of the learned scales")
    lam_warmup: int = option(0, help="steps of quantization warm-up w + lam (q(w) - w)")
    gamma_state: float = option(0.0, help="weight of SSM-state distillation: every layer's state matched to the "
                                "teacher's at segment boundaries, normalised by the teacher's")
    state_segments: int = option(4, help="state distillation: segments per training window (boundaries at "
                                 "multiples of seq-len / segments; keep them multiples of the chunk size)")

    def __post_init__(self):
        _number(self.tau, "--tau", low=0.0, low_open=True, high=100.0)
        for flag, v in (("--alpha-ce", self.alpha_ce), ("--beta-hidden", self.beta_hidden),
                        ("--gamma-state", self.gamma_state)):
            _number(v, flag, low=0.0)
        _number(self.scale_lr_mult, "--scale-lr-mult", low=0.0, low_open=True, high=1e4)
        if self.lam_warmup < 0:
            raise UserError("--lam-warmup must be >= 0")
        if self.gamma_state < 0 or self.state_segments < 1:
            raise UserError("--gamma-state must be >= 0 and --state-segments >= 1")
