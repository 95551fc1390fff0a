"""`ternary-mamba pretrain`: next-token training of a Mamba-2 from random initialisation.

With --ternary the model is quantized (grouped ternary QAT) from step 0: the paper's from-scratch control."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config_base import resume_free_paths
from ..core.config import PRESETS
from ..core.model import Mamba2LM
from ..formats.configs import resolve_config
from ..formats.folders import save_model
from ..formats.fs import write_json_atomic
from ..formats.tokenizer import load_tokenizer
from ..ops.device import autocast, precision
from ..quant.monitor import ZeroRatioMonitor
from ..quant.qat import quantize_
from ..train import distributed as D
from ..train.checkpointing import checkpoint_blocks_
from ..train.loop import Trainer, note_token_budget
from ..train.sinks import MetricSinks
from ..train.objectives import LMObjective
from ..train.report import try_report
from ..train.runs import prepare_run_and_data, run_record
from .configs import PretrainConfig, resolve_auto_dtype
from .flags import require
from .quantize import absolute


def pretrain(cfg: PretrainConfig) -> Path:
    """Train from random initialisation (ternary from step 0 with `cfg.ternary`); returns the run folder.
    The Python twin of `ternary-mamba pretrain`."""
    require(cfg, "model", "tokenizer", "data", "out", command="pretrain")
    cfg = resolve_auto_dtype(cfg)
    device, dtype = precision(cfg.device, cfg.dtype)
    torch.manual_seed(cfg.train.seed)
    mcfg = resolve_config(cfg.model)
    tok = load_tokenizer(cfg.tokenizer)
    if tok.vocab_size > mcfg.vocab_size:
        mcfg = mcfg.replace(vocab_size=tok.vocab_size)
    if cfg.chunk_size:
        mcfg = mcfg.replace(chunk_size=cfg.chunk_size)
    tcfg = cfg.train
    note_token_budget(tcfg)
    tcfg.total_steps  # validates the budget before anything is written
    if cfg.ternary and dtype == torch.bfloat16 and cfg.quant.scale_format != "bf16":
        # the same rule as quantize: bf16 autocast is exact only with bf16-valued scales; recorded in run.json so
        # that a run in progress reloads with them
        cfg = cfg.replace(quant=cfg.quant.replace(scale_format="bf16"))
    cfg = cfg.replace(model=cfg.model if cfg.model in PRESETS else str(Path(cfg.model).resolve()),
                      tokenizer=str(Path(cfg.tokenizer).resolve()), data=absolute(cfg.data),
                      eval_data=absolute(cfg.eval_data))
    out = Path(cfg.out)
    resume, train, held = prepare_run_and_data(out, run_record("pretrain", cfg), cfg.resume,
                                               resume_free_paths(PretrainConfig), cfg.data, cfg.eval_data, tok,
                                               tcfg.seq_len, 0.01, cfg.cache_dir, budget=tcfg.tokens)

    def build():
        m = Mamba2LM(mcfg)
        m.reset_parameters(seed=tcfg.seed)
        if cfg.ternary:
            quantize_(m, cfg.quant)
        return m
    model = build().to(device)
    qmon = ZeroRatioMonitor() if cfg.ternary else None
    if cfg.activation_checkpointing:
        checkpoint_blocks_(model)
    trainer = Trainer(model, LMObjective(tcfg.weight_decay, qmon), tcfg, out, train, held, fsdp=cfg.fsdp,
                      device=device, dtype=dtype)
    if resume:
        trainer.load_checkpoint()
        print(f"resuming {out} at step {trainer.step}")
    print(f"pretraining {mcfg.n_params / 1e6:.2f} M params on {len(train) * tcfg.seq_len / 1e6:.1f} M tokens "
          f"(budget {tcfg.tokens / 1e6:.1f} M), held-out {len(held) * tcfg.seq_len / 1e3:.0f} k tokens")
    if cfg.log_to != ("jsonl",) and D.is_main():
        trainer.sinks = MetricSinks(out, cfg.log_to, cfg.to_dict())
    t0 = time.time()
    last = trainer.run()
    wall = time.time() - t0
    if trainer.sinks is not None:
        trainer.sinks.close()
    model = D.gathered_model(trainer, build)
    if not D.is_main():
        return out
    model.eval()
    with torch.no_grad(), autocast(device, dtype):
        ev = LMObjective(0).evaluate(model, held, 10**9, tcfg.batch_size)  # the whole held-out set
    summary = {"params": mcfg.n_params, "tokens": trainer.step * tcfg.tokens_per_step, "wall_s_this_session": wall,
               "heldout_loss": ev["loss"], "heldout_ppl": ev["ppl"], "heldout_tokens": len(held) * tcfg.seq_len,
               "final_train_loss": last.get("loss")}
    save_model(model, out / "model", tokenizer_path=tok.path, overwrite=True,
               extra={"training": {"kind": "pretrain", **summary}})
    write_json_atomic(out / "summary.json", summary)
    try_report(out)
    print(f"done: held-out ppl {ev['ppl']:.2f} (loss {ev['loss']:.4f}) over {summary['heldout_tokens']:,} tokens; "
          f"model in {out / 'model'}")
    return out
