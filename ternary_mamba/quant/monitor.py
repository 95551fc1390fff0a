"""Zero-ratio monitoring and the collapse detector.

The zero ratio of a ternary module is the fraction of its codes equal to 0.  Collapse: the overall
zero ratio exceeds `threshold`, or rises by more than `rise` within the last `window` measurements."""
from __future__ import annotations

import re
import sys
from collections import deque

from ..errors import UserError
from .qat import set_scale_mode, ternary_modules

from .config import COLLAPSE_ACTIONS as ACTIONS


def zero_ratio_stats(model) -> dict:
    """Overall zero ratio (weighted by size), per layer (in_proj+out_proj), per module, scale/absmean."""
    per_layer: dict[int, list[float]] = {}
    per_module, total_zero, total, ratios = {}, 0.0, 0, []
    for name, m in ternary_modules(model):
        st = m.stats()
        n = m.weight.numel()
        per_module[name] = st["zero_ratio"]
        total_zero += st["zero_ratio"] * n
        total += n
        ratios.append(st["scale_over_absmean"])
        layer = re.search(r"layers\.(\d+)\.", name)
        if layer:
            z, c = per_layer.setdefault(int(layer.group(1)), [0.0, 0])
            per_layer[int(layer.group(1))] = [z + st["zero_ratio"] * n, c + n]
    return {"zero_ratio": total_zero / max(total, 1),
            "zero_ratio_layers": [round(z / c, 5) for _, (z, c) in sorted(per_layer.items())],
            "zero_ratio_modules": {k: round(v, 5) for k, v in per_module.items()},
            "scale_over_absmean": sum(ratios) / max(len(ratios), 1)}


class ZeroRatioMonitor:
    def __init__(self, every: int = 10, threshold: float = 0.6, window: int = 10, rise: float = 0.08,
                 action: str = "warn"):
        if action not in ACTIONS:
            raise UserError(f"--on-collapse {action}: choose one of {', '.join(ACTIONS)}")
        self.every, self.threshold, self.window, self.rise, self.action = every, threshold, window, rise, action
        self.history: deque[float] = deque(maxlen=window)
        self.events: list[dict] = []
        self._model = None

    def record(self, model, step: int) -> dict:
        self._model = model
        if step % self.every and step != 1:
            return {}
        st = zero_ratio_stats(model)
        self.history.append(st["zero_ratio"])
        st.pop("zero_ratio_modules")
        return st

    def collapsing(self) -> str | None:
        if not self.history:
            return None
        z = self.history[-1]
        if z > self.threshold:
            return f"zero ratio {z:.3f} > threshold {self.threshold}"
        if len(self.history) == self.window and z - self.history[0] > self.rise:
            return f"zero ratio rose {self.history[0]:.3f} -> {z:.3f} over the last {self.window} measurements"
        return None

    def check(self, rec: dict) -> None:
        if "zero_ratio" not in rec:
            return
        why = self.collapsing()
        if why is None:
            return
        event = {"step": rec["step"], "why": why, "action": self.action}
        self.events.append(event)
        if self.action == "stop":
            raise UserError(f"step {rec['step']}: zero-ratio collapse ({why}); stopped (the last checkpoint "
                            f"is intact; rerun with --scale-mode guarded or --on-collapse guard)")
        if self.action == "guard" and self._model is not None and self._model.ternary_config.scale_mode == "learned":
            set_scale_mode(self._model, "guarded")
            print(f"\nstep {rec['step']}: zero-ratio collapse ({why}); switched scales to guarded", file=sys.stderr)
            self.history.clear()
        elif len(self.events) == 1 or self.action == "guard":
            print(f"\nwarning: step {rec['step']}: zero-ratio collapse ({why})", file=sys.stderr)
