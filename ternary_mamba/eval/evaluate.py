"""`ternary-mamba eval`: several models side by side on the zero-shot tasks; JSON + markdown table."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..errors import UserError
from ..formats.fs import atomic_write_bytes
from ..runtime.load import load_for_scoring
from ..ops.device import autocast, precision
from .scoring import loglikelihoods
from .tasks import AVERAGE_METRIC, SEVEN, Doc, load_task, parse_tasks
from ..log import say


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / max(n - 1, 1))


def score_task(model, tok, name: str, docs: list[Doc], batch_size: int, max_len: int) -> dict:
    pairs = [(c, x) for d in docs for c, x in zip(d.contexts, d.continuations)]
    t0 = time.time()
    lls = loglikelihoods(model, tok, pairs, batch_size, max_len, progress=True)
    wall = time.time() - t0
    out = {"n": len(docs), "requests": len(pairs), "wall_s": wall, "req_per_s": len(pairs) / max(wall, 1e-9)}
    if name == "lambada_openai":
        out["perplexity"] = math.exp(-sum(ll for ll, _ in lls) / len(lls))
        out["acc"] = sum(g for _, g in lls) / len(lls)
        out["acc_stderr"] = _stderr(out["acc"], len(lls))
        return out
    acc = acc_norm = 0
    k = 0
    for d in docs:
        scores = [ll for ll, _ in lls[k:k + len(d.continuations)]]
        k += len(d.continuations)
        lengths = [len(x[1:] if x.startswith(" ") else x) for x in d.continuations]
        acc += max(range(len(scores)), key=lambda i: scores[i]) == d.gold
        acc_norm += max(range(len(scores)), key=lambda i: scores[i] / max(lengths[i], 1)) == d.gold
    n = len(docs)
    out.update(acc=acc / n, acc_norm=acc_norm / n, acc_stderr=_stderr(acc / n, n), acc_norm_stderr=_stderr(acc_norm / n, n),
               chance=sum(1 / len(d.continuations) for d in docs) / n)   # a uniform guess over each doc's choices
    return out


def average_seven(results: dict) -> float | None:
    if not all(t in results for t in SEVEN):
        return None
    return sum(results[t][AVERAGE_METRIC[t]] for t in SEVEN) / len(SEVEN)


def evaluate_model(path: str, tasks: list[str], data_dir: Path, limit: int | None, batch_size: int,
                   max_len: int, log=say, device: str | None = None, dtype: str = "fp32") -> dict:
    dev, dt = precision(device, dtype)
    model, tok = load_for_scoring(path, dev)
    model = model.to(dev)
    res = {}
    for name in tasks:
        docs = load_task(name, data_dir)
        if limit:
            docs = docs[:limit]
        with torch.no_grad(), autocast(dev, dt):
            r = score_task(model, tok, name, docs, batch_size, max_len)
        res[name] = r
        main = "perplexity" if name == "lambada_openai" else AVERAGE_METRIC[name]
        chance = f", chance {r['chance']:.4f}" if "chance" in r else ""
        log(f"  {name:<15} {main} {r[main]:.4f}  (acc {r['acc']:.4f}{chance}; {r['n']} docs, {r['wall_s']:.0f} s, "
            f"{r['req_per_s']:.1f} req/s)")
    avg = average_seven(res)
    return {"model": str(path), "tasks": res, "avg7": avg}


def evaluate_with_harness(path: str, tasks: list[str], data_dir: Path, limit: int | None, batch_size: int) -> dict:
    try:
        from .harness_tasks import run_harness
    except ImportError:
        raise UserError("--harness needs lm-eval: pip install 'ternary-mamba[eval]'") from None
    t0 = time.time()
    res = run_harness(path, tasks, data_dir, limit, batch_size)
    for t in tasks:
        res[t].setdefault("acc", 0.0)
        res[t]["wall_s"] = time.time() - t0
    return {"model": str(path), "tasks": res, "avg7": average_seven(res), "scorer": "lm-eval"}


def markdown_table(all_results: list[dict], tasks: list[str]) -> str:
    head = ["model"] + [f"{t} ({'ppl' if t == 'lambada_openai' else AVERAGE_METRIC[t]})" for t in tasks]
    if all(r["avg7"] is not None for r in all_results):
        head.append("avg (7 tasks)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in all_results:
        cells = [Path(r["model"]).name or r["model"]]
        for t in tasks:
            v = r["tasks"][t]
            cells.append(f"{v['perplexity']:.1f} / acc {100 * v['acc']:.1f}" if t == "lambada_openai"
                         else f"{100 * v[AVERAGE_METRIC[t]]:.1f}")
        if len(head) > len(tasks) + 1:
            cells.append(f"{100 * r['avg7']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    first = all_results[0]["tasks"] if all_results else {}
    if all("chance" in first.get(t, {}) for t in tasks if t != "lambada_openai"):   # what guessing scores
        cells = ["*chance (uniform guess)*"] + ["-" if t == "lambada_openai" else f"{100 * first[t]['chance']:.1f}"
                                                for t in tasks]
        if len(head) > len(tasks) + 1:
            cells.append(f"{100 * sum(first[t]['chance'] for t in SEVEN) / len(SEVEN):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_eval(args) -> list[dict]:
    """`args`: an EvalConfig (commands/configs.py) or anything with its fields."""
    tasks = parse_tasks(args.tasks)
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: --data-dir is not a folder")
    for t in tasks:  # fail before loading any model
        load_task(t, data_dir) if args.limit is None else None
    results = []
    t0 = time.time()
    for m in args.models:
        say(f"{m}:")
        if args.harness:
            results.append(evaluate_with_harness(m, tasks, data_dir, args.limit, args.batch_size))
        else:
            results.append(evaluate_model(m, tasks, data_dir, args.limit, args.batch_size, args.max_len,
                                          device=getattr(args, "device", None), dtype=getattr(args, "dtype", "fp32")))
    table = markdown_table(results, tasks)
    say("\n" + table)
    say(f"\nwall time {time.time() - t0:.0f} s" + ("" if args.limit is None else f" (--limit {args.limit})"))
    say("metric per task: acc_norm for hellaswag, arc_challenge, openbookqa; acc otherwise "
          "(Mamba / Bi-Mamba convention); lambada: perplexity / acc")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, (json.dumps({"results": results, "limit": args.limit}, indent=2) + "\n").encode())
        atomic_write_bytes(out.with_suffix(".md"), (table + "\n").encode())
        say(f"wrote {out} and {out.with_suffix('.md')}")
    return results
