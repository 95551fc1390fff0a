"""`ternary-mamba ptq`: post-training ternarization (no training) with optional post-hoc corrections
(bias, low-rank, QEP), evaluated against the teacher on held-out text.  Defaults: the bundled teacher,
calibrated on the bundled training books, evaluated on the bundled held-out book."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..core.config import MB, count_params_by_component
from ..errors import UserError
from ..formats.folders import save_model
from ..formats.fs import write_json_atomic
from ..runtime.load import load_model
from ..formats.paths import resolve_model_dir
from ..formats.sizes import packed_size_bytes
from ..formats.tokenizer import load_tokenizer, tokenizer_path_for
from ..quant.monitor import zero_ratio_stats
from ..quant.posthoc import PosthocConfig, correction_params, posthoc_quantize
from ..train.distill import evaluate_vs_teacher
from ..train.runs import prepare_data
from .configs import PtqConfig
from .defaults import with_bundled_defaults
from ..log import say


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


def ptq(cfg: PtqConfig | None = None, teacher=None, data=None) -> dict:
    """Post-training ternarization + the chosen corrections, evaluated against the teacher; returns the summary
    (the student folder and summary.json go to `cfg.out` when set).  `teacher` / `data` = (train, held) let the
    claims experiment share them.  The Python twin of `ternary-mamba ptq`."""
    cfg = with_bundled_defaults(cfg or PtqConfig())
    out = Path(cfg.out) if cfg.out else None
    if out is not None and out.exists():
        raise UserError(f"{out}: already exists; choose another --out")
    pcfg = PosthocConfig(methods=tuple(cfg.correct or ()), rank=cfg.rank, act_weighted=not cfg.plain_svd,
                        qep_alpha=cfg.qep_alpha)
    teacher = teacher if teacher is not None else load_model(cfg.teacher)
    if getattr(teacher, "ternary_config", None) is not None:
        raise UserError(f"{cfg.teacher}: is already ternary; pass the full-precision teacher")
    tok_path = tokenizer_path_for(resolve_model_dir(cfg.teacher), cfg.tokenizer)
    if data is None:
        data = prepare_data(cfg.data, cfg.eval_data, load_tokenizer(tok_path), cfg.seq_len, 0.02, None)
    train, held = data
    calib = calibration_batches(train, cfg.calib_seqs, 8, cfg.seed)
    t0 = time.time()
    tty = sys.stdout.isatty()   # a live progress line on terminals only (no \r noise in logs)
    student, fit = posthoc_quantize(teacher, calib, cfg.group_size, pcfg,
                                    progress=(lambda i, n, name: print(f"\r{pcfg.label}: {i + 1}/{n} {name}   ",
                                                                       end="", flush=True)) if tty else None)
    if tty:
        say()
    wall = time.time() - t0
    row = {**evaluate_vs_teacher(student, teacher, held, cfg.eval_batches, 8),
           "zero_ratio": zero_ratio_stats(student)["zero_ratio"]}
    extra = correction_params(student)
    sizes = quantized_size_bytes(teacher.config, cfg.group_size, extra)
    summary = {"method": pcfg.label, "row": row, "extra_params": extra, "sizes_bytes": sizes,
               "calib_tokens": sum(b.numel() for b in calib), "wall_s": wall,
               "heldout_tokens": min(len(held), cfg.eval_batches * 8) * cfg.seq_len, "fit": fit}
    if out is not None:
        save_model(student, out / "student", tokenizer_path=tok_path,
                   extra={"teacher": str(cfg.teacher), "training": {"kind": "ptq", "method": pcfg.label}})
        write_json_atomic(out / "summary.json", summary)
    say(f"{pcfg.label}: held-out ppl {row['ppl']:.2f}, KL to teacher {row['kl']:.4f}, top-1 agreement "
          f"{row['top1_agree']:.3f}, zero ratio {row['zero_ratio']:.3f}, size {sizes['tq2'] / MB:.2f} MB "
          f"(+{extra:,} correction params); calibration {summary['calib_tokens']:,} tokens, {wall:.1f} s"
          + (f"; student in {out / 'student'}" if out else ""))
    return summary
