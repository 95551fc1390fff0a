"""The claims experiment's results: statistics over seeds and windows, the verdict on every claim, and
results.json / results.md (and, on request, a published copy and the README's claims section)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..core.config import MB
from ..formats.fs import atomic_write_bytes
from .arms import CONTROL_POSTHOC, POSTHOC, QAT, SCALE_LR_SWEEP, SCRATCH, SEQ_LEN
from .heldout import leakage_table
from .stats import arm_statistics, difference_ci
from ..log import say

BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"


def group_arms(results: dict) -> dict[str, list[dict]]:
    """stage results -> {arm: [result per seed]} (post-hoc arms and teachers: a list of one)."""
    arms: dict[str, list[dict]] = {}
    for key, r in results.items():
        arms.setdefault(key.split("@")[0], []).append(r)
    return arms


def statistics(arms: dict[str, list[dict]]) -> dict:
    return {name: {s: arm_statistics([r["windows"][s] for r in rs]) for s in rs[0]["windows"]}
            for name, rs in arms.items()}


def _flagged(rs: list[dict]) -> int:
    return sum(1 for r in rs if r.get("collapse_events"))


def _diff(arms, a: str, b: str, primary: str, key: str = "ppl"):
    if a not in arms or b not in arms:
        return None
    return difference_ci([r["windows"][primary] for r in arms[a]], [r["windows"][primary] for r in arms[b]], key)


def _sign(ci) -> int:
    return 0 if ci is None or ci[0] <= 0 <= ci[1] else (1 if ci[0] > 0 else -1)


def verdicts(arms: dict, stats: dict, rec: dict, primary: str) -> list[dict]:
    """Each claim: held / did not hold / inconclusive, with the evidence that decided it."""
    out = []

    def add(claim, verdict, evidence):
        out.append({"claim": claim, "verdict": verdict, "evidence": evidence})

    def kl(name):
        return stats[name][primary]["kl"] if name in stats else None
    # 1. collapse with learned scales from a pretrained checkpoint, judged by its cost: at the end of training
    #    the zero ratio exceeds its MSE optimum by the margin AND held-out KL is worse than absmean's (CI > 0)
    sweep = [n for n in (*SCALE_LR_SWEEP, "qat-learned-linear", "qat-linear-lr10") if n in arms]
    judged = {n: collapse_by_cost(arms, n, primary) for n in sweep}
    if judged:
        for claim, names in (("at the default scale lr", ("qat-learned", "qat-learned-linear")),
                             ("with a raised scale lr (x3 to x30)", ("qat-learned-lr3", "qat-learned-lr10",
                                                                      "qat-learned-lr30", "qat-linear-lr10"))):
            js = [judged[n] for n in names if n in judged]
            ev = "; ".join(f"{QAT[n][0].split(', ', 1)[1]}: {judged[n]['text']}" for n in names if n in judged)
            if js:
                v = ("held" if any(j["collapsed"] for j in js) else
                     "did not hold" if all(j["verdict"] == "no" for j in js) else "inconclusive")
                add(f"Zero-ratio collapse (zeros > MSE optimum + {MARGIN} and held-out KL worse than absmean's) "
                    f"during QAT+KD from a pretrained checkpoint with learned scales, {claim}", v, ev)
    # 2. not from scratch
    if {"scratch-ternary-learned", "scratch-ternary"} <= set(arms):
        j = collapse_by_cost(arms, "scratch-ternary-learned", primary, ref="scratch-ternary")
        qat_c = sum(jj["collapsed"] for jj in judged.values())
        verdict = "did not hold" if j["collapsed"] else ("held" if qat_c else "inconclusive")
        add("Collapse is specific to starting from a pretrained checkpoint (absent from scratch)", verdict,
            f"from scratch, learned vs absmean scales: {j['text']}; QAT arms collapsed by cost: {qat_c}")
    # 3. guarded scales prevent it
    if {"qat-learned-lr30", "qat-guarded-lr30"} <= set(arms):
        jl, jg = judged.get("qat-learned-lr30") or collapse_by_cost(arms, "qat-learned-lr30", primary), \
            collapse_by_cost(arms, "qat-guarded-lr30", primary)
        d = _diff(arms, "qat-guarded-lr30", "qat-learned-lr30", primary, "kl")
        verdict = "held" if jl["collapsed"] and not jg["collapsed"] else \
            ("did not hold" if jl["collapsed"] else "inconclusive")
        add("The guard band prevents collapse (scale lr x30)", verdict,
            f"learned: {jl['text']}; guarded: {jg['text']}; KL guarded − learned {_fmt_ci(d, 4)}"
            + ("" if jl["collapsed"] else " (nothing to prevent: the learned arm did not collapse)"))
    # 4. learned vs absmean
    for name in ("qat-learned", "qat-learned-linear"):
        d = _diff(arms, name, "qat-absmean", primary, "kl")
        if d is not None:
            v = {-1: "held", 0: "inconclusive", 1: "did not hold"}[_sign(d)]
            add(f"Learned scales ({QAT[name][1].get('scale_param', 'log')}) beat absmean scales", v,
                f"held-out KL learned − absmean, 95 % CI (windows and seeds resampled): {_fmt_ci(d, 4)}")
    # 5. post-hoc correction fails for Mamba, and the Transformer control
    closed: dict[str, float] = {}      # arch -> share of PTQ's KL gap to QAT+KD closed by its best correction
    for arch, prefix, qat in (("Mamba-2", "", "qat-absmean"), ("GPT control", "gpt-", "gpt-qat-absmean")):
        names = [prefix + n for n in (POSTHOC if not prefix else CONTROL_POSTHOC) if prefix + n in stats]
        if qat not in stats or (prefix + "ptq") not in stats or len(names) < 2:
            continue
        best = min((n for n in names if n != prefix + "ptq"), key=kl)
        gap = kl(prefix + "ptq") - kl(qat)
        closed[arch] = (kl(prefix + "ptq") - kl(best)) / gap if gap > 0 else float("nan")
        dd = _diff(arms, best, qat, primary, "kl")
        add(f"{arch}: PTQ + post-hoc corrections do not reach QAT+KD", "held" if _sign(dd) > 0 else
            ("did not hold" if _sign(dd) < 0 else "inconclusive"),
            f"best post-hoc {arms[best][0]['label']}: KL "
            f"{kl(best):.4f} vs QAT+KD {kl(qat):.4f} (difference CI {_fmt_ci(dd, 4)}); it closes "
            f"{100 * closed[arch]:.0f} % of PTQ's KL gap to QAT+KD")
    if len(closed) == 2:
        m, g = closed["Mamba-2"], closed["GPT control"]
        verdict = "held" if g - m > 0.25 else ("did not hold" if g - m < 0.1 else "inconclusive")
        tp = {k: stats[k][primary]["ppl"] for k in ("teacher", "gpt-teacher") if k in stats}
        add("Post-hoc correction fails *because* the model is an SSM (the Transformer control recovers more)",
            verdict, f"share of PTQ's KL gap closed by the best correction: Mamba-2 {100 * m:.0f} %, GPT "
            f"{100 * g:.0f} % (held: GPT ahead by > 25 points; did not hold: < 10); teachers' held-out ppl: "
            + ", ".join(f"{k} {v:.1f}" for k, v in tp.items())
            + (" — the control teacher is far weaker: compare with care" if len(tp) == 2
               and tp["gpt-teacher"] > 1.5 * tp["teacher"] else ""))
    # 6. error carried in the state: judged on the post-hoc students (the claim explains why they fail)
    inj = {n: m["injection"] for n, m in rec["models"].items() if not n.startswith("noise")}
    if inj:
        shares = {n: 1 - i["weights_only"][0] / max(i["own"][0], 1e-12) for n, i in inj.items()}
        post = [v for n, v in shares.items() if n in POSTHOC]
        hi, lo = sum(v >= 0.2 for v in post), sum(v < 0.05 for v in post)
        verdict = "held" if 2 * hi > len(post) else ("did not hold" if 2 * lo > len(post) else "inconclusive")
        add("Quantization error accumulates through the recurrent state (post-hoc students)", verdict,
            "share of the last layer's output error at t0 removed by giving the model the teacher's state "
            "(per post-hoc student; held: most ≥ 20 %, did not hold: most < 5 %): "
            + ", ".join(f"{n} {100 * s:.1f} %" for n, s in shares.items()))
    # 7. state distillation
    d = _diff(arms, "qat-state", "qat-absmean", primary, "kl")
    if d is not None:
        si = [inj[n]["state_only"][0] for n in ("qat-state", "qat-absmean") if n in inj]
        carried = f"; carried-state error at t0 {si[0]:.3f} vs {si[1]:.3f}" if len(si) == 2 else ""
        v = {-1: "held", 0: "inconclusive", 1: "did not hold"}[_sign(d)]
        add("State distillation narrows the held-out gap to the teacher", v,
            f"KL state-distilled − plain, 95 % CI {_fmt_ci(d, 4)}{carried}")
    # 8. QAT+KD vs from scratch
    d = _diff(arms, "qat-absmean", "scratch-ternary", primary)
    if d is not None:
        add("QAT+KD from the pretrained teacher beats ternary training from scratch on the same tokens",
            {-1: "held", 0: "inconclusive", 1: "did not hold"}[_sign(d)], f"held-out ppl QAT+KD − scratch, 95 % CI "
            f"{_fmt_ci(d)}")
    return out


MARGIN = 0.05   # MonitorConfig.collapse_margin's default


def collapse_by_cost(arms: dict, name: str, primary: str, ref: str = "qat-absmean") -> dict:
    """An arm's collapse, judged at the end of training against `ref` (absmean scales) on the same seeds and
    budget: its zero ratio exceeds its MSE optimum by MARGIN and its held-out KL is worse (95 % CI > 0)."""
    rs = arms[name]
    excess = sum(r["zero_ratio"] - r["zero_ratio_opt"] for r in rs) / len(rs)
    d = _diff(arms, name, ref, primary, "kl")
    collapsed = excess > MARGIN and _sign(d) > 0
    verdict = "yes" if collapsed else ("no" if excess <= MARGIN or _sign(d) < 0 else "unclear")
    online = _flagged(rs)
    return {"collapsed": collapsed, "verdict": verdict, "excess": excess, "kl_ci": d,
            "text": f"excess zeros {excess:+.3f}, KL − absmean {_fmt_ci(d, 4)}, online detector {online}/{len(rs)}"
                    f" → {verdict}"}


def _fmt_ci(ci, digits: int = 2) -> str:
    return "-" if ci is None else f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"


def _cell(st: dict, key: str, digits: int) -> str:
    sd = f" ± {st[key + '_sd']:.{digits}f}" if st["seeds"] > 1 else ""
    lo, hi = st[key + "_ci"]
    return f"{st[key]:.{digits}f}{sd} [{lo:.{digits}f}, {hi:.{digits}f}]"


ORDER = ("teacher", *POSTHOC, *QAT, *SCRATCH, "gpt-teacher", *(f"gpt-{n}" for n in CONTROL_POSTHOC), "gpt-qat-absmean")


def table(arms: dict, stats: dict, primary: str) -> list[str]:
    sets = list(next(iter(stats.values())).keys())
    other = [s for s in sets if s != primary]
    head = ["method", f"{primary} ppl: mean ± sd [95 % CI]", "KL to teacher", "top-1 agree", "zero ratio (MSE opt.)",
            "collapse flagged", "seeds", "size (MB)", "tokens", *[f"{s} ppl" for s in other]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in ORDER:
        if name not in arms:
            continue
        rs, st = arms[name], stats[name][primary]
        r = rs[0]
        z = "-"
        if "zero_ratio" in r:    # a post-hoc student's latent weight is not a trained one: no optimum to compare
            opt = f" ({sum(x['zero_ratio_opt'] for x in rs) / len(rs):.3f})" if "calib_tokens" not in r else ""
            z = f"{sum(x['zero_ratio'] for x in rs) / len(rs):.3f}{opt}"
        flag = "-" if "collapse_events" not in r else f"{_flagged(rs)}/{len(rs)}"
        toks = f"{r['tokens']:,}" if r.get("tokens") else (f"0 (calib. {r['calib_tokens']:,})" if "calib_tokens" in r else "-")
        size_b = r.get("size_bytes")
        if size_b is None and "zero_ratio" in r and not name.startswith("gpt") and "ptq" in arms:
            size_b = arms["ptq"][0]["size_bytes"]       # every plain ternary student packs to the same size
        size = f"{size_b / MB:.2f}" if size_b else "-"
        lines.append(f"| {r['label']} | {_cell(st, 'ppl', 2)} | {_cell(st, 'kl', 4)} | {st['top1_agree']:.3f} | {z} | "
                     f"{flag} | {st['seeds']} | {size} | {toks} | "
                     + " | ".join(f"{stats[name][s]['ppl']:.2f}" for s in other) + " |")
    return lines


def recurrence_table(rec: dict) -> list[str]:
    t0 = rec["t0"]
    lines = [f"| model | output error @0 | @{t0} (own state) | @{t0}, teacher's state given | teacher given its state "
             f"@{t0} | … 32 tokens later | state error, heads ≥128 tokens: first 16 → last 16 positions |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, m in rec["models"].items():
        inj = m["injection"]
        long = {k: v for k, v in m["state_abs"].items() if k.startswith(("128", ">="))}
        g = "; ".join(f"{k}: {sum(v['curve'][:4]) / 4:.3g} → {sum(v['curve'][-4:]) / 4:.3g} ({v['heads']} heads)"
                      for k, v in long.items()) or "-"
        later = inj["state_only"][min(32, len(inj["state_only"]) - 1)]
        lines.append(f"| {m['label']} | {m['output_last_layer'][0]:.3f} | {inj['own'][0]:.3f} | "
                     f"{inj['weights_only'][0]:.3f} | {inj['state_only'][0]:.3f} | {later:.3f} | {g} |")
    return lines


def write_results(out: Path, results: dict, rec: dict, claims) -> str:
    """results.json from the stages (every number), then results.md, the plots and — on request — the published
    copy and the README section, each rendered from results.json alone (`render_markdown`, `render_readme`)."""
    from ..version import code_version
    from .plots import write_plots
    arms = group_arms(results)
    primary = next(iter(results["teacher"]["windows"]))
    stats = statistics(arms)
    a = claims.args
    doc = {"config": a.to_dict(), "command": command(a), "code_version": code_version(), "out": str(a.out),
           "seeds": len(claims.seeds), "primary_set": primary,
           "sets": {k: {"windows": len(w), "tokens": len(w) * SEQ_LEN} for k, w in claims.windows.items()},
           "verdicts": verdicts(arms, stats, rec, primary), "statistics": stats, "arms": results, "recurrence": rec,
           "leakage": leakage_table()}
    # compact: per-window arrays for every arm and seed make it megabytes when indented
    atomic_write_bytes(out / "results.json", (json.dumps(doc, separators=(",", ":")) + "\n").encode())
    doc = json.loads((out / "results.json").read_text())     # what follows reads the file, nothing else
    plots = write_plots(out, group_arms(doc["arms"]), doc["recurrence"])
    md = render_markdown(doc, plots)
    atomic_write_bytes(out / "results.md", md.encode())
    if a.publish:
        publish(out, Path(a.publish), plots)
    if a.readme:
        rewrite_readme(Path(a.readme), doc, a.publish or a.out)
    return md


PLOTS = ("collapse.png", "scale_lr_sweep.png", "state_error_by_horizon.png", "injection.png")


def render_markdown(doc: dict, plots: list[str] | tuple[str, ...] = PLOTS) -> str:
    """results.md, from a results.json document alone."""
    arms, stats, rec, primary = group_arms(doc["arms"]), doc["statistics"], doc["recurrence"], doc["primary_set"]
    cfg = doc["config"]
    sets = doc["sets"]
    seeds = doc.get("seeds") or max(st[primary]["seeds"] for st in stats.values())
    lines = ["# Ternary Mamba claims experiment", "", f"Command: `{doc_command(doc)}`", "",
             f"Every training arm ran {seeds} seed(s) of {cfg['tokens']:,} tokens. Cells: mean ± sd over "
             "seeds, and a 95 % bootstrap CI of the seed mean (1,000 resamples of held-out windows and of seeds). "
             "Differences between arms are paired on the same windows; a verdict needs their CI to exclude 0. "
             f"Held-out sets (≤ {cfg['eval_windows']} windows of {SEQ_LEN} tokens each, spread over the set): "
             + ", ".join(f"{k} {v['tokens']:,} tokens" for k, v in sets.items())
             + f"; **{primary}** is primary."
             + (f" Code version {doc['code_version']}." if doc.get("code_version") else ""), "", "## Verdicts", "",
             "| claim | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {v['claim']} | **{v['verdict']}** | {v['evidence']} |" for v in doc["verdicts"]]
    lines += ["", "## All arms", ""] + table(arms, stats, primary)
    lines += ["", f"## Error along the recurrence ({rec['sequences']} held-out sequences of {rec['positions']} "
              f"tokens; QAT and the bundled teacher trained on windows of {rec['train_len']})", ""] + recurrence_table(rec)
    lines += ["", "## Held-out leakage of the corpus split", ""] + list(doc.get("leakage") or leakage_table())
    lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def render_readme(doc: dict, where: str) -> str:
    """The README's claims section (markers included), from a results.json document alone."""
    body = [BEGIN, "", f"Regenerated by `{doc_command(doc)}` — full table, intervals and plots in "
            f"[{where}/results.md]({where}/results.md), every number in [{where}/results.json]({where}/results.json).",
            "", "| claim | verdict | evidence |", "|---|---|---|"]
    body += [f"| {v['claim']} | **{v['verdict']}** | {v['evidence']} |" for v in doc["verdicts"]] + ["", END]
    return "\n".join(body)


def doc_command(doc: dict) -> str:
    """The command recorded in results.json (older files: rebuilt from their config)."""
    if doc.get("command"):
        return doc["command"]
    from ..commands.configs import ClaimsConfig
    return command(ClaimsConfig.from_dict(doc["config"]))


def publish(out: Path, dest: Path, plots) -> None:
    """Copy results.md, results.json and the plots to `dest` — refused unless results.json was produced by this
    command line with this code version (a published number must come from the published command)."""
    from ..errors import UserError
    from ..version import code_version
    doc = json.loads((out / "results.json").read_text())
    stale = sorted({r.get("code_version") for r in doc["arms"].values()} - {code_version()})
    if doc.get("code_version") != code_version() or stale:
        raise UserError(f"{out}: results from another code version ({', '.join(map(str, stale)) or doc.get('code_version')}"
                        f" vs {code_version()}): re-run the experiment before publishing")
    dest.mkdir(parents=True, exist_ok=True)
    for f in ["results.md", "results.json", *plots]:
        shutil.copyfile(out / f, dest / f)


def rewrite_readme(path: Path, doc: dict, where: str) -> None:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        say(f"{path}: no {BEGIN} / {END} markers; README left as it is")
        return
    head, rest = text.split(BEGIN, 1)
    atomic_write_bytes(path, (head + render_readme(doc, where) + rest.split(END, 1)[1]).encode())


def command(a) -> str:
    """The command line that regenerates these results."""
    parts = ["ternary-mamba experiment claims"]
    defaults = type(a)()
    for field in ("teacher", "tokens", "seeds", "control_tokens", "positions", "sequences", "seed", "group_size",
                  "calib_small", "calib_large", "eval_windows", "publish", "readme"):
        v = getattr(a, field)
        if v is not None and v != getattr(defaults, field):
            parts.append(f"--{field.replace('_', '-')} {v}")
    for field in ("data", "eval_data", "all_heldout", "control_data"):
        if getattr(a, field):
            parts.append(f"--{field.replace('_', '-')} {' '.join(shown_data_path(p) for p in getattr(a, field))}")
    if a.skip:
        parts.append(f"--skip {' '.join(a.skip)}")
    return " ".join(parts + [f"--out {a.out}"])


def shown_data_path(path: str) -> str:
    """A corpus path as published results name it: from its `data` folder on, as `DATA/...` (the reader's own
    copy of the corpora), not as the directory layout of the machine the experiment ran on."""
    parts = Path(path).parts
    if "data" in parts and (Path(path).is_absolute() or parts[0] == ".."):
        return str(Path("DATA", *parts[parts.index("data") + 1:]))
    return path
