"""The schemas of what a run folder holds besides the model: metrics.jsonl (one JSON object per logged step) and
summary.json (the final table).  Checked when read, with one line naming the file (and line) at fault; a last
metrics line cut short by a kill is skipped, as the resumed run writes it again."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import UserError
from .fs import read_json

LIST_KEYS = ("zero_ratio_layers", "zero_ratio_opt_layers")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl as records: objects with a non-negative integer "step" and numbers (or lists of numbers for
    the per-layer keys) as values."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not the run's metrics file")
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise UserError(f"{path.parent}: not a run folder (no metrics.jsonl)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except RecursionError:
            raise UserError(f"{path}:{i}: JSON nested too deeply") from None
        except json.JSONDecodeError:
            if i == len(lines):              # the last line, cut short by a kill
                continue
            raise UserError(f"{path}:{i}: not JSON") from None
        if not isinstance(r, dict):
            raise UserError(f"{path}:{i}: expected a JSON object, got {type(r).__name__}")
        if type(r.get("step")) is not int or r["step"] < 0:
            raise UserError(f"{path}:{i}: \"step\" must be a non-negative integer, got {r.get('step')!r:.40}")
        for k, v in r.items():
            ok = (isinstance(v, list) and all(_number(x) for x in v)) if k in LIST_KEYS else _number(v)
            if not ok and k not in ("why",):
                raise UserError(f"{path}:{i}: {k!r} must be a number, got {v!r:.40}")
        out.append(r)
    return out


def read_trainer_state(path: Path, total_steps: int) -> dict:
    """trainer_state.json of a checkpoint: {"step": int in [0, total_steps], "world_size": positive int (optional)}."""
    s = read_json(Path(path))
    step = s.get("step")
    if type(step) is not int or step < 0:
        raise UserError(f"{path}: \"step\" must be a non-negative integer, got {step!r:.40}")
    if step > total_steps:
        raise UserError(f"{path}: step {step} is beyond this run's {total_steps} steps; the file is damaged (or the "
                        f"run has another budget)")
    ws = s.get("world_size", 1)
    if type(ws) is not int or not 1 <= ws <= 1 << 20:
        raise UserError(f"{path}: \"world_size\" must be a positive integer, got {ws!r:.40}")
    return s


def read_summary(path: Path) -> dict:
    """summary.json: an object whose "rows" (if any) map names to rows of numbers (ppl, kl, top1_agree, ...)."""
    s = read_json(Path(path))
    rows = s.get("rows", {})
    if not isinstance(rows, dict) or not all(isinstance(r, dict) for r in rows.values()):
        raise UserError(f"{path}: \"rows\" must map names to objects")
    for name, r in rows.items():
        bad = [k for k, v in r.items() if not _number(v) or not math.isfinite(v)]
        if bad:
            raise UserError(f"{path}: row {name!r}: {bad[0]!r} must be a finite number")
    for k in ("tokens", "heldout_tokens", "heldout_ppl", "wall_s"):
        if k in s and not _number(s[k]):
            raise UserError(f"{path}: {k!r} must be a number")
    return s
