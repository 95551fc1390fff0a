"""`ternary-mamba quantize`: grouped ternary QAT + distillation from a frozen teacher.

With no arguments it converts the bundled teacher on the bundled books (the demo)."""
from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path

import torch

from ..core.config import MB, count_params_by_component
from ..errors import UserError
from ..formats.datasets import is_hub_source
from ..runtime.load import load_model
from ..formats.paths import resolve_model_dir
from ..formats.sizes import packed_size_bytes
from ..formats.tokenizer import load_tokenizer, tokenizer_path_for
from ..quant.monitor import ZeroRatioMonitor, zero_ratio_stats
from ..ops.device import autocast
from ..spec import DEFAULT_GROUP_SIZE, GGUF_TQ_BLOCK, PER_ROW, group_paths
from ..quant.qat import TernaryConfig, quantize_, set_lambda
from ..train.distill import DistillObjective, evaluate_vs_teacher, frozen_teacher
from ..train.run import Run
from ..train.runs import holding_run_dirs
from .configs import QuantizeConfig, resolve_auto_dtype
from .defaults import with_bundled_defaults
from ..log import say


def absolute(paths: list[str] | None) -> list[str] | None:
    """Local paths made absolute (a run.json then replays from anywhere); hub datasets (hf:...) as given."""
    return [p if is_hub_source(p) else str(Path(p).resolve()) for p in paths] if paths else paths


def build_student(teacher, qcfg: TernaryConfig):
    student = copy.deepcopy(teacher)
    quantize_(student, qcfg)
    return student.train().requires_grad_(True)


def quantize(cfg: QuantizeConfig | None = None) -> Path:
    """QAT+KD of `cfg.teacher` into a ternary student; returns the run folder (held, i.e. locked, while the run
    lasts, released however it ends).  The Python twin of `ternary-mamba quantize`."""
    return holding_run_dirs(_quantize, cfg)   # a failed start leaves no run folder (one that ran keeps its checkpoint)


def _quantize(cfg: QuantizeConfig | None = None) -> Path:
    """The body of `quantize`."""
    run = Run("quantize", resolve_auto_dtype(with_bundled_defaults(cfg or QuantizeConfig())))
    cfg = run.cfg
    if cfg.target == "gguf" and cfg.quant.group_size != PER_ROW and not group_paths(cfg.quant.group_size).gguf_tq:
        if cfg.quant.group_size == DEFAULT_GROUP_SIZE:
            say(f"--target gguf: groups of {GGUF_TQ_BLOCK} (llama.cpp's TQ2_0 / TQ1_0 hold them exactly)")
            cfg = cfg.replace(quant=cfg.quant.replace(group_size=GGUF_TQ_BLOCK))
        else:
            warnings.warn(f"--target gguf with --group-size {cfg.quant.group_size}: a GGUF export can only be "
                          f"exact as f16 (no size saving); TQ2_0 / TQ1_0 need groups of a multiple of {GGUF_TQ_BLOCK}",
                          stacklevel=2)
    if cfg.out is None:
        cfg = cfg.replace(out=f"runs/ternary-{Path(cfg.teacher).name}-{time.strftime('%Y%m%d-%H%M%S')}")
    torch.manual_seed(cfg.train.seed)
    teacher = load_model(cfg.teacher)
    if getattr(teacher, "ternary_config", None) is not None:
        raise UserError(f"{cfg.teacher}: is already a ternary student; pass the full-precision teacher")
    if cfg.chunk_size:
        teacher.config.chunk_size = cfg.chunk_size
    tok_path = tokenizer_path_for(resolve_model_dir(cfg.teacher), cfg.tokenizer)
    tok = load_tokenizer(tok_path)
    if tok.vocab_size > teacher.config.padded_vocab_size:
        raise UserError(f"{tok_path}: {tok.vocab_size} tokens, more than the teacher's vocabulary "
                        f"({teacher.config.padded_vocab_size}); pass the teacher's own tokenizer")
    run.cfg = cfg
    run.check_budget()
    device, dtype = run.device, run.dtype
    student = build_student(teacher, cfg.quant).to(device)  # validates the group size against the teacher's shapes
    # the frozen teacher's projections in the run's dtype (the paper's FP16 teacher; the SSM parameters, norms and
    # residual stream stay fp32); the student keeps fp32 master weights
    teacher = frozen_teacher(teacher, device, dtype)
    # the run's record: every path absolute, so `--config run.json` replays it from anywhere
    run.cfg = cfg = cfg.replace(teacher=str(Path(cfg.teacher).resolve()) if Path(cfg.teacher).exists() else cfg.teacher,
                                tokenizer=str(Path(tok_path).resolve()), data=absolute(cfg.data),
                                eval_data=absolute(cfg.eval_data))
    train, held = run.open(tok, 0.02)
    qcfg, tcfg, dcfg, mcfg = cfg.quant, cfg.train, cfg.distill, cfg.monitor
    monitor = ZeroRatioMonitor(every=mcfg.monitor_every, margin=mcfg.collapse_margin,
                               tolerance=mcfg.collapse_tolerance, action=mcfg.on_collapse)
    objective = DistillObjective(teacher, tau=dcfg.tau, alpha_ce=dcfg.alpha_ce, beta_hidden=dcfg.beta_hidden,
                                 weight_decay=tcfg.weight_decay, scale_lr_mult=dcfg.scale_lr_mult,
                                 monitor=monitor, lam_warmup_steps=dcfg.lam_warmup,
                                 gamma_state=dcfg.gamma_state, state_segments=dcfg.state_segments)
    if dcfg.lam_warmup:
        set_lambda(student, 1.0 / dcfg.lam_warmup)
    trainer = run.trainer_for(student, objective, train, held)
    if run.resumed and dcfg.lam_warmup:
        objective.after_step(student, trainer.step - 1)
    n = count_params_by_component(teacher.config)
    say(f"QAT+KD: {Path(cfg.teacher).name} ({sum(n.values()) / 1e6:.2f} M params) -> ternary "
          f"{'+'.join(qcfg.targets)}, group {qcfg.group_size}, scales {qcfg.scale_mode}; "
          f"{tcfg.tokens:,} tokens in {tcfg.total_steps} steps on {device} ({cfg.dtype}) -> {run.out}")
    student = run.train(lambda: build_student(teacher, qcfg).float())
    if student is None:
        return run.out
    with autocast(device, dtype):
        summary = final_summary(teacher, student, qcfg, held, cfg, run.wall_s, run.tokens_trained, monitor)
    run.finish(student, "student", tok.path, summary,
               {"teacher": str(cfg.teacher), "training": {"kind": "quantize", "tokens": summary["tokens"]}})
    say(format_summary(summary, run.out))
    return run.out


@torch.no_grad()
def final_summary(teacher, student, qcfg, held, cfg: QuantizeConfig, wall, tokens, monitor) -> dict:
    student.eval()
    nb, bs = cfg.final_eval_batches, cfg.train.batch_size
    ptq = build_student(teacher, qcfg.replace(scale_mode="absmean")).float().eval()
    say("final evaluation on the held-out set: teacher, PTQ, QAT+KD")
    rows = {f"teacher ({cfg.dtype})": evaluate_vs_teacher(teacher, teacher, held, nb, bs, progress="teacher"),
            "PTQ (absmean, no training)": {**evaluate_vs_teacher(ptq, teacher, held, nb, bs, progress="PTQ"),
                                           "zero_ratio": zero_ratio_stats(ptq)["zero_ratio"]},
            f"QAT+KD ({qcfg.scale_mode})": {**evaluate_vs_teacher(student, teacher, held, nb, bs,
                                                                  progress="QAT+KD"),
                                           "zero_ratio": zero_ratio_stats(student)["zero_ratio"]}}
    mcfg = teacher.config
    sizes = {"fp16": sum(count_params_by_component(mcfg).values()) * 2,
             "tq2": sum(packed_size_bytes(mcfg, qcfg.group_size, "tq2").values()),
             "tq1": sum(packed_size_bytes(mcfg, qcfg.group_size, "tq1").values())}
    return {"rows": rows, "sizes_bytes": sizes, "tokens": tokens, "wall_s": wall,
            "heldout_tokens": min(len(held), nb * bs) * cfg.train.seq_len,
            "zero_ratio_layers": zero_ratio_stats(student)["zero_ratio_layers"],
            "collapse_events": monitor.events}


def format_summary(s: dict, out: Path) -> str:
    lines = [f"\n{'model':<30} {'held-out ppl':>12} {'KL to teacher':>14} {'top-1 agree':>12} {'zero ratio':>11}"]
    for name, r in s["rows"].items():
        z = f"{r['zero_ratio']:.3f}" if "zero_ratio" in r else "-"
        lines.append(f"{name:<30} {r['ppl']:>12.2f} {r['kl']:>14.4f} {r['top1_agree']:>12.3f} {z:>11}")
    sz = s["sizes_bytes"]
    lines.append(f"size: FP16 {sz['fp16'] / MB:.2f} MB -> ternary tq2 {sz['tq2'] / MB:.2f} MB "
                 f"({sz['fp16'] / sz['tq2']:.1f}x), tq1 {sz['tq1'] / MB:.2f} MB ({sz['fp16'] / sz['tq1']:.1f}x)")
    lines.append(f"{s['tokens']:,} tokens in {s['wall_s'] / 60:.1f} min; held-out: {s['heldout_tokens']:,} tokens")
    lines.append(f"run folder: {out}  (student: {out / 'student'}, report: {out / 'report.md'}, "
                 f"metrics: {out / 'metrics.jsonl'})")
    return "\n".join(lines)
