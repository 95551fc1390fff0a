"""`ternary-mamba report RUN`: report.md with PNG plots for a run folder (made at the end of every run):
loss / KL curves, zero ratio per layer over training, held-out perplexity over training, the summary
and, when present, the evaluation table (eval.md in the run folder)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        raise UserError(f"{run}: not a run folder (no metrics.jsonl)")
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _plot(path: Path, title: str, xlabel: str, ylabel: str, series: dict, logy: bool = False, marks=()) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label, lw=1.4)
    for x, text in marks:
        ax.axvline(x, color="red", ls="--", lw=1)
        ax.text(x, ax.get_ylim()[1], text, color="red", fontsize=8, va="top")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def make_report(run: str | Path) -> Path:
    run = Path(run)
    recs = _records(run)
    spec = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    train = [r for r in recs if "loss" in r]
    ev = [r for r in recs if "eval_ppl" in r]
    zr = [r for r in recs if "zero_ratio_layers" in r]
    figs = []
    toks = lambda rs: [r["tokens"] / 1e6 for r in rs]  # noqa: E731
    if train:
        series = {"loss": (toks(train), [r["loss"] for r in train])}
        if "kl" in train[0]:
            series["KL(teacher || student)"] = (toks(train), [r["kl"] for r in train])
        _plot(run / "loss.png", "training loss", "tokens (M)", "loss", series, logy=True)
        figs.append(("Training loss", "loss.png"))
    if ev:
        series = {"held-out ppl": (toks(ev), [r["eval_ppl"] for r in ev])}
        _plot(run / "heldout_ppl.png", "held-out perplexity", "tokens (M)", "perplexity", series, logy=True)
        figs.append(("Held-out perplexity", "heldout_ppl.png"))
    if zr:
        n_layers = len(zr[0]["zero_ratio_layers"])
        series = {f"layer {i}": (toks(zr), [r["zero_ratio_layers"][i] for r in zr]) for i in range(n_layers)}
        series["all"] = (toks(zr), [r["zero_ratio"] for r in zr])
        events = summary.get("collapse_events") or []
        marks = [(next((r["tokens"] / 1e6 for r in recs if r.get("step") == e["step"]), 0), "collapse") for e in events[:1]]
        _plot(run / "zero_ratio.png", "zero ratio per layer", "tokens (M)", "fraction of weights at 0", series, marks=marks)
        figs.append(("Zero ratio per layer", "zero_ratio.png"))
    lines = [f"# Run report: {run.name}", ""]
    if spec:
        lines += [f"- kind: **{spec.get('kind')}**", f"- teacher: `{spec.get('teacher', '-')}`",
                  f"- quantization: `{json.dumps(spec.get('quantization'))}`",
                  f"- training: {spec.get('train', {}).get('tokens', 0):,} tokens, lr {spec.get('train', {}).get('lr')}", ""]
    if summary.get("rows"):
        lines += ["| model | held-out ppl | KL to teacher | top-1 agree | zero ratio |", "|---|---|---|---|---|"]
        for name, r in summary["rows"].items():
            z = f"{r['zero_ratio']:.3f}" if "zero_ratio" in r else "-"
            lines.append(f"| {name} | {r['ppl']:.2f} | {r['kl']:.4f} | {r['top1_agree']:.3f} | {z} |")
        sz = summary["sizes_bytes"]
        lines += ["", f"Size: FP16 {sz['fp16'] / 1e6:.2f} MB, tq2 {sz['tq2'] / 1e6:.2f} MB, tq1 {sz['tq1'] / 1e6:.2f} MB.", ""]
    elif summary:
        lines += ["```", json.dumps(summary, indent=2), "```", ""]
    if (run / "eval.md").exists():
        lines += ["## Zero-shot evaluation", "", (run / "eval.md").read_text(), ""]
    for title, f in figs:
        lines += [f"## {title}", "", f"![{title}]({f})", ""]
    out = run / "report.md"
    from ..formats.fs import atomic_write_bytes
    atomic_write_bytes(out, "\n".join(lines).encode())
    return out


def run_report(args) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("report needs matplotlib: pip install 'ternary-mamba[plot]'") from None
    print(f"wrote {make_report(args.run)}")


def try_report(out: Path) -> None:
    """report.md with plots, when matplotlib is installed (`ternary-mamba report RUN` later otherwise)."""
    try:
        make_report(out)
    except ImportError:
        pass
