"""The one held-out metric: next-token cross-entropy of a model (and, given a teacher, KL(teacher ‖ model) and
top-1 agreement) over batches of windows, as per-window sums.  Training's evaluation, the quantize summary, the
claims experiment's per-window statistics and `ppl` all compute their figures here.

Logits are cut to the real vocabulary (the padded rows are not classes); targets of -100 are not scored."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.losses import kl_div

IGNORE = -100


def window_sums(logits: Tensor, targets: Tensor, teacher_logits: Tensor | None = None) -> dict[str, list[float]]:
    """Per window (row) of logits (b, l, V) and targets (b, l): summed CE, summed KL to the teacher and the number
    of top-1 agreements over its scored tokens, and that number of tokens."""
    logits = logits.float()
    scored = targets != IGNORE
    ce = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none").sum(1)
    out = {"ce": ce.tolist(), "tokens": scored.sum(1).tolist()}
    if teacher_logits is not None:
        tl = teacher_logits.float()
        kl, agree = [], []
        for i in range(logits.size(0)):
            m = scored[i]
            n = int(m.sum())
            kl.append(kl_div(tl[i][m], logits[i][m]).item() * n if n else 0.0)
            agree.append(int((logits[i][m].argmax(-1) == tl[i][m].argmax(-1)).sum()))
        out["kl"], out["agree"] = kl, agree
    return out


@torch.no_grad()
def heldout_windows(model, batches, teacher=None, teacher_logits: list | None = None,
                    progress: str | None = None) -> dict[str, list[float]]:
    """Per-window sums over `batches` (an iterable of (inputs (b, l), targets (b, l)) on the model's device).
    `teacher_logits`: a list filled on the first call and reused after (the teacher evaluated once per set).
    `progress`: a label for a progress bar on stderr (long evaluations say how far they are)."""
    vocab = model.config.vocab_size
    out: dict[str, list[float]] = {}
    if progress is not None:
        import sys

        from tqdm import tqdm
        short = len(batches) < 2 if hasattr(batches, "__len__") else False
        batches = tqdm(batches, desc=progress, unit="batch", leave=False, file=sys.stderr, mininterval=1.0,
                       disable=short or not sys.stderr.isatty())   # a bar on a terminal; a log gets none
    for j, (x, y) in enumerate(batches):
        logits = model(x)[..., :vocab]
        if not bool(torch.isfinite(logits).all()):
            from ..errors import UserError
            raise UserError("the model produced NaN or infinite logits: its weights are corrupt or overflowed")
        tl = None
        if teacher is not None or teacher_logits:
            if teacher_logits is not None and j < len(teacher_logits):
                tl = teacher_logits[j]
            else:
                tl = teacher(x)[..., :vocab].float()
                if teacher_logits is not None:
                    teacher_logits.append(tl)
        for k, v in window_sums(logits, y, tl).items():
            out.setdefault(k, []).extend(v)
    return out


def summarize(w: dict[str, list[float]]) -> dict[str, float]:
    """Token-weighted means of per-window sums: loss (CE), ppl, and kl / top1_agree where measured."""
    n = sum(w["tokens"])
    ce = sum(w["ce"]) / n
    out = {"loss": ce, "ppl": math.exp(min(ce, 50))}
    if "kl" in w:
        out["kl"], out["top1_agree"] = sum(w["kl"]) / n, sum(w["agree"]) / n
    return out


def sequence_batches(seqs, indices, batch_size: int, device) -> list[tuple[Tensor, Tensor]]:
    """(inputs, next-token targets) of the packed sequences `indices`, in batches."""
    indices = list(indices)
    out = []
    for s in range(0, len(indices), batch_size):
        batch = seqs.batch(indices[s:s + batch_size]).to(device)
        out.append((batch[:, :-1], batch[:, 1:]))
    return out


def heldout_metrics(model, seqs, n_windows: int, batch_size: int, teacher=None,
                    progress: str | None = None) -> dict[str, float]:
    """The summary over the first `n_windows` held-out windows: loss, ppl (and kl, top1_agree with a teacher)."""
    from ..ops.device import module_device
    n = min(len(seqs), n_windows)
    return summarize(heldout_windows(model, sequence_batches(seqs, range(n), batch_size, module_device(model)),
                                     teacher, progress=progress))
