"""The Transformer control of the claims experiment: a GPT-style teacher of the bundled teacher's size
(`core.gpt`, 5.51 M vs 5.57 M parameters), tokenizer and books, trained by the same trainer and recipe
(AdamW lr 3e-3, 16 x 256 windows, wd 0.1, 5 % warm-up, cosine to 10 %), then given the same PTQ, post-hoc
corrections and QAT+KD as the Mamba-2 teacher.  Every stage checkpoints and resumes like the others."""
from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..core.gpt import GPTConfig, GPTLM
from ..formats.fs import atomic_dir, save_safetensors
from ..quant.config import TernaryConfig
from ..quant.monitor import ZeroRatioMonitor
from ..quant.qat import quantize_
from ..train.config import TrainConfig
from ..train.distill import DistillObjective
from ..train.loop import Trainer
from ..train.objectives import LMObjective
from ..log import say


def save_gpt(model, folder: Path) -> None:
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}   # tied
    meta = {"architecture": "gpt", "config": asdict(model.config)}
    q = getattr(model, "ternary_config", None)
    if q is not None:
        meta["quantization"] = q.to_dict()
    with atomic_dir(folder, overwrite=True) as tmp:
        save_safetensors(sd, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_gpt(folder: Path) -> GPTLM:
    from safetensors.torch import load_file
    meta = json.loads((folder / "config.json").read_text())
    model = GPTLM(GPTConfig(**meta["config"]))
    if meta.get("quantization"):
        quantize_(model, TernaryConfig.from_saved(meta["quantization"]))
    sd = load_file(str(folder / "model.safetensors"))
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    model.load_state_dict(sd, strict=True)
    return model.eval()


def _train(model, objective, cfg: TrainConfig, run: Path, train, held) -> None:
    run.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(model, objective, cfg, run, train, held)
    if (run / "checkpoint" / "trainer_state.json").exists():
        trainer.load_checkpoint()
        say(f"resuming {run} at step {trainer.step}")
    trainer.run()
    return objective


def train_teacher(run: Path, like, train, held, tokens: int, seed: int) -> GPTLM:
    """The control teacher (as many parameters as the Mamba-2 config `like`, same width and vocabulary), trained
    from scratch (resumable); run/model holds it when done."""
    if (run / "model" / "config.json").exists():
        return load_gpt(run / "model")
    torch.manual_seed(seed)
    model = GPTLM(GPTConfig.matching(like.n_params, like.padded_vocab_size, like.d_model), seed=seed)
    cfg = TrainConfig(tokens=tokens, batch_size=16, seq_len=train.seq_len, lr=3e-3, weight_decay=0.1,
                      eval_every=200, eval_batches=4, save_every=50, seed=seed)
    _train(model, LMObjective(cfg.weight_decay), cfg, run, train, held)
    save_gpt(model, run / "model")
    return model.eval()


def qat_student(teacher: GPTLM, run: Path, train, held, tokens: int, seed: int, group_size: int,
                lr: float = 2e-3) -> tuple[GPTLM, list]:
    """QAT+KD of the control teacher with absmean scales (the quantize command's defaults); resumable."""
    if (run / "student" / "config.json").exists():
        events = json.loads((run / "events.json").read_text()) if (run / "events.json").exists() else []
        return load_gpt(run / "student"), events
    torch.manual_seed(seed)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    quantize_(student, TernaryConfig(group_size=group_size, scale_mode="absmean"))
    cfg = TrainConfig(tokens=tokens, seq_len=train.seq_len, lr=lr, weight_decay=0.0, eval_every=25,
                      save_every=50, seed=seed)
    monitor = ZeroRatioMonitor()
    _train(student, DistillObjective(teacher, monitor=monitor), cfg, run, train, held)
    save_gpt(student, run / "student")
    (run / "events.json").write_text(json.dumps(monitor.events))
    return student.eval(), monitor.events
