"""`ternary-mamba experiment claims`: the paper's claims as one resumable experiment on one teacher.

Stages (each writes its result under OUT/ and is skipped when re-run; training runs continue from their
last checkpoint):

  posthoc/*      PTQ and PTQ + post-hoc corrections (bias, low-rank plain / activation-weighted, QEP)
  runs/qat-*     QAT+KD with scale modes absmean, learned, guarded (+ learned and guarded with a 10x scale
                 lr: the collapse stress test), N tokens each
  runs/scratch-* from-scratch training with the same N tokens and data: ternary (the paper's control) and
                 full precision (what N tokens buy without a teacher)
  recurrence     error of SSM states / layer outputs vs token position, and the noise-injection control
  results        results.json, results.md (the table) and the plots
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from ..commands.configs import ClaimsConfig, PretrainConfig, PtqConfig, QuantizeConfig
from ..commands.defaults import with_bundled_defaults
from ..core.config import count_params_by_component
from ..errors import UserError
from ..formats.folders import find_tokenizer
from ..formats.fs import write_json_atomic
from ..formats.load import load_model, resolve_model_dir
from ..formats.tokenizer import load_tokenizer
from ..train.runs import prepare_data
from .arms import ANALYSED, EVAL_BATCHES, POSTHOC, QAT, SCRATCH, SEQ_LEN

class Claims:
    def __init__(self, cfg: ClaimsConfig):
        unknown = [s for s in cfg.skip if s not in QAT and s not in SCRATCH]
        if unknown:
            raise UserError(f"--skip {unknown[0]}: not a training run; choose from {', '.join([*QAT, *SCRATCH])}")
        self.args = cfg
        full = with_bundled_defaults(cfg, held_out_required=True)
        self.out = Path(cfg.out)
        self.teacher_path, self.data, self.eval_data = full.teacher, full.data, full.eval_data
        self.teacher = load_model(self.teacher_path)
        if getattr(self.teacher, "ternary_config", None) is not None:
            raise UserError(f"{self.teacher_path}: is already ternary; pass the full-precision teacher")
        tok = find_tokenizer(resolve_model_dir(self.teacher_path))
        if tok is None:
            raise UserError(f"{self.teacher_path}: has no tokenizer.json")
        self.tok_path = str(tok)
        self.train, self.held = prepare_data(self.data, self.eval_data, load_tokenizer(tok), SEQ_LEN, 0.02, None)
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_spec()

    def _check_spec(self) -> None:
        spec = {"teacher": str(Path(self.teacher_path).resolve()), "data": [str(Path(d).resolve()) for d in self.data],
                "eval_data": [str(Path(d).resolve()) for d in self.eval_data], "tokens": self.args.tokens,
                "seed": self.args.seed, "group_size": self.args.group_size}
        path = self.out / "experiment.json"
        if path.exists():
            old = json.loads(path.read_text())
            if old != spec:
                k = next(k for k in spec if old.get(k) != spec[k])
                raise UserError(f"{self.out}: holds an experiment with a different {k} ({old.get(k)!r}); "
                                f"use the same arguments to resume it, or another --out")
        else:
            write_json_atomic(path, spec)

    # ------------------------------------------------------------------ stages
    def stage(self, name: str, fn):
        path = self.out / "stages" / f"{name}.json"
        if path.exists():
            print(f"[claims] {name}: done (cached)")
            return json.loads(path.read_text())
        print(f"[claims] {name} ...", flush=True)
        t0 = time.time()
        result = fn()
        result["stage_wall_s"] = time.time() - t0
        path.parent.mkdir(exist_ok=True)
        write_json_atomic(path, result)
        return result

    def posthoc(self, name: str) -> dict:
        from ..commands.ptq import ptq
        folder = self.out / "posthoc" / name
        if folder.exists():  # interrupted after writing: redo it (seconds)
            shutil.rmtree(folder)
        cfg = PtqConfig(teacher=self.teacher_path, out=str(folder), seed=self.args.seed, eval_batches=EVAL_BATCHES,
                        group_size=self.args.group_size, **POSTHOC[name])
        s = ptq(cfg, teacher=self.teacher, data=(self.train, self.held))
        return {"label": s["method"], "model": str(folder / "student"), "row": s["row"],
                "size_bytes": s["sizes_bytes"]["tq2"], "tokens": 0, "calib_tokens": s["calib_tokens"],
                "extra_params": s["extra_params"]}

    def _train_config(self, run: Path, defaults) -> dict:
        """What every training run shares: data, budget, seed, evaluation cadence; resumed where it stopped."""
        train = defaults.train.replace(tokens=self.args.tokens, seed=self.args.seed, eval_every=25)
        resume = (run / "checkpoint" / "trainer_state.json").exists()
        if not resume and run.exists():        # stopped before its first checkpoint: this folder is ours to redo
            shutil.rmtree(run)
        return {"out": str(run), "data": list(self.data), "eval_data": list(self.eval_data), "train": train,
                "resume": resume, "device": self.args.device, "dtype": self.args.dtype}

    def qat(self, name: str) -> dict:
        from ..commands.quantize import quantize
        from ..quant.config import TernaryConfig
        from ..train.config import DistillConfig
        label, mode, lr_mult = QAT[name]
        run = self.out / "runs" / name
        if not (run / "summary.json").exists():
            quantize(QuantizeConfig(teacher=self.teacher_path,
                                    quant=TernaryConfig(group_size=self.args.group_size, scale_mode=mode),
                                    distill=DistillConfig(scale_lr_mult=lr_mult),
                                    **self._train_config(run, QuantizeConfig())))
        summary = json.loads((run / "summary.json").read_text())
        return {"label": label, "model": str(run / "student"), "run": str(run), "tokens": summary["tokens"],
                "collapse_events": summary.get("collapse_events", []), **self._evaluate(run / "student")}

    def scratch(self, name: str) -> dict:
        from ..commands.pretrain import pretrain
        label, ternary = SCRATCH[name]
        run = self.out / "runs" / name
        if not (run / "summary.json").exists():
            pretrain(PretrainConfig(model=str(resolve_model_dir(self.teacher_path) / "config.json"),
                                    tokenizer=self.tok_path, ternary=ternary, group_size=self.args.group_size,
                                    **self._train_config(run, PretrainConfig())))
        summary = json.loads((run / "summary.json").read_text())
        return {"label": label, "model": str(run / "model"), "run": str(run), "tokens": summary["tokens"],
                **self._evaluate(run / "model")}

    def _evaluate(self, folder: Path) -> dict:
        from ..commands.ptq import quantized_size_bytes
        from ..quant.monitor import zero_ratio_stats
        from ..train.distill import evaluate_vs_teacher
        m = load_model(folder)
        row = evaluate_vs_teacher(m, self.teacher, self.held, EVAL_BATCHES, 8)
        q = getattr(m, "ternary_config", None)
        if q is not None:
            row["zero_ratio"] = zero_ratio_stats(m)["zero_ratio"]
            size = quantized_size_bytes(m.config, q.group_size)["tq2"]
        else:
            size = sum(count_params_by_component(m.config).values()) * 2
        return {"row": row, "size_bytes": size}

    def teacher_row(self) -> dict:
        from ..train.distill import evaluate_vs_teacher
        row = evaluate_vs_teacher(self.teacher, self.teacher, self.held, EVAL_BATCHES, 8)
        return {"label": "teacher (full precision)", "model": self.teacher_path, "row": row, "tokens": 0,
                "size_bytes": sum(count_params_by_component(self.teacher.config).values()) * 2}

    def recurrence(self, results: dict) -> dict:
        from .analysis import error_vs_position, growth, inject_noise, trajectories
        from ..train.data import PackedSequences
        T, n = self.args.positions, self.args.sequences
        seqs = PackedSequences(self.held.tokens, T)
        if len(seqs) < n:
            raise UserError(f"held-out text has {len(seqs)} windows of {T} tokens; need {n} (lower --positions)")
        tokens = seqs.batch(range(n))[:, :T]
        ref = trajectories(self.teacher, tokens)
        curves = {}
        for name in ANALYSED:
            if name in results:
                print(f"[claims] recurrence: {name}", flush=True)
                curves[name] = error_vs_position(load_model(results[name]["model"]), self.teacher, tokens, ref)
        L = self.teacher.config.n_layer
        G = self.args.group_size
        noise = {}
        for layer in sorted({0, L // 2, L - 1}):
            print(f"[claims] recurrence: noise in layer {layer}", flush=True)
            noise[str(layer)] = error_vs_position(inject_noise(self.teacher, layer, G, seed=self.args.seed),
                                                  self.teacher, tokens, ref)
        summary = {name: {"state_growth": growth([sum(r) / L for r in c["state"]]),
                          "output_growth": growth([sum(r) / L for r in c["output"]]),
                          "state_err_last": sum(c["state"][-1]) / L, "output_err_last": sum(c["output"][-1]) / L}
                   for name, c in curves.items()}
        return {"positions": T, "sequences": n, "curves": curves, "noise": noise, "summary": summary}

    # ------------------------------------------------------------------ all
    def run(self) -> dict:
        a = self.args
        results = {"teacher": self.stage("teacher", self.teacher_row)}
        for name in POSTHOC:
            results[name] = self.stage(name, lambda n=name: self.posthoc(n))
        for name in QAT:
            if name not in a.skip:
                results[name] = self.stage(name, lambda n=name: self.qat(n))
        for name in SCRATCH:
            if name not in a.skip:
                results[name] = self.stage(name, lambda n=name: self.scratch(n))
        rec = self.stage("recurrence", lambda: self.recurrence(results))
        from .plots import write_results
        md = write_results(self.out, results, rec, self.args)
        print(md)
        return results


def claims(cfg: ClaimsConfig | None = None) -> dict:
    """Run (or resume) the whole experiment; returns the results by stage name.  The Python twin of
    `ternary-mamba experiment claims`."""
    cfg = cfg or ClaimsConfig()
    torch.manual_seed(cfg.seed)
    return Claims(cfg).run()
