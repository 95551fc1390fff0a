"""Per-window evaluation against the teacher, and the intervals built on it.

Every held-out window of every evaluated model is kept (cross-entropy, KL to the teacher, top-1 agreements,
token count), so a table cell can be a mean over seeds ± their sd *and* a bootstrap confidence interval that
holds both sources of noise: each resample draws the windows with replacement (the same windows for every
arm and seed: the comparison is paired) and, independently per arm, its seeds with replacement; the statistic is
the mean over the drawn seeds, and the 2.5 / 97.5 percentiles are reported.
"""
from __future__ import annotations

import numpy as np

from ..ops.device import module_device
from ..runtime.metrics import heldout_windows, sequence_batches, summarize

BOOTSTRAP = 1000


def eval_windows(seqs, n: int) -> list[int]:
    """At most n window indices spread evenly over the whole set (every book of a multi-book set is seen)."""
    if len(seqs) <= n:
        return list(range(len(seqs)))
    return sorted({int(i) for i in np.linspace(0, len(seqs) - 1, n)})


def per_window(student, teacher, seqs, windows: list[int], batch_size: int = 8,
               teacher_logits: list | None = None) -> dict:
    """{'ce', 'kl', 'agree', 'tokens'}: per-window sums (lists, one entry per window), by the one held-out metric
    (`runtime.metrics`).  `teacher_logits`: a list to fill on the first call (then reused: the teacher is evaluated
    once per set)."""
    batches = sequence_batches(seqs, windows, batch_size, module_device(student))
    return heldout_windows(student, batches, teacher, teacher_logits)


summary = summarize   # token-weighted loss, ppl, kl, top1_agree of per-window sums



def _per_seed(ws: list[dict], idx: np.ndarray, key: str) -> np.ndarray:
    """(seeds, B): the statistic of every seed on every window resample."""
    tok = np.array([w["tokens"] for w in ws], dtype=np.float64)[:, idx].sum(-1)
    src = {"ppl": "ce", "kl": "kl", "top1_agree": "agree"}[key]
    v = np.array([w[src] for w in ws], dtype=np.float64)[:, idx].sum(-1) / tok
    return np.exp(np.minimum(v, 50)) if key == "ppl" else v


def _seed_mean(per_seed: np.ndarray, rng) -> np.ndarray:
    """(B,): per resample, the mean over seeds drawn with replacement (one seed: itself)."""
    S, B = per_seed.shape
    pick = rng.integers(0, S, size=(B, S))
    return per_seed[pick, np.arange(B)[:, None]].mean(-1)


def arm_statistics(seed_windows: list[dict], seed: int = 0) -> dict:
    """Over an arm's seeds (each a per_window dict on the same windows): mean and sd over seeds of ppl, KL and
    agreement, and bootstrap 95 % CIs of the seed mean (windows and seeds resampled)."""
    per_seed = [summary(w) for w in seed_windows]
    out = {}
    for k in ("ppl", "kl", "top1_agree"):
        vals = np.array([s[k] for s in per_seed])
        out[k] = float(vals.mean())
        out[k + "_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    rng = np.random.default_rng(seed)
    n = len(seed_windows[0]["tokens"])
    idx = rng.integers(0, n, size=(BOOTSTRAP, n))
    for k in ("ppl", "kl", "top1_agree"):
        v = _seed_mean(_per_seed(seed_windows, idx, k), rng)
        out[k + "_ci"] = [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
    out["seeds"] = len(seed_windows)
    out["per_seed"] = per_seed
    return out


def difference_ci(a: list[dict], b: list[dict], key: str = "ppl", seed: int = 0) -> list[float]:
    """Bootstrap 95 % CI of mean_seeds(a) − mean_seeds(b) for ppl, kl or top1_agree: windows resampled jointly
    (paired: both arms were evaluated on the same windows), seeds resampled per arm."""
    rng = np.random.default_rng(seed)
    n = len(a[0]["tokens"])
    idx = rng.integers(0, n, size=(BOOTSTRAP, n))
    d = _seed_mean(_per_seed(a, idx, key), rng) - _seed_mean(_per_seed(b, idx, key), rng)
    return [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))]


def window_books(paths: list[str], tok, seqs, windows: list[int]) -> dict:
    """Which book (text file) each evaluated window starts in: {"books": [file names], "window_book": [index per
    window]} — the unit `rules.book_resamples` draws.  Each file is tokenized on its own (cached), exactly as the
    set's token stream concatenates them."""
    from ..formats.text import find_text_files
    from ..train.data import load_tokens, tokenize_to_file
    files = find_text_files(paths)
    ends = np.cumsum([len(load_tokens(tokenize_to_file([f], tok, None, False))) for f in files])
    starts = [(seqs.start + w) * seqs.seq_len for w in windows]
    return {"books": [f.name for f in files],
            "window_book": [int(min(np.searchsorted(ends, s, side="right"), len(files) - 1)) for s in starts]}
