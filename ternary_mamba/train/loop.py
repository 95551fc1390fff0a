"""The training loop shared by `pretrain` and `quantize`: AdamW with param groups, warm-up + cosine,
gradient accumulation and clipping, a token budget, periodic held-out evaluation, atomic checkpoints,
exact resume, NaN detection, metrics.jsonl and a progress line.

An *objective* supplies the task-specific parts:
    objective.loss(model, batch)       -> (loss, {metric: float})     # batch (b, seq_len + 1)
    objective.evaluate(model, heldout) -> {metric: float}
    objective.param_groups(model)      -> list of AdamW param groups
    objective.progress(metrics)        -> short string for the progress line
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from .. import faults
from ..formats.fs import atomic_dir, recover, save_safetensors
from ..ops.device import AUTOCAST_DEVICES, autocast, scalar
from ..errors import UserError
from . import distributed as D
from .config import TrainConfig
from .data import PackedSequences, batch_indices
from ..log import say


def note_token_budget(cfg: TrainConfig) -> None:
    """Say up front when whole steps cannot spend --tokens exactly (the run trains fewer)."""
    steps = cfg.total_steps
    if steps * cfg.tokens_per_step != cfg.tokens:
        say(f"--tokens {cfg.tokens:,}: trains {steps * cfg.tokens_per_step:,} tokens ({steps} steps of "
              f"{cfg.tokens_per_step:,} = batch x seq-len x grad-accum x ranks)")


def lr_factor(step: int, total: int, warmup_frac: float, min_ratio: float) -> float:
    warm = max(1, int(total * warmup_frac))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Progress:
    """A tqdm bar on a terminal (steps, ETA, tok/s, loss, KL, zero ratio; evaluations printed above it), plain
    lines every --log-every steps otherwise (nohup, SLURM, tee)."""

    def __init__(self, total_steps: int, enabled: bool = True, start: int = 0):
        self.total, self.enabled = total_steps, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.time()
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, tokens: int, tok_s: float, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        done = step / self.total
        eta = (time.time() - self.t0) / max(done, 1e-9) * (1 - done) if done > 0 else 0
        line = (f"step {step}/{self.total} ({100 * done:4.1f}%) | {tokens / 1e6:.2f}M tok | "
                f"{tok_s:,.0f} tok/s | {text} | ETA {eta / 60:.1f} min")
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(f"{tok_s:,.0f} tok/s | {text}", refresh=False)
            self.bar.refresh()
            if force:
                self.bar.write(line, file=sys.stderr)
        else:       # piped: a plain line every time the trainer reports (--log-every)
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class CollectiveError(UserError):
    """An error every rank raises together (decided by a collective): rank 0 alone reports it."""


class Trainer:
    def __init__(self, model, objective, cfg: TrainConfig, run_dir: Path, train: PackedSequences,
                 heldout: PackedSequences | None, verbose: bool = True, fsdp: bool = False,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32):
        """`model` (fp32 master weights) already on `device`; the forward runs under autocast to `dtype`."""
        self.objective, self.cfg = objective, cfg
        self.device = device if device is not None else next(model.parameters()).device
        self.dtype = dtype
        # fp16 needs loss scaling (its range is narrow); bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16) \
            if self.device.type in AUTOCAST_DEVICES else None
        self.run_dir, self.train_data, self.heldout = Path(run_dir), train, heldout
        self.rank, self.world = D.world()
        self.verbose = verbose and self.rank == 0
        self.fsdp = fsdp
        self.inner = model                    # the Mamba2LM (sharded in place under FSDP)
        self.model = D.wrap(model, fsdp, self.device)   # what forward is called on (DDP wrapper, or the module)
        if self.verbose and D.active():
            say(f"distributed: {D.describe(self.model)}")
        # the fused (single-kernel) AdamW: ~5x faster than the default on a CPU; not with sharded (DTensor) params
        fused = not fsdp and all(p.device.type in AUTOCAST_DEVICES for p in model.parameters())
        self.opt = torch.optim.AdamW(objective.param_groups(model), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                                     fused=fused or None)
        for g in self.opt.param_groups:
            g["base_lr"] = g["lr"] * g.pop("lr_mult", 1.0)
        self.step = 0
        self.saved_step: int | None = None     # the step of the last checkpoint this process wrote or loaded
        self.ckpt_dir = self.run_dir / "checkpoint"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.sinks = None    # extra metric sinks (train/sinks.py), set by the command
        self._saver = None   # FSDP on several ranks: the asynchronous sharded saver (train/sharded_checkpoint.py)

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """Under FSDP on several ranks: every rank writes its shards in the background (train/sharded_checkpoint.py)
        and the save is committed at the next step's start (the last one at once).  Otherwise: the full state
        dicts, written by rank 0."""
        if self.fsdp and D.active() and self.world > 1:
            return self._save_sharded()
        msd, osd = D.full_state(self.inner, self.opt)  # complete on rank 0 only
        if self.rank == 0:
            if self.inner.config.tie_embeddings:
                msd.pop("lm_head.weight", None)  # stored once, as the embedding
            faults.at(self.rank, self.step)
            with atomic_dir(self.ckpt_dir, overwrite=True) as tmp:
                faults.point("save0")
                save_safetensors({k: v.contiguous() for k, v in msd.items()}, tmp / "model.safetensors")
                faults.point("save1")
                torch.save(osd, tmp / "optimizer.pt")
                faults.point("save2")
                (tmp / "trainer_state.json").write_text(json.dumps({"step": self.step, "world_size": self.world}))
                faults.point("save3")
        self.saved_step = self.step
        D.barrier()

    def _save_sharded(self) -> None:
        from .sharded_checkpoint import ShardedSaver
        if self._saver is None:
            self._saver = ShardedSaver(self.ckpt_dir, self.rank, self.world, D.barrier)
        faults.at(self.rank, self.step)
        committed = self._saver.save(self.inner, self.opt, self.step, wait=self.step >= self.cfg.total_steps)
        if committed is not None:
            self.saved_step = committed

    def commit_pending_save(self) -> None:
        """The asynchronous save of the previous step, committed (every rank calls this at a step's start)."""
        if self._saver is not None:
            committed = self._saver.commit()
            if committed is not None:
                self.saved_step = committed

    def _last_good(self) -> str:
        """Where the last checkpoint is: written only after finite steps, so it holds no exploded weights."""
        if self.saved_step is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint, step {self.saved_step}, is in {self.ckpt_dir}; --resume continues from it"

    def load_checkpoint(self) -> None:
        from safetensors.torch import load_file
        recover(self.ckpt_dir)
        from ..formats.records import read_trainer_state
        state = read_trainer_state(self.ckpt_dir / "trainer_state.json", self.cfg.total_steps)
        from .sharded_checkpoint import is_sharded, load_sharded
        if is_sharded(self.ckpt_dir):            # written by an FSDP run: reassembled, at any world size
            msd, osd, _ = load_sharded(self.ckpt_dir)
        else:
            try:
                msd = load_file(str(self.ckpt_dir / "model.safetensors"))
                osd = torch.load(self.ckpt_dir / "optimizer.pt", weights_only=True)
            except Exception as e:
                raise UserError(f"{self.ckpt_dir}: unreadable checkpoint ({type(e).__name__}: {e})") from None
        check_optimizer_state(osd, self.inner, self.opt, state["step"], self.ckpt_dir / "optimizer.pt")
        if self.inner.config.tie_embeddings and "backbone.embedding.weight" in msd:
            msd["lm_head.weight"] = msd["backbone.embedding.weight"]
        try:
            D.load_full_state(self.inner, self.opt, msd, osd)
        except (RuntimeError, KeyError, ValueError) as e:
            raise UserError(f"{self.ckpt_dir}: checkpoint does not fit this run ({str(e).splitlines()[0][:200]})") from None
        self.step = self.saved_step = state["step"]
        # drop metrics logged after the checkpoint: the resumed run re-logs them identically.  Rank 0 alone
        # (it alone appends); then every rank waits, so no rank's append can race the rewrite
        if self.rank == 0 and self.metrics_path.exists():
            from ..formats.fs import atomic_write_bytes
            keep = [l for l in self.metrics_path.read_text().splitlines() if _step_of(l) <= self.step]
            atomic_write_bytes(self.metrics_path, "".join(l + "\n" for l in keep).encode())
        D.barrier()

    def log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.sinks is not None:
                self.sinks.write(record)

    # ---------------------------------------------------------------- loop
    def evaluate(self) -> dict:
        if self.heldout is None:
            return {}
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.dtype):
            out = self.objective.evaluate(self.model, self.heldout, self.cfg.eval_batches, self.cfg.batch_size)
        self.model.train()
        return out

    def train_step(self) -> dict:
        cfg = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(self.step, cfg.total_steps, cfg.warmup_frac, cfg.min_lr_ratio)
        sums: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            idx = batch_indices(len(self.train_data), cfg.batch_size, self.step, cfg.seed, self.rank, self.world,
                                accum=cfg.grad_accum, micro=micro)
            batch = self.train_data.batch(idx).to(self.device, non_blocking=True)
            with D.gradient_sync(self.model, sync=micro == cfg.grad_accum - 1):   # one reduction per step
                with autocast(self.device, self.dtype):
                    loss, metrics = self.objective.loss(self.model, batch)
                loss = _injected_fault(loss, self.rank, self.step)
                bad = loss.device.type != "meta" and not bool(torch.isfinite(loss))
                if D.any_rank(bad):      # every rank stops together (none is left waiting in a collective)
                    raise CollectiveError(f"step {self.step}: loss is not finite"
                                          f"{' on some rank' if not bad else ''}; stopping without saving "
                                          f"({self._last_good()}); try a lower --lr")
                scaled = loss / cfg.grad_accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
        params = [p for g in self.opt.param_groups for p in g["params"]]
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if hasattr(gnorm, "full_tensor"):  # FSDP2: a DTensor
            gnorm = gnorm.full_tensor()
        fp16 = self.scaler is not None and self.scaler.is_enabled()
        bad = gnorm.device.type != "meta" and not bool(torch.isfinite(gnorm)) and not fp16  # fp16: the scaler skips
        if D.any_rank(bad):
            raise CollectiveError(f"step {self.step}: gradient norm is not finite; stopping without saving "
                                  f"({self._last_good()}); try a lower --lr")
        if fp16:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.objective.after_step(self.inner, self.step)
        sums = D.mean_metrics(sums)
        sums["grad_norm"] = scalar(gnorm)
        sums["lr"] = self.opt.param_groups[0]["lr"]
        return sums

    def run(self) -> dict:
        cfg = self.cfg
        total = cfg.total_steps
        progress = Progress(total, self.verbose, self.step)
        self.model.train()
        last = {}
        if self.step == 0 and cfg.eval_every:
            ev = self.evaluate()
            self.log({"step": 0, "tokens": 0, **{f"eval_{k}": v for k, v in ev.items()}})
        span_s, span_tok = 0.0, 0   # training time and tokens since the last printed line (evaluation excluded)
        while self.step < total:
            self.commit_pending_save()
            t0 = time.time()
            metrics = self.train_step()
            step_s = time.time() - t0
            self.step += 1
            tokens = self.step * cfg.tokens_per_step
            rec = {"step": self.step, "tokens": tokens, **metrics, **self.objective.monitor(self.inner, self.step)}
            is_eval = cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == total)
            if is_eval:
                rec.update({f"eval_{k}": v for k, v in self.evaluate().items()})
            rec["tok_per_s"] = cfg.tokens_per_step / max(step_s, 1e-9)
            rec["max_rss_mb"] = _max_rss_mb()
            span_s, span_tok = span_s + step_s, span_tok + cfg.tokens_per_step
            self.log(rec)
            last = rec
            if self.step % cfg.log_every == 0 or is_eval or self.step == total:
                progress.update(self.step, tokens, span_tok / max(span_s, 1e-9), self.objective.progress(rec),
                                force=bool(is_eval))
                span_s, span_tok = 0.0, 0
            if self.step % cfg.save_every == 0 or self.step == total:
                self.save_checkpoint()
            self.objective.check(rec)  # e.g. the zero-ratio collapse detector; may raise
        progress.close()
        return last


def check_optimizer_state(osd, model, opt, step: int, where) -> None:
    """An optimizer state read from a file fits this run before torch sees it (a moment of the wrong shape reaches
    the fused AdamW kernel as a bad pointer): the same parameter groups with the same parameters, every moment a
    floating tensor of its parameter's shape, and a state for every trained parameter once training has started."""
    params = dict(model.named_parameters())
    if not isinstance(osd, dict) or not isinstance(osd.get("state"), dict) or not isinstance(osd.get("param_groups"), list):
        raise UserError(f"{where}: not an optimizer state (expected {{'state': ..., 'param_groups': [...]}})")
    groups = osd["param_groups"]
    if len(groups) != len(opt.param_groups) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                        for g in groups):
        raise UserError(f"{where}: {len(groups)} parameter groups, this run has {len(opt.param_groups)}")
    for saved, ours in zip(groups, opt.param_groups):   # torch adopts the saved hyperparameters: same kinds only
        for k, v in saved.items():
            if k != "params" and not _same_kind(v, ours.get(k, v)):
                raise UserError(f"{where}: parameter group setting {k!r} is {v!r:.40}, this run's is {ours.get(k)!r:.40}")
    named = [n for g in groups for n in g["params"]]
    unknown = [n for n in named if n not in params]
    if unknown or len(named) != sum(len(g["params"]) for g in opt.param_groups):
        raise UserError(f"{where}: its parameters are not this model's ({unknown[:2] or len(named)})")
    for name, st in osd["state"].items():
        p = params.get(name)
        if p is None or not isinstance(st, dict):
            raise UserError(f"{where}: state for unknown parameter {name!r}")
        for k, v in st.items():
            if k == "step":    # AdamW's step count: a finite non-negative scalar (torch converts it with float())
                n = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex() else v
                if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0:
                    raise UserError(f"{where}: {name}.step is {v!r:.40}, not a step count")
                continue
            if not isinstance(v, torch.Tensor) or not v.is_floating_point() or tuple(v.shape) != tuple(p.shape):
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise UserError(f"{where}: {name}.{k} is {got}, the parameter is {tuple(p.shape)}")
    trained = [n for n, p in params.items() if p.requires_grad]
    if step > 0 and trained and not osd["state"]:
        raise UserError(f"{where}: no optimizer state although the run is at step {step}; the file is damaged")


def _same_kind(v, ours) -> bool:
    """A saved optimizer setting can stand in for ours: same type (bool, number, tuple of numbers), finite."""
    if isinstance(ours, bool) or ours is None:      # flags (fused, foreach: None or a bool)
        return v is None or isinstance(v, bool)
    if isinstance(ours, str):
        return isinstance(v, str)
    if isinstance(ours, (int, float)):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
    if isinstance(ours, (tuple, list)):
        return isinstance(v, (tuple, list)) and len(v) == len(ours) and all(_same_kind(a, b) for a, b in zip(v, ours))
    return True


def _injected_fault(loss: torch.Tensor, rank: int, step: int) -> torch.Tensor:
    """The tests' fault at the loss (`ternary_mamba.faults`): NaN, a raise or a SIGKILL at one rank and step."""
    faults.at(rank, step)
    return loss * float("nan") if faults.point("loss") == "nan" else loss


def _max_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:  # a line cut short by a kill
        return float("inf")
