"""Results table (markdown + JSON) and plots of the claims experiment."""
from __future__ import annotations

import json
from pathlib import Path

from ..core.config import MB
from ..formats.fs import atomic_write_bytes, write_json_atomic
from .arms import EVAL_BATCHES, POSTHOC, QAT, SCRATCH, SEQ_LEN


def _order() -> tuple[str, ...]:
    return ("teacher", *POSTHOC, *QAT, *SCRATCH)


def table(results: dict) -> str:
    lines = ["| method | held-out ppl | KL to teacher | top-1 agree | zero ratio | collapse flagged | size (MB) "
             "| training tokens |", "|---|---:|---:|---:|---:|---|---:|---:|"]
    for name in _order():
        if name not in results:
            continue
        r = results[name]
        row = r["row"]
        z = f"{row['zero_ratio']:.3f}" if "zero_ratio" in row else "-"
        toks = f"{r['tokens']:,}" if r.get("tokens") else (f"0 (calib. {r['calib_tokens']:,})" if "calib_tokens" in r else "-")
        ev = r.get("collapse_events")
        flag = "-" if ev is None else (f"step {ev[0]['step']} ({len(ev)}x)" if ev else "no")
        lines.append(f"| {r['label']} | {row['ppl']:.2f} | {row['kl']:.4f} | {row['top1_agree']:.3f} | {z} | {flag} | "
                     f"{r['size_bytes'] / MB:.2f} | {toks} |")
    return "\n".join(lines)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_error_vs_position(path: Path, rec: dict, key: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), dpi=110)
    for name, c in rec["curves"].items():
        L = len(c[key][0])
        axes[0].plot([sum(r) / L for r in c[key]], label=name, lw=1.2)
        axes[1].plot([r[-1] for r in c[key]], label=name, lw=1.2)
    for ax, title in zip(axes, ("mean over layers", "last layer")):
        ax.set(title=f"{key} relative error vs teacher ({title})", xlabel="token position", ylabel="relative error")
        ax.set_xscale("symlog", linthresh=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_noise(path: Path, rec: dict) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), dpi=110)
    for layer, c in rec["noise"].items():
        k = int(layer)
        axes[0].plot([r[k] for r in c["state"]], label=f"noise in layer {k}: its own state", lw=1.2)
        axes[1].plot([r[-1] for r in c["output"]], label=f"noise in layer {k}: last-layer output", lw=1.2)
    axes[0].set(title="state error, quantization-sized noise in one layer", xlabel="token position",
                ylabel="relative error")
    axes[1].set(title="last-layer output error", xlabel="token position", ylabel="relative error")
    for ax in axes:
        ax.set_xscale("symlog", linthresh=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_zero_ratio(path: Path, results: dict, threshold: float = 0.6) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    for name, r in results.items():
        if "run" not in r or not name.startswith("qat"):
            continue
        recs = [json.loads(l) for l in (Path(r["run"]) / "metrics.jsonl").read_text().splitlines() if l.strip()]
        zr = [x for x in recs if "zero_ratio" in x]
        line, = ax.plot([x["tokens"] / 1e6 for x in zr], [x["zero_ratio"] for x in zr], label=r["label"], lw=1.3)
        for e in r.get("collapse_events", [])[:1]:
            at = next((x["tokens"] / 1e6 for x in recs if x.get("step") == e["step"]), None)
            if at is not None:
                ax.axvline(at, color=line.get_color(), ls="--", lw=1)
                ax.text(at, ax.get_ylim()[1], " collapse", color=line.get_color(), fontsize=8, va="top")
    ax.axhline(threshold, color="red", ls=":", lw=1, label=f"collapse threshold {threshold}")
    ax.set(title="zero ratio during QAT+KD", xlabel="tokens (M)", ylabel="fraction of ternary weights at 0")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_results(out: Path, results: dict, rec: dict, args) -> str:
    write_json_atomic(out / "results.json", {"results": results, "recurrence_summary": rec["summary"]})
    plots = []
    try:
        plot_error_vs_position(out / "state_error_vs_position.png", rec, "state")
        plot_error_vs_position(out / "output_error_vs_position.png", rec, "output")
        plot_noise(out / "noise_injection.png", rec)
        plot_zero_ratio(out / "zero_ratio.png", results)
        plots = ["state_error_vs_position.png", "output_error_vs_position.png", "noise_injection.png", "zero_ratio.png"]
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'ternary-mamba[plot]')")
    lines = ["# Ternary Mamba claims experiment", "",
             f"Command: `{command(args)}`", "",
             f"Held-out: {held_note(args)}; teacher `{teacher_name(results['teacher']['model'])}`.", "",
             table(results), "",
             "## Error along the recurrence (mean over layers; growth = mean error over the second half of "
             f"the {rec['positions']} positions / mean over the first 16)", "",
             "| model | state error @T | state growth | output error @T | output growth |", "|---|---:|---:|---:|---:|"]
    for name, s in rec["summary"].items():
        lines.append(f"| {results[name]['label']} | {s['state_err_last']:.3f} | {s['state_growth']:.2f}x | "
                     f"{s['output_err_last']:.3f} | {s['output_growth']:.2f}x |")
    lines += [""] + [f"![{p}]({p})" for p in plots]
    md = "\n".join(lines) + "\n"
    atomic_write_bytes(out / "results.md", md.encode())
    return md


def command(args) -> str:
    """The command line that regenerates these results."""
    parts = ["ternary-mamba experiment claims"]
    for flag, value, default in (("--teacher", args.teacher, None), ("--tokens", args.tokens, None),
                                 ("--positions", args.positions, 512), ("--sequences", args.sequences, 8),
                                 ("--seed", args.seed, 0), ("--group-size", args.group_size, 128)):
        if value is not None and value != default:
            parts.append(f"{flag} {value}")
    for flag, values in (("--data", args.data), ("--eval-data", args.eval_data), ("--skip", args.skip)):
        if values:
            parts.append(f"{flag} {' '.join(values)}")
    return " ".join(parts + [f"--out {args.out}"])


def teacher_name(path: str) -> str:
    """How results.md names the teacher: `bundled`, not a machine's site-packages path."""
    from ..assets import TEACHER
    return "bundled" if Path(path).resolve() == TEACHER.resolve() else path


def held_note(args) -> str:
    n = EVAL_BATCHES * 8
    return (f"at most the first {n} windows of {SEQ_LEN} tokens ({n * SEQ_LEN:,} tokens) of "
            + ("the bundled held-out book" if not args.eval_data and not args.data else "the --eval-data text"))
