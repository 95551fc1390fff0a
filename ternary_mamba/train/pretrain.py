"""`ternary-mamba pretrain`: next-token training of a Mamba-2 from random initialisation.

With --ternary the model is quantized (grouped ternary QAT) from step 0: the paper's from-scratch control.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..checkpoint import save_model
from ..config import resolve_config
from ..errors import UserError
from ..losses import cross_entropy
from ..tokenizer import load_tokenizer
from .loop import TrainConfig, Trainer, write_json_atomic
from . import distributed as D
from .runs import prepare_run_and_data

NO_DECAY = ("norm", "A_log", "D", "dt_bias", "bias", "scale")


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if any(k in name.rsplit(".", 1)[-1] or k in name for k in NO_DECAY) or p.dim() < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def next_token_loss(model, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return cross_entropy(logits.float(), batch[:, 1:])   # fused kernel (losses.py); F.cross_entropy otherwise


@torch.no_grad()
def heldout_loss(model, heldout, n_batches: int, batch_size: int) -> float:
    """Mean next-token cross-entropy over the first n_batches*batch_size held-out windows (fixed set)."""
    n = min(len(heldout), n_batches * batch_size)
    total = 0.0
    for s in range(0, n, batch_size):
        idx = range(s, min(n, s + batch_size))
        total += next_token_loss(model, heldout.batch(idx)).item() * len(idx)
    return total / n


class LMObjective:
    def __init__(self, weight_decay: float, quant_monitor=None):
        self.weight_decay, self.qmon = weight_decay, quant_monitor

    def param_groups(self, model):
        return param_groups(model, self.weight_decay)

    def loss(self, model, batch):
        loss = next_token_loss(model, batch)
        return loss, {"loss": loss.item()}

    def evaluate(self, model, heldout, n_batches, batch_size):
        loss = heldout_loss(model, heldout, n_batches, batch_size)
        return {"loss": loss, "ppl": math.exp(min(loss, 50))}

    def monitor(self, model, step):
        return self.qmon.record(model, step) if self.qmon else {}

    def check(self, rec):
        if self.qmon:
            self.qmon.check(rec)

    def after_step(self, model, step):
        pass

    def progress(self, rec):
        s = f"loss {rec['loss']:.3f}"
        if "eval_ppl" in rec:
            s += f" | held-out ppl {rec['eval_ppl']:.2f}"
        if "zero_ratio" in rec:
            s += f" | zero {rec['zero_ratio']:.3f}"
        return s


def run_pretrain(args) -> Path:
    torch.manual_seed(args.seed)
    cfg = resolve_config(args.config)
    tok = load_tokenizer(args.tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        cfg = cfg.replace(vocab_size=tok.vocab_size)
    if args.chunk_size:
        cfg = cfg.replace(chunk_size=args.chunk_size)
    tcfg = TrainConfig(tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                       grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay,
                       warmup_frac=args.warmup_frac, eval_every=args.eval_every, eval_batches=args.eval_batches,
                       save_every=args.save_every, log_every=args.log_every, seed=args.seed)
    tcfg.total_steps  # validates the budget before anything is written
    spec = {"kind": "pretrain", "model_config": cfg.to_dict(), "train": vars(tcfg),
            "tokenizer": str(Path(args.tokenizer).resolve()), "data": [str(Path(d).resolve()) for d in args.data],
            "eval_data": [str(Path(d).resolve()) for d in (args.eval_data or [])], "ternary": bool(args.ternary),
            "group_size": args.group_size}
    out = Path(args.out)
    resume, train, held = prepare_run_and_data(out, spec, args.resume, args.data, args.eval_data, tok,
                                               args.seq_len, 0.01, args.cache_dir)

    from ..model import Mamba2LM

    def build():
        m = Mamba2LM(cfg)
        m.reset_parameters(seed=args.seed)
        if args.ternary:
            from ..quant.qat import TernaryConfig, quantize_
            quantize_(m, TernaryConfig(group_size=args.group_size, scale_mode="absmean"))
        return m
    model = build()
    qmon = None
    if args.ternary:
        from ..quant.monitor import ZeroRatioMonitor
        qmon = ZeroRatioMonitor()
    trainer = Trainer(model, LMObjective(args.weight_decay, qmon), tcfg, out, train, held, fsdp=args.fsdp)
    if resume:
        trainer.load_checkpoint()
        print(f"resuming {out} at step {trainer.step}")
    print(f"pretraining {cfg.n_params / 1e6:.2f} M params on {len(train) * args.seq_len / 1e6:.1f} M tokens "
          f"(budget {args.tokens / 1e6:.1f} M), held-out {len(held) * args.seq_len / 1e3:.0f} k tokens")
    t0 = time.time()
    last = trainer.run()
    wall = time.time() - t0
    model = D.gathered_model(trainer, build)
    if not D.is_main():
        return out
    model.eval()
    ev = LMObjective(0).evaluate(model, held, 10**9, args.batch_size)  # the whole held-out set
    summary = {"params": cfg.n_params, "tokens": trainer.step * tcfg.tokens_per_step, "wall_s_this_session": wall,
               "heldout_loss": ev["loss"], "heldout_ppl": ev["ppl"], "heldout_tokens": len(held) * args.seq_len,
               "final_train_loss": last.get("loss")}
    save_model(model, out / "model", tokenizer_path=tok.path, overwrite=True,
               extra={"training": {"kind": "pretrain", **summary}})
    write_json_atomic(out / "summary.json", summary)
    from .quantize import _try_report
    _try_report(out)
    print(f"done: held-out ppl {ev['ppl']:.2f} (loss {ev['loss']:.4f}) over {summary['heldout_tokens']:,} tokens; "
          f"model in {out / 'model'}")
    return out
