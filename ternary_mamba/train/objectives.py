"""The next-token objective (pretraining, and the from-scratch ternary control) and the AdamW parameter
groups every objective shares."""
from __future__ import annotations


import torch

from ..ops.device import scalar
from ..ops.losses import cross_entropy
from ..runtime.metrics import heldout_metrics

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


def with_scale_group(model, groups: list[dict], scale_lr_mult: float, scale_wd: float = 0.0) -> list[dict]:
    """`groups` with the learned ternary scales (`scale` / `log_scale`) moved to a group of their own whose lr
    starts multiplied by `scale_lr_mult` (the trainer multiplies every group's lr by the schedule)."""
    scales = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in ("scale", "log_scale")]
    ids = {id(p) for p in scales}
    for g in groups:
        g["params"] = [p for p in g["params"] if id(p) not in ids]
    if scales:
        groups.append({"params": scales, "weight_decay": scale_wd, "lr_mult": scale_lr_mult})
    return groups


class LMObjective:
    def __init__(self, weight_decay: float, quant_monitor=None, scale_lr_mult: float = 1.0):
        self.weight_decay, self.qmon, self.scale_lr_mult = weight_decay, quant_monitor, scale_lr_mult

    def param_groups(self, model):
        groups = param_groups(model, self.weight_decay)
        return groups if self.scale_lr_mult == 1.0 else with_scale_group(model, groups, self.scale_lr_mult)

    def loss(self, model, batch):
        loss = next_token_loss(model, batch)
        return loss, {"loss": scalar(loss)}

    def evaluate(self, model, heldout, n_batches, batch_size):
        return heldout_metrics(model, heldout, n_batches * batch_size, batch_size)

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
