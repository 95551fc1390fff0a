"""`Run`: the skeleton every training command shares, so `quantize` and `pretrain` only build their model and
objective.  It owns, in order:

  precision     device and dtype from the config (`--device`, `--dtype`), and the bf16-scale rule: under bf16
                autocast the ternary scales are bf16 values (exact in fp32, fp16 and bf16), recorded in run.json
  folder + data run.json (the typed config: `--config run.json` replays it), the resume check, tokenized data
                (rank 0 tokenizes, the others read the cache)
  training      the Trainer (activation checkpointing, checkpoint resume, metric sinks), then the model gathered
                from every rank (FSDP)
  results       the trained model folder, summary.json and report.md, written atomically by rank 0
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from ..config_base import resume_free_paths
from ..formats.folders import save_model
from ..formats.fs import write_json_atomic
from ..ops.device import precision
from . import distributed as D
from .checkpointing import checkpoint_blocks_
from .loop import Trainer, note_token_budget
from .report import try_report
from .runs import prepare_run_and_data, run_record
from .sinks import MetricSinks
from ..log import say


class Run:
    def __init__(self, command: str, cfg, announce: bool = True):
        """`cfg`: the command's typed config, with device, dtype, out, resume, fsdp, log_to, train, cache_dir
        (and `quant` when it trains ternary weights)."""
        self.command, self.config_cls = command, type(cfg)
        self.device, self.dtype = precision(cfg.device, cfg.dtype)
        quant = getattr(cfg, "quant", None)
        if quant is not None and self.dtype == torch.bfloat16 and quant.scale_format != "bf16":
            if announce:
                say("--dtype bf16: scales rounded to bf16 values (--scale-format bf16), so training, export and "
                      "inference use the same weights")
            cfg = cfg.replace(quant=quant.replace(scale_format="bf16"))
        self.cfg = cfg
        self.resumed = False
        self.trainer: Trainer | None = None
        self.wall_s = 0.0
        self.last_metrics: dict = {}

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def check_budget(self) -> None:
        """The token budget is valid (before anything is written or tokenized)."""
        note_token_budget(self.cfg.train)
        self.cfg.train.total_steps

    def open(self, tokenizer, heldout_fraction: float):
        """Create (or check, to resume) the run folder and prepare the data: (train, held-out) sequences.  The
        config recorded is `self.cfg` as it stands now: replace paths by absolute ones before calling."""
        c = self.cfg
        self.resumed, train, held = prepare_run_and_data(
            self.out, run_record(self.command, c), c.resume, resume_free_paths(self.config_cls), c.data,
            c.eval_data, tokenizer, c.train.seq_len, heldout_fraction, c.cache_dir, budget=c.train.tokens)
        return train, held

    def trainer_for(self, model, objective, train, held) -> Trainer:
        """The Trainer of this run (loaded from the checkpoint when resuming), with its metric sinks."""
        c = self.cfg
        if c.activation_checkpointing:
            checkpoint_blocks_(model)
        t = Trainer(model, objective, c.train, self.out, train, held, fsdp=c.fsdp, device=self.device,
                    dtype=self.dtype)
        if self.resumed:
            t.load_checkpoint()
            say(f"resuming {self.out} at step {t.step}")
        if c.log_to != ("jsonl",) and D.is_main():
            t.sinks = MetricSinks(self.out, c.log_to, c.to_dict())
        self.trainer = t
        return t

    def train(self, rebuild: Callable[[], torch.nn.Module]):
        """Run the trainer to the end; returns the trained model gathered on rank 0 (`rebuild` makes an empty one
        to gather into under FSDP), None on the other ranks."""
        t = self.trainer
        t0 = time.time()
        self.last_metrics = t.run() or {}
        self.wall_s = time.time() - t0
        if t.sinks is not None:
            t.sinks.close()
        model = D.gathered_model(t, rebuild)
        return model if D.is_main() else None

    @property
    def tokens_trained(self) -> int:
        return self.trainer.step * self.cfg.train.tokens_per_step

    def finish(self, model, folder: str, tokenizer_path, summary: dict, extra: dict) -> Path:
        """Write the model folder (`out/folder`), summary.json and report.md (rank 0)."""
        save_model(model, self.out / folder, tokenizer_path=tokenizer_path, overwrite=True, extra=extra)
        from ..ops.dispatch import impls_run
        write_json_atomic(self.out / "summary.json", {**summary, "kernel_paths": impls_run()})
        try_report(self.out)
        return self.out / folder
