"""`ternary-mamba quantize`: grouped ternary QAT + distillation from a frozen teacher.

With no arguments it converts the bundled teacher on the bundled books (the demo)."""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

from ..checkpoint import find_tokenizer, load_model, resolve_model_dir, save_model
from ..errors import UserError
from ..info import MB, count_params_by_component, packed_size_bytes
from ..quant.monitor import ZeroRatioMonitor, zero_ratio_stats
from ..quant.qat import TernaryConfig, quantize_
from ..tokenizer import load_tokenizer
from .distill import DistillObjective, evaluate_vs_teacher
from .loop import TrainConfig, Trainer, write_json_atomic
from . import distributed as D
from .runs import prepare_run_and_data


def _defaults(args) -> None:
    from .. import assets
    if args.teacher is None:
        if not (assets.TEACHER / "model.safetensors").exists():
            raise UserError(f"the bundled teacher is missing ({assets.TEACHER}); pass --teacher PATH_OR_HUB_ID")
        args.teacher = str(assets.TEACHER)
    if args.data is None:
        args.data = [str(assets.TRAIN_BOOKS)]
        if args.eval_data is None:
            args.eval_data = [str(assets.HELDOUT_BOOKS)]
    if args.out is None:
        args.out = f"runs/ternary-{Path(args.teacher).name}-{time.strftime('%Y%m%d-%H%M%S')}"


def build_student(teacher, tcfg: TernaryConfig):
    student = copy.deepcopy(teacher)
    quantize_(student, tcfg)
    return student.train().requires_grad_(True)


def run_quantize(args) -> dict:
    _defaults(args)
    torch.manual_seed(args.seed)
    teacher = load_model(args.teacher)
    if getattr(teacher, "ternary_config", None) is not None:
        raise UserError(f"{args.teacher}: is already a ternary student; pass the full-precision teacher")
    if args.chunk_size:
        teacher.config.chunk_size = args.chunk_size
    tok_path = args.tokenizer or find_tokenizer(resolve_model_dir(args.teacher))
    if tok_path is None:
        raise UserError(f"{args.teacher}: has no tokenizer.json; pass --tokenizer")
    tok = load_tokenizer(tok_path)
    qcfg = TernaryConfig(group_size=args.group_size, scale_mode=args.scale_mode,
                         guard_low=args.guard_band[0], guard_high=args.guard_band[1])
    tcfg = TrainConfig(tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                       grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay,
                       warmup_frac=args.warmup_frac, eval_every=args.eval_every, eval_batches=args.eval_batches,
                       save_every=args.save_every, log_every=args.log_every, seed=args.seed)
    tcfg.total_steps  # validate the budget before writing anything
    student = build_student(teacher, qcfg)  # validates the group size against the teacher's shapes
    spec = {"kind": "quantize", "teacher": str(args.teacher), "tokenizer": str(Path(tok_path).resolve()),
            "data": [str(Path(d).resolve()) for d in args.data],
            "eval_data": [str(Path(d).resolve()) for d in (args.eval_data or [])],
            "quantization": qcfg.to_dict(), "train": vars(tcfg),
            "loss": {"tau": args.tau, "alpha_ce": args.alpha_ce, "beta_hidden": args.beta_hidden},
            "scale_lr_mult": args.scale_lr_mult, "lam_warmup": args.lam_warmup, "on_collapse": args.on_collapse}
    out = Path(args.out)
    resume, train, held = prepare_run_and_data(out, spec, args.resume, args.data, args.eval_data, tok,
                                               args.seq_len, 0.02, args.cache_dir)

    monitor = ZeroRatioMonitor(every=args.monitor_every, threshold=args.collapse_threshold, action=args.on_collapse)
    objective = DistillObjective(teacher, tau=args.tau, alpha_ce=args.alpha_ce, beta_hidden=args.beta_hidden,
                                 weight_decay=args.weight_decay, scale_lr_mult=args.scale_lr_mult,
                                 monitor=monitor, lam_warmup_steps=args.lam_warmup)
    if args.lam_warmup:
        from ..quant.qat import set_lambda
        set_lambda(student, 1.0 / args.lam_warmup)
    trainer = Trainer(student, objective, tcfg, out, train, held, fsdp=args.fsdp)
    if resume:
        trainer.load_checkpoint()
        if args.lam_warmup:
            objective.after_step(student, trainer.step - 1)
        print(f"resuming {out} at step {trainer.step}")
    n = count_params_by_component(teacher.config)
    print(f"QAT+KD: {Path(args.teacher).name} ({sum(n.values()) / 1e6:.2f} M params) -> ternary "
          f"{'+'.join(qcfg.targets)}, group {args.group_size}, scales {args.scale_mode}; "
          f"{args.tokens:,} tokens in {tcfg.total_steps} steps -> {out}")
    t0 = time.time()
    trainer.run()
    wall = time.time() - t0
    student = D.gathered_model(trainer, lambda: build_student(teacher, qcfg))
    if not D.is_main():
        return {}

    summary = final_summary(teacher, student, qcfg, held, args, wall, trainer.step * tcfg.tokens_per_step, monitor)
    save_model(student, out / "student", tokenizer_path=tok.path, overwrite=True,
               extra={"teacher": str(args.teacher), "training": {"kind": "quantize", "tokens": summary["tokens"]}})
    write_json_atomic(out / "summary.json", summary)
    _try_report(out)
    print(format_summary(summary, out))
    return summary


@torch.no_grad()
def final_summary(teacher, student, qcfg, held, args, wall, tokens, monitor) -> dict:
    student.eval()
    nb, bs = args.final_eval_batches, args.batch_size
    ptq = build_student(teacher, TernaryConfig(group_size=qcfg.group_size, scale_mode="absmean")).eval()
    rows = {"teacher (fp32)": evaluate_vs_teacher(teacher, teacher, held, nb, bs),
            "PTQ (absmean, no training)": {**evaluate_vs_teacher(ptq, teacher, held, nb, bs),
                                           "zero_ratio": zero_ratio_stats(ptq)["zero_ratio"]},
            f"QAT+KD ({qcfg.scale_mode})": {**evaluate_vs_teacher(student, teacher, held, nb, bs),
                                           "zero_ratio": zero_ratio_stats(student)["zero_ratio"]}}
    cfg = teacher.config
    sizes = {"fp16": sum(count_params_by_component(cfg).values()) * 2,
             "tq2": sum(packed_size_bytes(cfg, qcfg.group_size, "tq2").values()),
             "tq1": sum(packed_size_bytes(cfg, qcfg.group_size, "tq1").values())}
    return {"rows": rows, "sizes_bytes": sizes, "tokens": tokens, "wall_s": wall,
            "heldout_tokens": min(len(held), nb * bs) * args.seq_len,
            "zero_ratio_layers": zero_ratio_stats(student)["zero_ratio_layers"],
            "collapse_events": monitor.events}


def _try_report(out: Path) -> None:
    try:
        from ..report import make_report
        make_report(out)
    except ImportError:
        pass  # matplotlib not installed: `ternary-mamba report RUN` after installing it


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
