"""Per-window evaluation against the teacher, and the intervals built on it.

Every held-out window of every evaluated model is kept (cross-entropy, KL to the teacher, top-1 agreements,
token count), so a table cell can be a mean over seeds ± their sd *and* a bootstrap confidence interval over
windows: the windows are resampled with replacement (the same resample for every seed of an arm), the
statistic recomputed, and the 2.5 / 97.5 percentiles reported.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..ops.losses import kl_div

BOOTSTRAP = 1000


def eval_windows(seqs, n: int) -> list[int]:
    """At most n window indices spread evenly over the whole set (every book of a multi-book set is seen)."""
    if len(seqs) <= n:
        return list(range(len(seqs)))
    return sorted({int(i) for i in np.linspace(0, len(seqs) - 1, n)})


@torch.no_grad()
def per_window(student, teacher, seqs, windows: list[int], batch_size: int = 8,
               teacher_logits: list | None = None) -> dict:
    """{'ce', 'kl', 'agree', 'tokens'}: per-window sums (lists, one entry per window).  `teacher_logits`: a list
    to fill on the first call (then reused: the teacher is evaluated once per set)."""
    vocab = teacher.config.vocab_size
    out = {"ce": [], "kl": [], "agree": [], "tokens": []}
    for j, s in enumerate(range(0, len(windows), batch_size)):
        batch = seqs.batch(windows[s:s + batch_size])
        x, y = batch[:, :-1], batch[:, 1:]
        sl = student(x)[..., :vocab].float()
        if teacher_logits is not None and j < len(teacher_logits):
            tl = teacher_logits[j]
        else:
            tl = teacher(x)[..., :vocab].float()
            if teacher_logits is not None:
                teacher_logits.append(tl)
        for i in range(x.size(0)):
            out["ce"].append(F.cross_entropy(sl[i], y[i], reduction="sum").item())
            out["kl"].append(kl_div(tl[i:i + 1], sl[i:i + 1]).item() * y.size(1))
            out["agree"].append((sl[i].argmax(-1) == tl[i].argmax(-1)).sum().item())
            out["tokens"].append(y.size(1))
    return out


def summary(w: dict) -> dict:
    n = sum(w["tokens"])
    ce = sum(w["ce"]) / n
    return {"loss": ce, "ppl": math.exp(min(ce, 50)), "kl": sum(w["kl"]) / n, "top1_agree": sum(w["agree"]) / n}


def arm_statistics(seed_windows: list[dict], seed: int = 0) -> dict:
    """Over an arm's seeds (each a per_window dict on the same windows): mean and sd over seeds of ppl, KL and
    agreement, and bootstrap 95 % CIs over windows of the seed-mean."""
    per_seed = [summary(w) for w in seed_windows]
    out = {}
    for k in ("ppl", "kl", "top1_agree"):
        vals = np.array([s[k] for s in per_seed])
        out[k] = float(vals.mean())
        out[k + "_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    rng = np.random.default_rng(seed)
    n = len(seed_windows[0]["tokens"])
    idx = rng.integers(0, n, size=(BOOTSTRAP, n))
    arr = {k: np.array([w[k] for w in seed_windows], dtype=np.float64) for k in ("ce", "kl", "agree", "tokens")}
    tok = arr["tokens"][:, idx].sum(-1)                       # (seeds, B)
    stats = {"ppl": np.exp(np.minimum(arr["ce"][:, idx].sum(-1) / tok, 50)).mean(0),
             "kl": (arr["kl"][:, idx].sum(-1) / tok).mean(0),
             "top1_agree": (arr["agree"][:, idx].sum(-1) / tok).mean(0)}
    for k, v in stats.items():
        out[k + "_ci"] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
    out["seeds"] = len(seed_windows)
    out["per_seed"] = per_seed
    return out


def difference_ci(a: list[dict], b: list[dict], key: str = "ppl", seed: int = 0) -> list[float]:
    """Bootstrap 95 % CI over windows of mean_seeds(a) − mean_seeds(b) for ppl or kl (same windows in both)."""
    rng = np.random.default_rng(seed)
    n = len(a[0]["tokens"])
    idx = rng.integers(0, n, size=(BOOTSTRAP, n))

    def stat(ws):
        tok = np.array([w["tokens"] for w in ws], dtype=np.float64)[:, idx].sum(-1)
        src = "ce" if key == "ppl" else "kl"
        v = np.array([w[src] for w in ws], dtype=np.float64)[:, idx].sum(-1) / tok
        return (np.exp(np.minimum(v, 50)) if key == "ppl" else v).mean(0)
    d = stat(a) - stat(b)
    return [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]
