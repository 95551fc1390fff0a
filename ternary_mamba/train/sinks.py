"""Where a run's metrics go besides metrics.jsonl (always written: resume and the report read it):

    csv          metrics.csv in the run folder, long format (step, name, value): new metrics never break columns
    tensorboard  event files in <run>/tensorboard (needs `tensorboard`: pip install 'ternary-mamba[logging]')
    wandb        a W&B run; offline unless WANDB_MODE says otherwise, so it works without a network
                 (`wandb sync <run>/wandb/offline-run-*` uploads it later; needs `wandb`)

Only rank 0 writes.  Every sink gets the same numeric scalars of each record."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from ..errors import UserError

SINKS = ("jsonl", "csv", "tensorboard", "wandb")


class MetricSinks:
    def __init__(self, run_dir: Path, kinds: tuple[str, ...] = ("jsonl",), config: dict | None = None):
        unknown = [k for k in kinds if k not in SINKS]
        if unknown:
            raise UserError(f"--log-to {unknown[0]}: choose from {', '.join(SINKS)}")
        self.run_dir, self.kinds = Path(run_dir), tuple(kinds)
        self._csv = self._tb = self._wandb = None
        if "csv" in kinds:
            new = not (self.run_dir / "metrics.csv").exists()
            self._csv_file = open(self.run_dir / "metrics.csv", "a", newline="")
            self._csv = csv.writer(self._csv_file)
            if new:
                self._csv.writerow(["step", "name", "value"])
        if "tensorboard" in kinds:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--log-to tensorboard needs tensorboard: pip install 'ternary-mamba[logging]'") from None
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if "wandb" in kinds:
            try:
                import wandb
            except ImportError:
                raise UserError("--log-to wandb needs wandb: pip install 'ternary-mamba[logging]'") from None
            os.environ.setdefault("WANDB_MODE", "offline")
            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(project="ternary-mamba", name=self.run_dir.name, dir=str(self.run_dir),
                                     config=config or {}, resume="allow", id=self.run_dir.name.replace("/", "-"))

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._csv is not None:
            for k, v in scalars.items():
                self._csv.writerow([step, k, v])
            self._csv_file.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._csv is not None:
            self._csv_file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
