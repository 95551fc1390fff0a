"""`ternary-mamba ptq`: post-training ternarization (no training) with optional post-hoc corrections
(bias, low-rank, QEP), evaluated against the teacher on held-out text.  Defaults: the bundled teacher,
calibrated on the bundled training books, evaluated on the bundled held-out book."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from .checkpoint import find_tokenizer, load_model, resolve_model_dir, save_model
from .errors import UserError
from .info import MB, count_params_by_component, packed_size_bytes
from .quant.monitor import zero_ratio_stats
from .quant.posthoc import PosthocConfig, correction_params, posthoc_quantize
from .tokenizer import load_tokenizer
from .train.distill import evaluate_vs_teacher
from .train.loop import write_json_atomic
from .train.runs import prepare_data


def calibration_batches(train, n_seqs: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """n_seqs random training windows (fixed by seed), in batches."""
    if len(train) == 0:
        raise UserError("calibration data is shorter than one window; pass more --data or a shorter --seq-len")
    idx = np.random.default_rng(seed).choice(len(train), size=min(n_seqs, len(train)), replace=False)
    return [train.batch(sorted(idx[i:i + batch_size])) for i in range(0, len(idx), batch_size)]


def quantized_size_bytes(cfg, group_size: int, extra_params: int = 0) -> dict:
    """tq2 packed size (+ extra fp16 correction parameters) and the FP16 size, in bytes."""
    tq2 = sum(packed_size_bytes(cfg, group_size, "tq2").values()) + 2 * extra_params
    return {"fp16": sum(count_params_by_component(cfg).values()) * 2, "tq2": tq2}


def defaults(args) -> None:
    from . import assets
    if args.teacher is None:
        args.teacher = str(assets.TEACHER)
    if args.data is None:
        args.data = [str(assets.TRAIN_BOOKS)]
        if args.eval_data is None:
            args.eval_data = [str(assets.HELDOUT_BOOKS)]


def run_ptq(args, teacher=None, data=None) -> dict:
    """The `ptq` command; `teacher` / `data` = (train, held) let the claims experiment share them."""
    defaults(args)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists():
        raise UserError(f"{out}: already exists; choose another --out")
    cfg = PosthocConfig(methods=tuple(args.correct or ()), rank=args.rank, act_weighted=not args.plain_svd,
                        qep_alpha=args.qep_alpha)
    teacher = teacher if teacher is not None else load_model(args.teacher)
    if getattr(teacher, "ternary_config", None) is not None:
        raise UserError(f"{args.teacher}: is already ternary; pass the full-precision teacher")
    tok_path = args.tokenizer or find_tokenizer(resolve_model_dir(args.teacher))
    if tok_path is None:
        raise UserError(f"{args.teacher}: has no tokenizer.json; pass --tokenizer")
    if data is None:
        data = prepare_data(args.data, args.eval_data, load_tokenizer(tok_path), args.seq_len, 0.02, None)
    train, held = data
    calib = calibration_batches(train, args.calib_seqs, 8, args.seed)
    t0 = time.time()
    tty = sys.stdout.isatty()   # a live progress line on terminals only (no \r noise in logs)
    student, fit = posthoc_quantize(teacher, calib, args.group_size, cfg,
                                    progress=(lambda i, n, name: print(f"\r{cfg.label}: {i + 1}/{n} {name}   ",
                                                                       end="", flush=True)) if tty else None)
    if tty:
        print()
    wall = time.time() - t0
    row = {**evaluate_vs_teacher(student, teacher, held, args.eval_batches, 8),
           "zero_ratio": zero_ratio_stats(student)["zero_ratio"]}
    extra = correction_params(student)
    sizes = quantized_size_bytes(teacher.config, args.group_size, extra)
    summary = {"method": cfg.label, "row": row, "extra_params": extra, "sizes_bytes": sizes,
               "calib_tokens": sum(b.numel() for b in calib), "wall_s": wall,
               "heldout_tokens": min(len(held), args.eval_batches * 8) * args.seq_len, "fit": fit}
    if out is not None:
        save_model(student, out / "student", tokenizer_path=tok_path,
                   extra={"teacher": str(args.teacher), "training": {"kind": "ptq", "method": cfg.label}})
        write_json_atomic(out / "summary.json", summary)
    print(f"{cfg.label}: held-out ppl {row['ppl']:.2f}, KL to teacher {row['kl']:.4f}, top-1 agreement "
          f"{row['top1_agree']:.3f}, zero ratio {row['zero_ratio']:.3f}, size {sizes['tq2'] / MB:.2f} MB "
          f"(+{extra:,} correction params); calibration {summary['calib_tokens']:,} tokens, {wall:.1f} s"
          + (f"; student in {out / 'student'}" if out else ""))
    return summary
