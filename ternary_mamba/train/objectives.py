"""The next-token objective (pretraining, and the from-scratch ternary control) and the AdamW parameter
groups every objective shares."""
from __future__ import annotations

import math

import torch

from ..ops.device import module_device, scalar
from ..ops.losses import cross_entropy

NO_DECAY = ("norm", "A_log", "D", "dt_bias", "bias", "scale")


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if any(k in name.rsplit(".", 1)[-1] or k in name for k in NO_DECAY) or p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def next_token_loss(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return cross_entropy(logits.float(), batch[:, 1:])   # fused kernel (ops/losses.py); F.cross_entropy otherwise


@torch.no_grad()
def heldout_loss(model, heldout, n_batches: int, batch_size: int) -> float:
    """Mean next-token cross-entropy over the first n_batches*batch_size held-out windows (fixed set)."""
    n = min(len(heldout), n_batches * batch_size)
    total = 0.0
    for s in range(0, n, batch_size):
        idx = range(s, min(n, s + batch_size))
        total += next_token_loss(model, heldout.batch(idx).to(module_device(model))).item() * len(idx)
    return total / n


class LMObjective:
    def __init__(self, weight_decay: float, quant_monitor=None):
        self.weight_decay, self.qmon = weight_decay, quant_monitor

    def param_groups(self, model):
        return param_groups(model, self.weight_decay)

    def loss(self, model, batch):
        loss = next_token_loss(model, batch)
        return loss, {"loss": scalar(loss)}

    def evaluate(self, model, heldout, n_batches, batch_size):
        loss = heldout_loss(model, heldout, n_batches, batch_size)
        return {"loss": loss, "ppl": math.exp(min(loss, 50))}

    def monitor(self, model, step):
        return self.qmon.record(model, step) if self.qmon else {}

    def check(self, rec):
        if self.qmon:
            self.qmon.check(rec)

    def after_step(self, model, step):
        pass

    def progress(self, rec):
        s = f"loss {rec['loss']:.3f}"
        if "eval_ppl" in rec:
            s += f" | held-out ppl {rec['eval_ppl']:.2f}"
        if "zero_ratio" in rec:
            s += f" | zero {rec['zero_ratio']:.3f}"
        return s
