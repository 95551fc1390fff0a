"""Plots of the claims experiment (matplotlib, optional: without it the tables are still written)."""
from __future__ import annotations

from pathlib import Path

from .arms import QAT, SCALE_LR_SWEEP
from ..log import say


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)


def plot_collapse(path: Path, arms: dict) -> None:
    """Per QAT arm (first seed): zero ratio, its excess over the MSE optimum, held-out KL, vs tokens."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    for name in QAT:
        if name not in arms:
            continue
        r = arms[name][0]
        zr = [c for c in r["curve"] if "zero_ratio" in c and "zero_ratio_opt" in c]
        ev = [c for c in r["curve"] if "eval_kl" in c]
        line, = axes[0].plot([c["tokens"] / 1e6 for c in zr], [c["zero_ratio"] for c in zr], lw=1.2, label=r["label"])
        axes[1].plot([c["tokens"] / 1e6 for c in zr], [c["zero_ratio"] - c["zero_ratio_opt"] for c in zr], lw=1.2,
                     color=line.get_color())
        axes[2].plot([c["tokens"] / 1e6 for c in ev], [c["eval_kl"] for c in ev], lw=1.2, color=line.get_color())
        for e in r.get("collapse_events", [])[:1]:
            at = next((c["tokens"] / 1e6 for c in r["curve"] if c.get("step", -1) >= e["step"]), None)
            if at is not None:
                axes[1].axvline(at, color=line.get_color(), ls="--", lw=0.8)
    axes[1].axhline(0.05, color="red", ls=":", lw=1, label="collapse margin")
    for ax, t, y in zip(axes, ("zero ratio", "zero ratio − MSE-optimal zero ratio", "held-out KL to teacher"),
                        ("fraction at 0", "excess", "nats/token")):
        ax.set(title=t, xlabel="tokens (M)", ylabel=y)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=6)
    axes[1].legend(fontsize=7)
    _save(fig, path)


def plot_sweep(path: Path, arms: dict) -> None:
    """Final excess zero ratio and held-out KL vs the scale-lr multiplier (every seed a point)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for name in SCALE_LR_SWEEP:
        if name not in arms:
            continue
        mult = QAT[name][2].get("scale_lr_mult", 1.0)
        for r in arms[name]:
            kl = [c["eval_kl"] for c in r["curve"] if "eval_kl" in c]
            axes[0].scatter([mult], [r["zero_ratio"] - r["zero_ratio_opt"]], color="C0", s=14)
            axes[1].scatter([mult], [kl[-1] if kl else float("nan")], color="C1", s=14)
    for ax, t in zip(axes, ("zero ratio − optimum at the end", "held-out KL at the end")):
        ax.set(title=t, xlabel="scale lr multiplier (learned, log space)")
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    _save(fig, path)


def plot_heads(path: Path, rec: dict) -> None:
    """State error per horizon bin vs position, absolute and relative, for every analysed model."""
    plt = _plt()
    models = [n for n in rec["models"] if not n.startswith("noise")]
    fig, axes = plt.subplots(2, max(1, len(models)), figsize=(4 * max(1, len(models)), 6.5), dpi=100, squeeze=False)
    for j, name in enumerate(models):
        m = rec["models"][name]
        for i, key in enumerate(("state_abs", "state_rel")):
            ax = axes[i][j]
            for label, b in m[key].items():
                ax.plot([4 * k for k in range(len(b["curve"]))], b["curve"], lw=1.1,
                        label=f"horizon {label} ({b['heads']} heads)")
            ax.set(title=f"{m['label'][:38]}\n{'absolute' if i == 0 else 'relative'} state error",
                   xlabel="token position")
            ax.grid(alpha=0.3)
            if key == "state_abs":
                ax.set_yscale("log")
    if models:
        axes[0][0].legend(fontsize=6)
    _save(fig, path)


def plot_injection(path: Path, rec: dict) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    t0 = rec["t0"]
    for i, (name, m) in enumerate(rec["models"].items()):
        inj = m["injection"]
        xs = list(range(t0, t0 + len(inj["own"])))
        ax.plot(xs, inj["own"], color=f"C{i}", lw=1.2, label=f"{m['label'][:40]}: own state")
        ax.plot(xs, inj["weights_only"], color=f"C{i}", lw=1, ls="--")
        ax.plot(xs, inj["state_only"], color=f"C{i}", lw=1, ls=":")
    ax.set(title=f"last-layer output error after t0 = {t0}: own (solid), given the teacher's state (dashed), "
                 "teacher given the model's state (dotted)", xlabel="token position", ylabel="relative error")
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    if rec["models"]:
        ax.legend(fontsize=6)
    _save(fig, path)


def write_plots(out: Path, arms: dict, rec: dict) -> list[str]:
    try:
        _plt()
    except ImportError:
        say("matplotlib is not installed: no plots (pip install 'ternary-mamba[plot]')")
        return []
    plots = {"collapse.png": lambda p: plot_collapse(p, arms), "scale_lr_sweep.png": lambda p: plot_sweep(p, arms),
             "state_error_by_horizon.png": lambda p: plot_heads(p, rec),
             "injection.png": lambda p: plot_injection(p, rec)}
    for name, fn in plots.items():
        fn(out / name)
    return list(plots)
