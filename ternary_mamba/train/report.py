"""`ternary-mamba report RUN`: report.md with PNG plots for a run folder (made at the end of every run):
loss / KL curves, zero ratio per layer over training, held-out perplexity over training, the summary
and, when present, the evaluation table (eval.md in the run folder)."""
from __future__ import annotations

import json
from pathlib import Path

from ..formats.fs import read_json
from ..formats.records import read_metrics, read_summary


def _records(run: Path) -> list[dict]:
    return read_metrics(run / "metrics.jsonl")


def _plot(path: Path, title: str, xlabel: str, ylabel: str, series: dict, logy: bool = False, marks=(),
          hlines=(), ylim=None) -> None:
    """series: label -> (xs, ys[, style]); marks: vertical (x, text); hlines: horizontal (y, text, color)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for label, (xs, ys, *style) in series.items():
        fmt = style[0] if style else "-"
        if len(xs) < 5 and "o" not in fmt:       # a few points: show them
            fmt += "o"
        ax.plot(xs, ys, fmt, label=label, lw=1.4, ms=3)
    for y, text, color in hlines:
        ax.axhline(y, color=color, ls=":", lw=1.2, label=text)
    if ylim is not None:
        ax.set_ylim(*ylim)
    for x, text in marks:
        ax.axvline(x, color="red", ls="--", lw=1)
        ax.text(x, ax.get_ylim()[1], text, color="red", fontsize=8, va="top")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")       # 40, not 4x10^1
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.grid(alpha=0.3)
    n = len(series) + len(hlines)
    if n > 1:
        ax.legend(fontsize=7, ncol=1 if n <= 4 else 2, loc="best", framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def make_report(run: str | Path) -> Path:
    run = Path(run)
    recs = _records(run)
    record = read_json(run / "run.json") if (run / "run.json").exists() else {}
    cfg = record.get("config", {}) if isinstance(record.get("config"), dict) else {}
    summary = read_summary(run / "summary.json") if (run / "summary.json").exists() else {}
    rows = summary.get("rows") or {}
    train = [r for r in recs if "loss" in r]
    ev = [r for r in recs if "eval_ppl" in r]
    zr = [r for r in recs if "zero_ratio_layers" in r]
    figs = []
    toks = lambda rs: [r["tokens"] / 1e6 for r in rs]  # noqa: E731
    if train:
        series = {}
        same = "kl" in train[0] and all(abs(r["loss"] - r["kl"]) < 1e-9 for r in train)
        if same:   # alpha_ce = 0, tau = 1: the loss is the KL; one curve, said so
            series["loss = KL(teacher || student)"] = (toks(train), [r["kl"] for r in train], "-")
        else:
            series["loss"] = (toks(train), [r["loss"] for r in train], "-")
            if "kl" in train[0]:
                series["KL(teacher || student)"] = (toks(train), [r["kl"] for r in train], "--")
        _plot(run / "loss.png", "training loss", "tokens (M)", "loss", series, logy=True)
        figs.append(("Training loss", "loss.png"))
    if ev:
        # the curve and the summary's lines are measured on different numbers of held-out windows: each says its own
        t = cfg.get("train", {}) if isinstance(cfg.get("train"), dict) else {}
        curve_tok = t.get("eval_batches", 0) * t.get("batch_size", 0) * t.get("seq_len", 0)
        summ_tok = summary.get("heldout_tokens")
        curve_note = f" (first {curve_tok / 1e3:.0f} k tokens)" if curve_tok else ""
        summ_note = f" (summary, {summ_tok / 1e3:.0f} k tokens)" if isinstance(summ_tok, (int, float)) else ""
        series = {f"student, held-out{curve_note}": (toks(ev), [r["eval_ppl"] for r in ev], "o-")}
        refs = [(r["ppl"], f"{name}: {r['ppl']:.2f}{summ_note}", c) for (name, r), c in zip(
            ((n, r) for n, r in rows.items() if n.startswith(("teacher", "PTQ"))), ("green", "gray"))]
        _plot(run / "heldout_ppl.png", "held-out perplexity", "tokens (M)", "perplexity", series, logy=True,
              hlines=refs)
        figs.append(("Held-out perplexity", "heldout_ppl.png"))
    if zr:
        n_layers = len(zr[0]["zero_ratio_layers"])
        series = {f"layer {i}": (toks(zr), [r["zero_ratio_layers"][i] for r in zr]) for i in range(n_layers)}
        series["all"] = (toks(zr), [r["zero_ratio"] for r in zr], "k:")   # dotted: the layers stay visible
        events = summary.get("collapse_events") or []
        marks = [(next((r["tokens"] / 1e6 for r in recs if r.get("step") == e["step"]), 0), "collapse") for e in events[:1]]
        opt = [r for r in zr if "zero_ratio_opt" in r]
        if opt:
            series["MSE-optimal (all)"] = (toks(opt), [r["zero_ratio_opt"] for r in opt], "r--")
        top = max(max(max(r["zero_ratio_layers"]) for r in zr), *(r["zero_ratio_opt"] for r in opt)) * 1.08
        _plot(run / "zero_ratio.png", "zero ratio per layer (dashed: the MSE-optimal zero ratio)", "tokens (M)",
              "fraction of weights at 0", series, marks=marks, ylim=(0, min(1.0, top)))
        figs.append(("Zero ratio per layer", "zero_ratio.png"))
    lines = [f"# Run report: {run.name}", ""]
    if record:
        t = cfg.get("train", {})
        lines += [f"- command: **{record.get('command')}** (ternary-mamba {record.get('ternary_mamba', '?')}, "
                  f"{record.get('world_size', 1)} rank(s))",
                  f"- teacher: `{cfg.get('teacher') or cfg.get('model') or '-'}`",
                  f"- quantization: `{json.dumps(cfg.get('quant'))}`" if cfg.get("quant") else "- full precision",
                  f"- training: {t.get('tokens', 0):,} tokens, lr {t.get('lr')}, {cfg.get('dtype', 'fp32')}", ""]
    if rows:
        lines += ["| model | held-out ppl | KL to teacher | top-1 agree | zero ratio |", "|---|---|---|---|---|"]
        for name, r in rows.items():
            z = f"{r['zero_ratio']:.3f}" if "zero_ratio" in r else "-"
            lines.append(f"| {name} | {r['ppl']:.2f} | {r['kl']:.4f} | {r['top1_agree']:.3f} | {z} |")
        sz = summary["sizes_bytes"]
        lines += ["", f"Size: FP16 {sz['fp16'] / 1e6:.2f} MB, tq2 {sz['tq2'] / 1e6:.2f} MB, tq1 {sz['tq1'] / 1e6:.2f} MB.", ""]
    elif summary:
        lines += ["```", json.dumps(summary, indent=2), "```", ""]
    if (run / "eval.md").exists():
        lines += ["## Zero-shot evaluation", "", (run / "eval.md").read_text(), ""]
    for title, f in figs:
        lines += [f"## {title}", "", f"![{title}]({f}) ([{f}]({f}))", ""]
    if record:
        lines += ["## Configuration (run.json: `ternary-mamba " + str(record.get("command")) +
                  " --config run.json` replays it)", "", "```json", json.dumps(cfg, indent=2), "```", ""]
    out = run / "report.md"
    from ..formats.fs import atomic_write_bytes
    atomic_write_bytes(out, "\n".join(lines).encode())
    return out


def try_report(out: Path) -> None:
    """report.md with plots, when matplotlib is installed (`ternary-mamba report RUN` later otherwise)."""
    try:
        make_report(out)
    except ImportError:
        pass
