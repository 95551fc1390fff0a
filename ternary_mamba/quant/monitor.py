"""Zero-ratio monitoring and the collapse detector.

The zero ratio of a ternary module is the fraction of its codes equal to 0.  A high zero ratio is not by
itself a pathology: the reconstruction-optimal scale of this quantizer already zeroes ~46 % of a Gaussian
group and ~63 % of a Laplace one (`quant.ternary.mse_optimal_zeros`).  So collapse is defined by what it
costs: the zero ratio exceeds the per-group MSE-optimal zero ratio of the current latent weights by more
than `margin`, *and* the cost — held-out KL to the teacher (or held-out loss without one; a smoothed training
KL / loss between evaluations) — is more than `tolerance` (relative) above the best it has been in the run.
"""
from __future__ import annotations

import re
import sys

from ..errors import UserError
from .qat import set_scale_mode, ternary_modules

from .config import COLLAPSE_ACTIONS as ACTIONS


def zero_ratio_stats(model, optimum: bool = False) -> dict:
    """Overall zero ratio (weighted by size), per layer (in_proj+out_proj), per module, scale/absmean; with
    `optimum` also the MSE-optimal zero ratio (overall and per layer) and the excess over it.  One host sync for
    the whole model (the per-module figures stay on the device until then)."""
    import torch
    mods = ternary_modules(model)
    keys = ("zero_ratio", "scale_over_absmean", "guard_bound") + (("zero_ratio_opt",) if optimum else ())
    if mods:
        rows = []
        for _, m in mods:
            st = m.stat_tensors(optimum)
            st.setdefault("guard_bound", torch.zeros((), device=m.weight.device))
            rows.append(torch.stack([st[k].float().to(m.weight.device) for k in keys]))
        stacked = torch.stack(rows)
        vals = (stacked.cpu().tolist() if stacked.device.type != "meta"          # meta: shapes only, no values
                else [[float("nan")] * len(keys) for _ in rows])
    else:
        vals = []
    per_layer: dict[int, list[float]] = {}
    per_module, ratios = {}, []
    tot = {"zero_ratio": 0.0, "zero_ratio_opt": 0.0, "guard_bound": 0.0}
    n_all = 0
    for (name, m), row in zip(mods, vals):
        st = dict(zip(keys, row))
        n = m.weight.numel()
        per_module[name] = st["zero_ratio"]
        for k in tot:
            tot[k] += st.get(k, 0.0) * n
        n_all += n
        ratios.append(st["scale_over_absmean"])
        layer = re.search(r"layers\.(\d+)\.", name)
        if layer:
            acc = per_layer.setdefault(int(layer.group(1)), [0.0, 0.0, 0])
            acc[0] += st["zero_ratio"] * n
            acc[1] += st.get("zero_ratio_opt", 0.0) * n
            acc[2] += n
    out = {"zero_ratio": tot["zero_ratio"] / max(n_all, 1),
           "zero_ratio_layers": [round(z / c, 5) for _, (z, _o, c) in sorted(per_layer.items())],
           "zero_ratio_modules": {k: round(v, 5) for k, v in per_module.items()},
           "scale_over_absmean": sum(ratios) / max(len(ratios), 1)}
    if any(m.mode == "guarded" for _, m in mods):
        out["guard_bound"] = tot["guard_bound"] / max(n_all, 1)   # share of weights whose group scale is clamped
    if optimum:
        out["zero_ratio_opt"] = tot["zero_ratio_opt"] / max(n_all, 1)
        out["zero_ratio_opt_layers"] = [round(o / c, 5) for _, (_z, o, c) in sorted(per_layer.items())]
        out["zero_excess"] = out["zero_ratio"] - out["zero_ratio_opt"]
    return out


COST_KEYS = ("eval_kl", "eval_loss")   # held-out cost, preferred; else a smoothed training kl / loss


class ZeroRatioMonitor:
    def __init__(self, every: int = 10, margin: float = 0.05, tolerance: float = 0.05, action: str = "warn",
                 smoothing: float = 0.1, optimum_every: int | None = None):
        """Zero ratios every `every` steps (one pass over the codes); their MSE optimum, a search over 71 scales per
        group (~70 passes over the weights: seconds at 1.3B), every `optimum_every` steps (default 10 x every) and
        at step 1: the latent weights move slowly, so between those the last optimum stands."""
        if action not in ACTIONS:
            raise UserError(f"--on-collapse {action}: choose one of {', '.join(ACTIONS)}")
        self.every, self.margin, self.tolerance, self.action = every, margin, tolerance, action
        self.optimum_every = optimum_every or 10 * every
        self._opt: tuple[float, list[float]] | None = None   # (overall, per layer) MSE-optimal zero ratio
        self.smoothing = smoothing
        self.events: list[dict] = []
        self.best: dict[str, float] = {}    # lowest cost seen so far, per cost key
        self.ema: float | None = None        # smoothed training kl / loss
        self.excess: float | None = None     # last measured zero ratio − optimum
        self.last_cost: tuple[str, float, float] | None = None   # (key, value, best) at the last check
        self._model = None

    def record(self, model, step: int) -> dict:
        self._model = model
        if step % self.every and step != 1:
            return {}
        fresh = self._opt is None or step == 1 or step % self.optimum_every == 0
        st = zero_ratio_stats(model, optimum=fresh)
        if fresh:
            self._opt = (st["zero_ratio_opt"], st["zero_ratio_opt_layers"])
        else:
            st["zero_ratio_opt"], st["zero_ratio_opt_layers"] = self._opt
            st["zero_excess"] = st["zero_ratio"] - st["zero_ratio_opt"]
        self.excess = st["zero_excess"]
        st.pop("zero_ratio_modules")
        return st

    def _cost(self, rec: dict) -> tuple[str, float] | None:
        for k in COST_KEYS:
            if k in rec:
                return k, rec[k]
        v = rec.get("kl", rec.get("loss"))
        if v is None:
            return None
        self.ema = v if self.ema is None else (1 - self.smoothing) * self.ema + self.smoothing * v
        return "train_ema", self.ema

    def collapsing(self, rec: dict) -> str | None:
        cost = self._cost(rec)
        if cost is None:
            return None
        key, value = cost
        best = self.best.get(key, float("inf"))
        self.best[key] = min(best, value)
        self.last_cost = (key, value, self.best[key])
        if self.excess is None or self.excess <= self.margin or best == float("inf"):
            return None
        if value > best * (1 + self.tolerance):
            return (f"zero ratio {self.excess:+.3f} above its MSE optimum while {key} rose {best:.4f} -> "
                    f"{value:.4f} (+{100 * (value / best - 1):.1f} %)")
        return None

    def check(self, rec: dict) -> None:
        why = self.collapsing(rec)
        if why is None:
            return
        last = self.events[-1].get("last_step", self.events[-1]["step"]) if self.events else None
        if last is not None and last >= rec["step"] - self.every and self.action == "warn":
            self.events[-1]["last_step"] = rec["step"]    # one event per episode, not one per step
            return
        event = {"step": rec["step"], "why": why, "action": self.action}
        self.events.append(event)
        if self.action == "stop":
            raise UserError(f"step {rec['step']}: zero-ratio collapse ({why}); stopped (the last checkpoint "
                            f"is intact; rerun with --scale-mode guarded or --on-collapse guard)")
        if self.action == "guard" and self._model is not None and self._model.ternary_config.scale_mode == "learned":
            set_scale_mode(self._model, "guarded")
            print(f"\nstep {rec['step']}: zero-ratio collapse ({why}); switched scales to guarded", file=sys.stderr)
            self.best.clear()
        elif len(self.events) == 1 or self.action == "guard":
            print(f"\nwarning: step {rec['step']}: zero-ratio collapse ({why})", file=sys.stderr)
