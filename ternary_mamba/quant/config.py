"""Typed settings of quantization: `TernaryConfig` (what becomes ternary and how its scales are found) and
`MonitorConfig` (the zero-ratio collapse detector).  No torch here: the CLI builds its flags from these."""
from __future__ import annotations

from dataclasses import dataclass

from ..config_base import Config, option
from ..errors import UserError
from ..spec import (DEFAULT_GROUP_SIZE, SCALE_FORMATS, SCALE_MODES, SCALE_PARAMS, TARGETS,
                    check_group_size, resolve_group_size)

COLLAPSE_ACTIONS = ("warn", "guard", "stop")


@dataclass
class TernaryConfig(Config):
    group_size: int | dict[str, int] = option(DEFAULT_GROUP_SIZE, help="weights per scale along in_features; -1: "
                                              "one per row (a model records it resolved, per projection)")
    scale_mode: str = option("absmean", choices=SCALE_MODES, help="absmean: recomputed each step (BitNet); "
                             "learned: LSQ-trained; frozen: absmean at initialisation, never updated; "
                             "guarded: learned, clamped to the guard band x absmean")
    scale_param: str = option("log", choices=SCALE_PARAMS, help="learned / guarded scales trained as log s "
                              "(each AdamW step a relative change) or as s itself (an absolute one)")
    guard_low: float = option(0.5, help="guarded: lowest scale, x the group's current absmean")
    guard_high: float = option(1.5, help="guarded: highest scale, x the group's current absmean")
    targets: tuple[str, ...] = option(TARGETS, choices=TARGETS, help="projections made ternary")
    scale_format: str = option("fp16", choices=SCALE_FORMATS, help="values the scales are rounded to: fp16, or "
                               "bf16 (exact under bf16 autocast too; --dtype bf16 chooses it)")
    # post-hoc corrections (set by `ternary-mamba ptq`, not trained): an fp output bias per ternary
    # linear and a rank-r term U @ V beside the ternary weight.  Not part of the packed format.
    corr_bias: bool = option(False, cli=False)
    corr_rank: int = option(0, cli=False)

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if self.scale_mode not in SCALE_MODES:
            raise UserError(f"scale mode '{self.scale_mode}' unknown; choose one of {', '.join(SCALE_MODES)}")
        if self.scale_param not in SCALE_PARAMS:
            raise UserError(f"scale param {self.scale_param!r}: choose one of {', '.join(SCALE_PARAMS)}")
        if isinstance(self.group_size, dict):      # resolved per projection (see `resolved`)
            if not self.group_size or not all(isinstance(k, str) and k for k in self.group_size) \
                    or any(check_group_size(v) < 1 for v in self.group_size.values()):
                raise UserError(f"group sizes {self.group_size!r}: a resolved size (>= 1) per projection name")
        else:
            check_group_size(self.group_size)
        if self.scale_format not in SCALE_FORMATS:
            raise UserError(f"scale format {self.scale_format!r}: choose one of {', '.join(SCALE_FORMATS)}")
        if not 0 < self.guard_low < 1 < self.guard_high:
            raise UserError(f"guard band [{self.guard_low}, {self.guard_high}] must satisfy 0 < low < 1 < high")
        if self.corr_rank < 0:
            raise UserError(f"correction rank {self.corr_rank} must be >= 0")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad:
            raise UserError(f"targets {bad}: only in_proj and out_proj can be ternary (the embedding/head stay fp16)")


    def group_for(self, name: str) -> int:
        """The group size asked for a projection called `name` (in_proj, out_proj, ...): -1 only before resolving."""
        if isinstance(self.group_size, dict):
            if name not in self.group_size:
                raise UserError(f"no group size recorded for projection {name!r} (have {sorted(self.group_size)})")
            return self.group_size[name]
        return self.group_size

    def resolved(self, in_features: dict[str, int]) -> "TernaryConfig":
        """This config with `group_size` resolved against each projection's in_features (`spec.resolve_group_size`):
        one int when every projection resolves alike, else {projection: G}.  What a model records and saves."""
        gs = {name: resolve_group_size(self.group_for(name), n, name) for name, n in in_features.items()}
        return self.replace(group_size=gs[next(iter(gs))] if len(set(gs.values())) == 1 else gs)

    @classmethod
    def from_saved(cls, d: dict, source: str = "config.json: quantization") -> "TernaryConfig":
        """The config a saved student records.  Files written before `scale_param` existed hold linear scales."""
        if not isinstance(d, dict):
            raise UserError(f"{source}: expected an object of quantization settings, got {type(d).__name__}")
        return cls.from_dict({"scale_param": "linear", **d}, source)


@dataclass
class MonitorConfig(Config):
    on_collapse: str = option("warn", choices=COLLAPSE_ACTIONS, help="when the detector fires: warn, switch "
                              "learned scales to guarded, or stop the run")
    collapse_margin: float = option(0.05, help="collapse needs the zero ratio this far above the per-group "
                                    "MSE-optimal zero ratio ...")
    collapse_tolerance: float = option(0.05, help="... and the held-out KL (or loss) this far, relative, above "
                                       "its best so far")
    monitor_every: int = option(10, help="steps between zero-ratio measurements (their MSE optimum, a costlier "
                                "search, every 10th measurement)")

    def __post_init__(self):
        if self.on_collapse not in COLLAPSE_ACTIONS:
            raise UserError(f"--on-collapse {self.on_collapse}: choose one of {', '.join(COLLAPSE_ACTIONS)}")
        if not 0 <= self.collapse_margin < 1:
            raise UserError(f"--collapse-margin {self.collapse_margin}: must be in [0, 1)")
        if self.collapse_tolerance < 0:
            raise UserError(f"--collapse-tolerance {self.collapse_tolerance}: must be >= 0")
        if self.monitor_every < 1:
            raise UserError(f"--monitor-every {self.monitor_every}: must be >= 1")
