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
import time
from pathlib import Path

import torch

from ..checkpoint import find_tokenizer, load_model, resolve_model_dir
from ..errors import UserError
from ..info import MB, count_params_by_component
from ..tokenizer import load_tokenizer
from ..train.loop import write_json_atomic
from ..train.runs import prepare_data

POSTHOC = {  # name -> ptq CLI arguments
    "ptq": [],
    "ptq-bias": ["--correct", "bias"],
    "ptq-lowrank": ["--correct", "lowrank", "--plain-svd"],
    "ptq-lowrank-aw": ["--correct", "lowrank"],
    "ptq-qep": ["--correct", "qep"],
    "ptq-qep-lowrank": ["--correct", "qep", "lowrank"],
}
QAT = {  # name -> (label, quantize CLI arguments)
    "qat-absmean": ("QAT+KD, absmean scales", ["--scale-mode", "absmean"]),
    "qat-learned": ("QAT+KD, learned scales", ["--scale-mode", "learned"]),
    "qat-guarded": ("QAT+KD, guarded scales", ["--scale-mode", "guarded"]),
    "qat-learned-lr10": ("QAT+KD, learned scales, scale lr x10", ["--scale-mode", "learned", "--scale-lr-mult", "10"]),
    "qat-guarded-lr10": ("QAT+KD, guarded scales, scale lr x10", ["--scale-mode", "guarded", "--scale-lr-mult", "10"]),
}
SCRATCH = {
    "scratch-ternary": ("from scratch, ternary (same tokens)", ["--ternary"]),
    "scratch-fp": ("from scratch, full precision (same tokens)", []),
}
ANALYSED = ("ptq", "ptq-bias", "ptq-lowrank", "ptq-qep", "qat-absmean", "qat-guarded")
SEQ_LEN, EVAL_BATCHES = 256, 16


class Claims:
    def __init__(self, args):
        from .. import assets
        self.args = args
        self.out = Path(args.out)
        self.teacher_path = args.teacher or str(assets.TEACHER)
        self.data = args.data or [str(assets.TRAIN_BOOKS)]
        self.eval_data = args.eval_data or ([str(assets.HELDOUT_BOOKS)] if not args.data else None)
        if not self.eval_data:
            raise UserError("pass --eval-data (held-out text) together with --data")
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

    def _cli(self, argv: list[str]):
        from ..cli import build_parser
        return build_parser().parse_args(argv)

    def posthoc(self, name: str) -> dict:
        from ..ptq import run_ptq
        folder = self.out / "posthoc" / name
        if folder.exists():  # interrupted after writing: redo it (seconds)
            import shutil
            shutil.rmtree(folder)
        args = self._cli(["ptq", "--teacher", self.teacher_path, "--out", str(folder), "--seed", str(self.args.seed),
                          "--eval-batches", str(EVAL_BATCHES), "--group-size", str(self.args.group_size),
                          *POSTHOC[name]])
        s = run_ptq(args, teacher=self.teacher, data=(self.train, self.held))
        return {"label": s["method"], "model": str(folder / "student"), "row": s["row"],
                "size_bytes": s["sizes_bytes"]["tq2"], "tokens": 0, "calib_tokens": s["calib_tokens"],
                "extra_params": s["extra_params"]}

    def _train(self, name: str, argv: list[str]) -> None:
        run = self.out / "runs" / name
        if (run / "summary.json").exists():
            return
        resume = ["--resume"] if (run / "run.json").exists() else []
        args = self._cli(argv + ["--out", str(run), "--tokens", str(self.args.tokens), "--seed", str(self.args.seed),
                                 "--group-size", str(self.args.group_size), "--data", *self.data,
                                 "--eval-data", *self.eval_data] + resume)
        if argv[0] == "quantize":
            from ..train.quantize import run_quantize
            run_quantize(args)
        else:
            from ..train.pretrain import run_pretrain
            run_pretrain(args)

    def qat(self, name: str) -> dict:
        label, extra = QAT[name]
        self._train(name, ["quantize", "--teacher", self.teacher_path, "--eval-every", "25", *extra])
        run = self.out / "runs" / name
        summary = json.loads((run / "summary.json").read_text())
        return {"label": label, "model": str(run / "student"), "run": str(run), "tokens": summary["tokens"],
                "collapse_events": summary.get("collapse_events", []), **self._evaluate(run / "student")}

    def scratch(self, name: str) -> dict:
        label, extra = SCRATCH[name]
        self._train(name, ["pretrain", "--config", str(resolve_model_dir(self.teacher_path) / "config.json"),
                           "--tokenizer", self.tok_path, "--eval-every", "25", *extra])
        run = self.out / "runs" / name
        summary = json.loads((run / "summary.json").read_text())
        return {"label": label, "model": str(run / "model"), "run": str(run), "tokens": summary["tokens"],
                **self._evaluate(run / "model")}

    def _evaluate(self, folder: Path) -> dict:
        from ..ptq import quantized_size_bytes
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
        from ..analysis import error_vs_position, growth, inject_noise, trajectories
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


def run_claims(args) -> None:
    if args.tokens < 10_000:
        raise UserError(f"--tokens {args.tokens}: too small for a training run (use at least 10000)")
    unknown = [s for s in args.skip if s not in QAT and s not in SCRATCH]
    if unknown:
        raise UserError(f"--skip {unknown[0]}: not a training run; choose from {', '.join([*QAT, *SCRATCH])}")
    torch.manual_seed(args.seed)
    Claims(args).run()
