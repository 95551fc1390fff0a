"""`ternary-mamba pretrain`: next-token training of a Mamba-2 from random initialisation.

With --ternary the model is quantized (grouped ternary QAT) from step 0: the paper's from-scratch control."""
from __future__ import annotations

from pathlib import Path

import torch

from ..core.config import PRESETS
from ..core.model import Mamba2LM
from ..formats.configs import resolve_config
from ..formats.tokenizer import load_tokenizer
from ..ops.device import autocast
from ..quant.monitor import ZeroRatioMonitor
from ..quant.qat import quantize_
from ..train.objectives import LMObjective
from ..train.run import Run
from ..train.runs import holding_run_dirs
from .configs import PretrainConfig, resolve_auto_dtype
from .flags import require
from .quantize import absolute
from ..log import say


def pretrain(cfg: PretrainConfig) -> Path:
    """Train from random initialisation (ternary from step 0 with `cfg.ternary`); returns the run folder (held,
    i.e. locked, while the run lasts, released however it ends).  The Python twin of `ternary-mamba pretrain`."""
    return holding_run_dirs(_pretrain, cfg)   # a failed start leaves no run folder (one that ran keeps its checkpoint)


def _pretrain(cfg: PretrainConfig) -> Path:
    """The body of `pretrain`."""
    require(cfg, "model", "tokenizer", "data", "out", command="pretrain")
    run = Run("pretrain", resolve_auto_dtype(cfg), announce=cfg.ternary)
    cfg = run.cfg
    torch.manual_seed(cfg.train.seed)
    mcfg = resolve_config(cfg.model)
    tok = load_tokenizer(cfg.tokenizer)
    if tok.vocab_size > mcfg.vocab_size:
        mcfg = mcfg.replace(vocab_size=tok.vocab_size)
    if cfg.chunk_size:
        mcfg = mcfg.replace(chunk_size=cfg.chunk_size)
    tcfg = cfg.train
    run.check_budget()
    run.cfg = cfg = cfg.replace(model=cfg.model if cfg.model in PRESETS else str(Path(cfg.model).resolve()),
                                tokenizer=str(Path(cfg.tokenizer).resolve()), data=absolute(cfg.data),
                                eval_data=absolute(cfg.eval_data))
    train, held = run.open(tok, 0.01)

    def build():
        m = Mamba2LM(mcfg)
        m.reset_parameters(seed=tcfg.seed)
        if cfg.ternary:
            quantize_(m, cfg.quant)
        return m
    model = build().to(run.device)
    run.trainer_for(model, LMObjective(tcfg.weight_decay, ZeroRatioMonitor() if cfg.ternary else None,
                                      cfg.scale_lr_mult), train, held)
    say(f"pretraining {mcfg.n_params / 1e6:.2f} M params on {len(train) * tcfg.seq_len / 1e6:.1f} M tokens "
          f"(budget {tcfg.tokens / 1e6:.1f} M), held-out {len(held) * tcfg.seq_len / 1e3:.0f} k tokens")
    model = run.train(build)
    if model is None:
        return run.out
    model.eval()
    with torch.no_grad(), autocast(run.device, run.dtype):
        ev = LMObjective(0).evaluate(model, held, 10**9, tcfg.batch_size)  # the whole held-out set
    summary = {"params": mcfg.n_params, "tokens": run.tokens_trained, "wall_s_this_session": run.wall_s,
               "heldout_loss": ev["loss"], "heldout_ppl": ev["ppl"], "heldout_tokens": len(held) * tcfg.seq_len,
               "final_train_loss": run.last_metrics.get("loss")}
    folder = run.finish(model, "model", tok.path, summary, {"training": {"kind": "pretrain", **summary}})
    say(f"done: held-out ppl {ev['ppl']:.2f} (loss {ev['loss']:.4f}) over {summary['heldout_tokens']:,} tokens; "
          f"model in {folder}")
    return run.out
