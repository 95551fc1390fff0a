"""The claims' decision rules, fixed before the experiment runs, and the statistics that apply them.

Each claim is a paired comparison between named arms on the same held-out windows: a difference of arm means
(over seeds) of one metric, or a difference of two such differences (Mamba-2 vs the GPT control), with a 95 %
bootstrap CI that resamples **books** (then the windows inside each drawn book) and, per arm, seeds.  The rule
states the direction the claim predicts and a margin: the verdict is

  held          the CI lies beyond the margin in the predicted direction,
  did not hold  the CI lies on the other side of the margin (the effect, if any, is smaller than the margin
                or of the opposite sign),
  inconclusive  the CI straddles the margin,

and its **margin sensitivity** is the interval of margins over which it stays what it is (the CI bounds): a
verdict that flips for a slightly different margin says so.  Collapse verdicts also need the zero ratio's
excess over its MSE optimum to exceed ZERO_MARGIN (its CI over seeds).  These rules are the ones README's
"claims" section states; changing one is a change of the experiment, recorded by the code version.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOOTSTRAP = 1000
ZERO_MARGIN = 0.05       # excess zeros over the MSE optimum that counts as collapse (fixed before the v2 runs)


@dataclass(frozen=True)
class Rule:
    key: str
    claim: str
    a: str                       # arm whose mean comes first in the difference
    b: str                       # minus this arm's
    metric: str = "kl"           # kl | ppl | top1_agree
    direction: int = 1           # +1: the claim predicts a − b > margin; −1: a − b < −margin
    margin: float = 0.0
    c: str | None = None         # difference in differences: (a − b) − (c − d)
    d: str | None = None
    collapse: str | None = None  # also require this arm's excess zeros > ZERO_MARGIN (collapse claims)


def book_resamples(window_book: list[int], n: int = BOOTSTRAP, seed: int = 0) -> list[np.ndarray]:
    """n resamples of window indices: books drawn with replacement, then each drawn book's windows with
    replacement (a cluster bootstrap: books are the unit the held-out text varies by).  One book: windows only."""
    rng = np.random.default_rng(seed)
    wb = np.asarray(window_book)
    books = [np.flatnonzero(wb == b) for b in np.unique(wb)]
    out = []
    for _ in range(n):
        picked = rng.integers(0, len(books), len(books)) if len(books) > 1 else [0]
        out.append(np.concatenate([books[i][rng.integers(0, len(books[i]), len(books[i]))] for i in picked]))
    return out


def _metric(seed_windows: list[dict], idx: np.ndarray, metric: str) -> np.ndarray:
    """(seeds,) the metric of each seed over the windows idx (token-weighted)."""
    src = {"ppl": "ce", "kl": "kl", "top1_agree": "agree"}[metric]
    tok = np.array([np.asarray(w["tokens"], dtype=np.float64)[idx].sum() for w in seed_windows])
    v = np.array([np.asarray(w[src], dtype=np.float64)[idx].sum() for w in seed_windows]) / tok
    return np.exp(np.minimum(v, 50)) if metric == "ppl" else v


def contrast(arms: list[list[dict]], signs: list[int], metric: str, window_book: list[int],
             seed: int = 0) -> dict:
    """sum_k signs[k] * mean_seeds(arms[k]) on every window (the point estimate) and its 95 % CI: the same book /
    window resample for every arm (paired), seeds drawn with replacement per arm."""
    rng = np.random.default_rng(seed + 1)
    all_idx = np.arange(len(window_book))
    point = sum(s * _metric(a, all_idx, metric).mean() for a, s in zip(arms, signs))
    vals = []
    for idx in book_resamples(window_book, seed=seed):
        v = 0.0
        for a, s in zip(arms, signs):
            per_seed = _metric(a, idx, metric)
            v += s * per_seed[rng.integers(0, len(per_seed), len(per_seed))].mean()
        vals.append(v)
    return {"estimate": float(point), "ci": [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]}


def excess_zeros(rs: list[dict], seed: int = 0) -> dict:
    """Mean over seeds of zero ratio − its MSE optimum, with a seed-bootstrap 95 % CI (one seed: a point)."""
    x = np.array([r["zero_ratio"] - r["zero_ratio_opt"] for r in rs])
    rng = np.random.default_rng(seed)
    boots = x[rng.integers(0, len(x), (BOOTSTRAP, len(x)))].mean(-1) if len(x) > 1 else np.repeat(x, 2)
    return {"estimate": float(x.mean()), "ci": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]}


def decide(ci: list[float], direction: int, margin: float) -> str:
    """The verdict of a CI on a − b against the rule's direction and margin."""
    lo, hi = (ci[0], ci[1]) if direction > 0 else (-ci[1], -ci[0])    # in the predicted direction
    return "held" if lo > margin else "did not hold" if hi < margin else "inconclusive"


def sensitivity(ci: list[float], direction: int) -> str:
    """The margins (>= 0) over which the verdict stays what it is: held below the CI's near bound (in the
    predicted direction), did not hold above its far bound, inconclusive between."""
    lo, hi = (ci[0], ci[1]) if direction > 0 else (-ci[1], -ci[0])
    if hi < 0:
        return "did not hold at every margin >= 0 (the CI lies on the other side of 0)"
    if lo > 0:
        return f"held for margins < {lo:.4g}, inconclusive up to {hi:.4g}, did not hold above"
    return f"inconclusive for margins < {hi:.4g}, did not hold above (held at no margin >= 0)"


def apply(rule: Rule, arms: dict, set_name: str, window_book: list[int]) -> dict | None:
    """The rule's verdict row on one held-out set, or None when an arm it needs did not run."""
    names = [n for n in (rule.a, rule.b, rule.c, rule.d) if n is not None]
    if any(n not in arms for n in names):
        return None
    seeds = [[r["windows"][set_name] for r in arms[n]] for n in names]
    signs = [1, -1, -1, 1][:len(names)]
    c = contrast(seeds, signs, rule.metric, window_book)
    verdict = decide(c["ci"], rule.direction, rule.margin)
    row = {"key": rule.key, "claim": rule.claim, "set": set_name, "metric": rule.metric,
           "difference": ("(" + " − ".join(names[:2]) + ")" + (" − (" + " − ".join(names[2:]) + ")" if rule.c else "")),
           "estimate": c["estimate"], "ci": c["ci"], "direction": rule.direction, "margin": rule.margin,
           "verdict": verdict, "sensitivity": sensitivity(c["ci"], rule.direction),
           "books": len(set(window_book))}
    if rule.collapse is not None:
        z = excess_zeros(arms[rule.collapse])
        row["excess_zeros"] = z
        zv = decide(z["ci"], +1, ZERO_MARGIN)          # collapse needs both: the zeros and their cost
        row["verdict"] = ("held" if verdict == zv == "held" else
                          "did not hold" if "did not hold" in (verdict, zv) else "inconclusive")
        row["zero_sensitivity"] = (f"collapse by zeros for zero margins < {z['ci'][0]:.3f}; not for margins > "
                                   f"{z['ci'][1]:.3f}")
    return row


# ---------------------------------------------------------------- the pre-registered rules (written before the run)
POSTHOC_EQUAL_BITS = ("ptq", "ptq-qep", "gptq", "ptq-bias", "gptq-bias", "gptq-L")   # no fp16 branch: W1.58
RULES = (
    Rule("collapse-linear-x10", "Zero-ratio collapse by cost during QAT+KD from a pretrained checkpoint: learned "
         "linear scales, scale lr x10 (zeros > MSE optimum + ZERO_MARGIN, and held-out KL worse than absmean's)",
         "qat-linear-lr10", "qat-absmean", "kl", +1, 0.0, collapse="qat-linear-lr10"),
    Rule("collapse-default", "Zero-ratio collapse by cost during QAT+KD from a pretrained checkpoint: learned "
         "(log) scales at the default scale lr", "qat-learned", "qat-absmean", "kl", +1, 0.0, collapse="qat-learned"),
    Rule("collapse-scratch-linear-x10", "From scratch, the same learned linear x10 scales collapse by cost too "
         "(against ternary absmean from scratch)", "scratch-linear-lr10", "scratch-ternary", "kl", +1, 0.0,
         collapse="scratch-linear-lr10"),
    Rule("guard", "Guarded scales (linear, scale lr x10) beat the unguarded ones they guard (held-out KL lower)",
         "qat-guarded-linear-lr10", "qat-linear-lr10", "kl", -1, 0.0),
    Rule("learned-vs-absmean", "Learned (log) scales beat absmean scales (held-out KL lower)",
         "qat-learned", "qat-absmean", "kl", -1, 0.0),
    Rule("state-distillation", "State distillation narrows the held-out gap to the teacher (KL lower)",
         "qat-state", "qat-absmean", "kl", -1, 0.0),
)


TEACHER_MATCH = 0.05     # the GPT control teacher's clean ppl within 5 % of the Mamba-2 teacher's, or no verdict


def teacher_gap(arms: dict, sets: dict) -> float | None:
    """GPT teacher ppl / Mamba-2 teacher ppl − 1 on the clean set (else the first set both have)."""
    if "teacher" not in arms or "gpt-teacher" not in arms:
        return None
    name = "clean" if "clean" in sets else next(iter(sets))
    idx = np.arange(len(sets[name]["window_book"]))
    t, g = (_metric([arms[k][0]["windows"][name]], idx, "ppl")[0] for k in ("teacher", "gpt-teacher"))
    return float(g / t - 1)


def best_posthoc(arms: dict, set_name: str, prefix: str = "") -> str | None:
    """The equal-bit post-hoc arm (no fp16 branch, calibration <= the QAT budget) with the lowest KL on the set:
    chosen on the same data it is judged on, which favours post-hoc (conservative for "post-hoc cannot reach")."""
    def kl(n):
        w = arms[n][0]["windows"][set_name]
        return sum(w["kl"]) / sum(w["tokens"])
    qat = arms.get(prefix + "qat-absmean") or arms.get("qat-absmean")
    budget = qat[0].get("tokens") if qat else None
    names = [prefix + n for n in POSTHOC_EQUAL_BITS if prefix + n in arms
             and (budget is None or arms[prefix + n][0].get("calib_tokens", 0) <= budget)]
    return min(names, key=kl) if names else None


def claim_rows(arms: dict, sets: dict, primary: str) -> list[dict]:
    """Every pre-registered verdict on the primary set, each with its CI on every other set beside it."""
    def run(rule: Rule) -> dict | None:
        rows = {s: apply(rule, arms, s, sets[s]["window_book"]) for s in sets}
        if rows[primary] is None:
            return None
        row = dict(rows[primary])
        row["other_sets"] = {s: {"ci": r["ci"], "verdict": r["verdict"], "books": r["books"]}
                             for s, r in rows.items() if s != primary and r is not None}
        return row
    out = [r for r in (run(rule) for rule in RULES) if r is not None]
    by = {r["key"]: r for r in out}
    if "guard" in by:      # did the band bind at all (else "prevents" is untested): its peak over training
        peaks = [max((c.get("guard_bound", 0.0) for c in r.get("curve", [])), default=0.0)
                 for r in arms["qat-guarded-linear-lr10"]]
        by["guard"]["guard_bound"] = max(peaks)
        if max(peaks) == 0.0 and by["guard"]["verdict"] == "held":
            by["guard"]["verdict"] = "inconclusive"
    if "collapse-linear-x10" in by and "collapse-scratch-linear-x10" in by:    # the two arms differ in one thing
        p, s = by["collapse-linear-x10"]["verdict"], by["collapse-scratch-linear-x10"]["verdict"]
        v = "held" if p == "held" and s == "did not hold" else "did not hold" if s == "held" else "inconclusive"
        out.append({"key": "collapse-specific", "claim": "Collapse is specific to a pretrained start (same "
                    "parametrisation and scale lr: linear x10, pretrained vs from scratch)", "verdict": v,
                    "set": primary, "composite": f"pretrained: {p}; from scratch: {s}"})
    bm, bg = best_posthoc(arms, primary), best_posthoc(arms, primary, "gpt-")
    for arch, best, qat in (("Mamba-2", bm, "qat-absmean"), ("GPT control", bg, "gpt-qat-absmean")):
        if best:
            r = run(Rule(f"posthoc-{arch}", f"{arch}: the best post-hoc method at equal bits (W1.58, no fp16 "
                         f"branch) and calibration <= the QAT tokens does not reach QAT+KD (held-out KL higher)",
                         best, qat, "kl", +1, 0.0))
            if r:
                out.append(r)
    if bm and bg:
        r = run(Rule("because-ssm", "Post-hoc correction fails *because* the model is an SSM: its shortfall to "
                     "QAT+KD is larger for Mamba-2 than for the GPT control (difference in differences of KL)",
                     bm, "qat-absmean", "kl", +1, 0.0, c=bg, d="gpt-qat-absmean"))
        if r:
            gap = teacher_gap(arms, sets)
            if gap is not None:
                r["teacher_gap"] = gap
                if abs(gap) > TEACHER_MATCH and r["verdict"] != "inconclusive":
                    r["verdict_unmatched"], r["verdict"] = r["verdict"], "inconclusive"
            out.append(r)
    curve = []
    for name in ("qat-absmean", "qat-absmean-x4", "qat-absmean-x16"):
        if bm and name in arms:
            r = apply(Rule("budget", "", bm, name, "kl", +1, 0.0), arms, primary, sets[primary]["window_book"])
            curve.append({"arm": name, "tokens": arms[name][0].get("tokens"), "ci": r["ci"], "verdict": r["verdict"]})
    if len(curve) > 1:
        over = next((c["tokens"] for c in curve if c["verdict"] == "held"), None)
        out.append({"key": "budget-curve", "claim": "QAT+KD overtakes the best equal-bit post-hoc method within the "
                    "token-budget sweep (0.1 / 0.4 / 1.6 M tokens)", "set": primary, "curve": curve,
                    "verdict": "held" if over else "did not hold" if all(c["verdict"] == "did not hold" for c in curve)
                    else "inconclusive", "overtakes_at": over})
    out.append({"key": "scratch", "claim": "QAT+KD beats ternary training from scratch", "set": primary,
                "verdict": "not tested", "composite": "dropped: the teacher was pretrained on 8 M tokens before the "
                "QAT budget; a from-scratch arm at equal total tokens was not run, so at equal QAT tokens the "
                "comparison could not fail"})
    return out


def evidence(row: dict) -> str:
    """One table cell: the rule, the paired difference and its CI (books resampled), the other sets, the margin
    sensitivity."""
    if "curve" in row:
        return "best post-hoc − QAT+KD, KL CI by budget: " + "; ".join(
            f"{c['tokens'] or 0:,} tokens [{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}] {c['verdict']}" for c in row["curve"])
    if "ci" not in row:
        return row.get("composite", "")
    want = ">" if row["direction"] > 0 else "<"
    text = (f"rule: {row['difference']} {row['metric']} {want} {'+' if row['direction'] > 0 else '−'}"
            f"{row['margin']:g}; estimate {row['estimate']:+.4f}, 95 % CI [{row['ci'][0]:+.4f}, {row['ci'][1]:+.4f}] "
            f"({row['books']} book(s) resampled, then windows, seeds per arm)")
    for s, o in row.get("other_sets", {}).items():
        text += f"; {s}: [{o['ci'][0]:+.4f}, {o['ci'][1]:+.4f}] {o['verdict']}"
    if "teacher_gap" in row:
        text += (f"; GPT teacher ppl {row['teacher_gap']:+.1%} vs Mamba-2's (clean)"
                 + (f": not matched within {TEACHER_MATCH:.0%}, so no verdict (the CI alone would say "
                    f"'{row['verdict_unmatched']}')" if "verdict_unmatched" in row else ""))
    if "guard_bound" in row:
        text += f"; the band clamped up to {row['guard_bound']:.1%} of the weights' group scales during training"
    if "excess_zeros" in row:
        z = row["excess_zeros"]
        text += (f"; excess zeros {z['estimate']:+.3f} [{z['ci'][0]:+.3f}, {z['ci'][1]:+.3f}] vs {ZERO_MARGIN} "
                 f"({row['zero_sensitivity']})")
    return text + f"; margin sensitivity: {row['sensitivity']}"


RECURRENCE_HELD, RECURRENCE_NOT = 0.20, 0.05    # share of the output error the teacher's state removes


def recurrence_row(models: dict, posthoc: set[str], seed: int = 0) -> dict | None:
    """Error accumulates through the recurrent state (post-hoc students): per student, the share of its last
    layer's output error that giving it the teacher's state removes, over every position after t0 and every
    sequence, with a 95 % CI that resamples sequences.  Held: most students' CI lower bound >= 0.20; did not
    hold: most students' CI upper bound < 0.05; else inconclusive."""
    rng = np.random.default_rng(seed)
    per = {}
    for name, m in models.items():
        inj = m.get("injection_sequences")
        if name not in posthoc or not inj:
            continue
        own, w = np.asarray(inj["own"]), np.asarray(inj["weights_only"])
        idx = rng.integers(0, len(own), (BOOTSTRAP, len(own)))
        boots = 1 - w[idx].mean(-1) / np.maximum(own[idx].mean(-1), 1e-12)
        per[name] = {"share": float(1 - w.mean() / max(own.mean(), 1e-12)), "sequences": len(own),
                     "ci": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]}
    if not per:
        return None
    hi = sum(p["ci"][0] >= RECURRENCE_HELD for p in per.values())
    lo = sum(p["ci"][1] < RECURRENCE_NOT for p in per.values())
    verdict = "held" if 2 * hi > len(per) else "did not hold" if 2 * lo > len(per) else "inconclusive"
    return {"key": "recurrence", "claim": "Quantization error accumulates through the recurrent state (post-hoc "
            "students: the teacher's state removes >= 20 % of the output error, over all positions after t0)",
            "verdict": verdict, "students": per,
            "composite": "share removed, mean over positions after t0 and sequences, 95 % CI by sequence: "
            + "; ".join(f"{n} {p['share']:.1%} [{p['ci'][0]:.1%}, {p['ci'][1]:.1%}] ({p['sequences']} seq.)"
                        for n, p in per.items())
            + f"; held: most lower bounds >= {RECURRENCE_HELD:.0%}, did not hold: most upper bounds < "
              f"{RECURRENCE_NOT:.0%}"}
