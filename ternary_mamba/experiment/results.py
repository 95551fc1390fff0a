"""The claims experiment's results: statistics over seeds and windows, the verdict on every claim, and
results.json / results.md (and, on request, a published copy and the README's claims section)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..core.config import MB
from ..formats.fs import atomic_write_bytes
from .arms import BUDGETS, CONTROL_POSTHOC, POSTHOC, QAT, SCRATCH, SEQ_LEN
from .heldout import leakage_table
from .stats import arm_statistics
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


def verdict_set(sets: dict) -> str:
    """The held-out set the verdicts are judged on: all eight books where they were evaluated, else the first."""
    return "all8" if "all8" in sets else next(iter(sets))


def verdicts(arms: dict, rec: dict, sets: dict) -> tuple[list[dict], list[dict]]:
    """(table rows {claim, verdict, evidence}, the full rule rows): every claim by its pre-registered rule
    (experiment/rules.py) on the all-eight-books set where it was evaluated (else the primary one), the other sets
    beside; the recurrence claim by the injection split."""
    from .rules import claim_rows, evidence
    judged_on = verdict_set(sets)
    rows = claim_rows(arms, sets, judged_on)
    table = [{"claim": r["claim"] + (f" [{judged_on}]" if "ci" in r or "curve" in r else ""), "verdict": r["verdict"],
              "evidence": evidence(r)} for r in rows]
    # error carried in the state: judged on the post-hoc students (the claim explains why they fail), over every
    # position after t0 and every sequence (runs that recorded them), else at t0 as the first rules did
    from .rules import recurrence_row
    rr = recurrence_row(rec["models"], set(POSTHOC))
    if rr is not None:
        rows.append(rr)
        table.append({"claim": rr["claim"], "verdict": rr["verdict"], "evidence": rr["composite"]})
    inj = {n: m["injection"] for n, m in rec["models"].items() if not n.startswith("noise")}
    if inj and rr is None:
        shares = {n: 1 - i["weights_only"][0] / max(i["own"][0], 1e-12) for n, i in inj.items()}
        post = [v for n, v in shares.items() if n in POSTHOC]
        hi, lo = sum(v >= 0.2 for v in post), sum(v < 0.05 for v in post)
        verdict = "held" if 2 * hi > len(post) else ("did not hold" if 2 * lo > len(post) else "inconclusive")
        table.append({"claim": "Quantization error accumulates through the recurrent state (post-hoc students)",
                      "verdict": verdict, "evidence": "share of the last layer's output error at t0 removed by "
                      "giving the model the teacher's state (per post-hoc student; held: most ≥ 20 %, did not hold: "
                      "most < 5 %): " + ", ".join(f"{n} {100 * s:.1f} %" for n, s in shares.items())})
    return table, rows


def _cell(st: dict, key: str, digits: int) -> str:
    sd = f" ± {st[key + '_sd']:.{digits}f}" if st["seeds"] > 1 else ""
    lo, hi = st[key + "_ci"]
    return f"{st[key]:.{digits}f}{sd} [{lo:.{digits}f}, {hi:.{digits}f}]"


ORDER = ("teacher", *POSTHOC, *QAT, *BUDGETS, *SCRATCH, "gpt-teacher", *(f"gpt-{n}" for n in CONTROL_POSTHOC),
         "gpt-qat-absmean", *(f"gpt-{n}" for n in BUDGETS))


def table(arms: dict, stats: dict, primary: str) -> list[str]:
    sets = list(next(iter(stats.values())).keys())
    other = [s for s in sets if s != primary]
    head = ["method", f"{primary} ppl: mean ± sd [95 % CI]", "KL to teacher", "top-1 agree", "zero ratio (MSE opt.)",
            "collapse flagged", "seeds", "size (MB)", "bits / weight", "tokens", "wall (min / seed)",
            *[f"{s} ppl" for s in other]]
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
        bits = f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") else "-"
        walls = [x["stage_wall_s"] for x in rs if "stage_wall_s" in x]     # training / calibration + evaluation
        wall = f"{sum(walls) / len(walls) / 60:.1f}" if walls else "-"
        lines.append(f"| {r['label']} | {_cell(st, 'ppl', 2)} | {_cell(st, 'kl', 4)} | {st['top1_agree']:.3f} | {z} | "
                     f"{flag} | {st['seeds']} | {size} | {bits} | {toks} | {wall} | "
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
           "sets": {k: {"windows": len(w), "tokens": len(w) * SEQ_LEN, **claims.books[k]}
                    for k, w in claims.windows.items()},
           "statistics": stats, "arms": results, "recurrence": rec, "leakage": leakage_table()}
    doc["verdicts"], doc["rules"] = verdicts(arms, rec, doc["sets"])
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
    judged = verdict_set(sets)
    seeds = doc.get("seeds") or max(st[primary]["seeds"] for st in stats.values())
    lines = ["# Ternary Mamba claims experiment", "", f"Command: `{doc_command(doc)}`", "",
             f"Every training arm ran {seeds} seed(s) of {cfg['tokens']:,} tokens (budget arms: their tokens and "
             "seeds in the table). Cells: mean ± sd over seeds, and a 95 % bootstrap CI of the seed mean (1,000 "
             "resamples of held-out windows and of seeds). Differences between arms are paired on the same windows; "
             + ("each verdict's rule, CI (books, then windows, then seeds resampled) and margin sensitivity are in "
                "its row. " if doc.get("rules") else "a verdict needs their CI to exclude 0. ")
             + f"Held-out sets (≤ {cfg['eval_windows']} windows of {SEQ_LEN} tokens each, spread over the set): "
             + ", ".join(f"{k} {v['tokens']:,} tokens" for k, v in sets.items())
             + (f"; verdicts are judged on **{judged}** (the set named in each row; the others beside), the table of "
                f"arms is on **{primary}** (its first columns)." if judged != primary else f"; **{primary}** is primary.")
             + (f" Code version {doc['code_version']}." if doc.get("code_version") else "")
             + (" Wall: each stage's own time (training or calibration, then evaluation), mean per seed."
                if any("stage_wall_s" in r for r in doc["arms"].values()) else ""), "", "## Verdicts", "",
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
