"""Fault injection for the crash and distributed tests: deterministic points instead of racing a timer.

TERNARY_MAMBA_FAULT=KIND@RANK:STEP[:POINT] fires once the process with that rank reaches POINT at that training
step (the trainer calls `at(rank, step)` as it goes):
  KIND   nan (the loss becomes NaN), raise (a UserError), kill (SIGKILL: the process dies on the spot)
  POINT  loss (default: where the step's loss is computed), save0 .. save3 (inside a checkpoint save, after that
         many of its files are written), swap (between moving the previous checkpoint aside and the new one in)
Unset (always, outside tests), every call is a dictionary lookup and nothing happens.
"""
from __future__ import annotations

import os
import signal

from .errors import UserError

ENV = "TERNARY_MAMBA_FAULT"
KINDS = ("nan", "raise", "kill")
POINTS = ("loss", "save0", "save1", "save2", "save3", "swap")
_where = {"rank": 0, "step": -1}


def at(rank: int, step: int) -> None:
    """The training step this process is on (the context `point` compares with)."""
    _where["rank"], _where["step"] = rank, step


def parse(spec: str) -> tuple[str, int, int, str]:
    kind, _, where = spec.partition("@")
    parts = where.split(":")
    point = parts[2] if len(parts) > 2 else "loss"
    try:
        rank, step = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        raise UserError(f"{ENV}={spec!r}: expected KIND@RANK:STEP[:POINT]") from None
    if kind not in KINDS or point not in POINTS:
        raise UserError(f"{ENV}={spec!r}: kinds {KINDS}, points {POINTS}")
    return kind, rank, step, point


def point(name: str) -> str | None:
    """Called at each named point: kills the process, raises, or returns "nan" when the fault is for here."""
    spec = os.environ.get(ENV)
    if not spec:
        return None
    kind, rank, step, where = parse(spec)
    if (rank, step, where) != (_where["rank"], _where["step"], name):
        return None
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "raise":
        raise UserError(f"rank {rank}: injected fault at step {step}")
    return kind
