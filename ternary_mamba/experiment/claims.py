"""`ternary-mamba experiment claims`: the paper's claims as one resumable experiment, built so each could fail.

Stages (each writes its result under OUT/stages and is skipped when re-run; training runs continue from their
last checkpoint, so an interrupted experiment resumes where it stopped):

  teacher              the full-precision teacher on every held-out set
  posthoc arms         PTQ; + bias / low-rank / QEP; GPTQ-style ternary PTQ ± corrections; 8 k and 128 k
                       calibration tokens                                               (arms.POSTHOC)
  QAT arms x seeds     absmean, learned (log / linear), frozen at init, guarded, a scale-lr sweep, state
                       distillation                                                     (arms.QAT)
  scratch x seeds      from scratch with the same tokens: ternary absmean / learned, full precision
  control              a GPT-style Transformer teacher of the same size, books and tokenizer, with the same
                       PTQ, corrections and QAT+KD                                     (experiment/transformer.py)
  recurrence           per-head state error vs position by decay horizon, output error, and the injection
                       split (error carried in the state vs per-token error)           (experiment/analysis.py)
  results              results.json (every arm, seed and setting), results.md, plots; verdicts per claim

Held-out sets: "clean" (books whose authors and series no training split holds: experiment/heldout.py) is the
primary one; "oz" (the bundled held-out book, leaked by series) and "all8" (--all-heldout) are reported beside.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from .. import assets
from ..commands.configs import ClaimsConfig, PretrainConfig, PtqConfig, QuantizeConfig
from ..commands.defaults import bundled_teacher
from ..errors import UserError
from ..formats.folders import find_tokenizer
from ..formats.fs import write_json_atomic
from ..formats.records import read_metrics
from ..runtime.load import load_model
from ..formats.paths import resolve_model_dir
from ..formats.tokenizer import load_tokenizer
from ..train.data import PackedSequences, load_tokens, tokenize_to_file
from ..train.runs import prepare_data
from ..version import code_version
from .arms import ANALYSED, BUDGETS, CONTROL_POSTHOC, POSTHOC, QAT, SCRATCH, SEQ_LEN
from .stats import eval_windows, per_window, window_books
from ..log import say


class Claims:
    def __init__(self, cfg: ClaimsConfig):
        unknown = [s for s in cfg.skip if s not in QAT and s not in SCRATCH and s not in BUDGETS
                   and s not in ("control", "posthoc")]
        if unknown:
            raise UserError(f"--skip {unknown[0]}: not a stage; choose from {', '.join([*QAT, *BUDGETS, *SCRATCH])}, "
                            f"control, posthoc")
        self.args = cfg
        self.out = Path(cfg.out)
        self.teacher_path = cfg.teacher or bundled_teacher()
        self.data = list(cfg.data or [str(assets.TRAIN_BOOKS)])
        self.eval_data = list(cfg.eval_data or [str(assets.CLEAN_HELDOUT_BOOKS)])
        self.teacher = load_model(self.teacher_path)
        if getattr(self.teacher, "ternary_config", None) is not None:
            raise UserError(f"{self.teacher_path}: is already ternary; pass the full-precision teacher")
        tok = find_tokenizer(resolve_model_dir(self.teacher_path))
        if tok is None:
            raise UserError(f"{self.teacher_path}: has no tokenizer.json")
        self.tok_path, self.tok = str(tok), load_tokenizer(tok)
        self.train, held = prepare_data(self.data, self.eval_data, self.tok, SEQ_LEN, 0.02, None)
        self.held = held                      # the primary held-out set: training-time evaluation too
        self.sets = {"clean" if not cfg.eval_data else "held-out": held}
        extra = {"oz": [str(assets.HELDOUT_BOOKS)] if not cfg.eval_data else None, "all8": cfg.all_heldout}
        for name, paths in extra.items():
            if paths:
                self.sets[name] = _windows(paths, self.tok)
        self.windows = {k: eval_windows(v, cfg.eval_windows) for k, v in self.sets.items()}
        paths = {"clean": self.eval_data, "held-out": self.eval_data, "oz": [str(assets.HELDOUT_BOOKS)],
                 "all8": cfg.all_heldout}
        self.books = {k: window_books(paths[k], self.tok, v, self.windows[k]) for k, v in self.sets.items()}
        self._teacher_logits: dict[str, list] = {k: [] for k in self.sets}
        self.seeds = [cfg.seed + i for i in range(cfg.seeds)]
        self.out.mkdir(parents=True, exist_ok=True)
        self._stale: set[str] = set()       # stages whose cached result was from other settings or code
        self._check_spec()

    def _spec(self) -> dict:
        """What an experiment folder is: resuming with other values is refused (the control teacher's budget may
        change: only the control's stages depend on it, and their cache keys hold it)."""
        a = self.args
        return {"teacher": _name(self.teacher_path), "data": [_name(d) for d in self.data],
                "eval_data": [_name(d) for d in self.eval_data], "tokens": a.tokens, "seed": a.seed,
                "group_size": a.group_size, "eval_windows": a.eval_windows}

    def _check_spec(self) -> None:
        spec = self._spec()
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
    def stage_key(self, name: str) -> str:
        """The cache key of a stage: the settings every stage shares (teacher, data, held-out sets, seed, group
        size), the settings of this stage's arm and budget, and the code version (version.code_version): a cached
        result is reused only when none of them changed."""
        import hashlib
        a = self.args
        arm = name.split("@")[0]
        gpt = arm[4:] if arm.startswith("gpt-") else None
        base = gpt or arm
        setting = {"spec": self._spec(), "stage": name, "code": code_version(),
                   "sets": {k: [len(w), *(_name(p) for p in (a.all_heldout or []) if k == "all8")]
                            for k, w in self.windows.items()},
                   "arm": repr(POSTHOC.get(base) or QAT.get(base) or SCRATCH.get(base) or BUDGETS.get(base))}
        if base in POSTHOC:
            setting["calib"] = a.calib_small if POSTHOC[base][1] == "small" else a.calib_large
        if gpt is not None or arm == "gpt-teacher":
            setting["control"] = [a.control_tokens, [_name(d) for d in (a.control_data or [])]]
        if arm == "recurrence":
            setting["analysis"] = [a.positions, a.sequences, a.calib_small, a.calib_large]
        return hashlib.sha256(json.dumps(setting, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def stage(self, name: str, fn):
        path = self.out / "stages" / f"{name}.json"
        key = self.stage_key(name)
        if path.exists():
            cached = json.loads(path.read_text())
            if cached.get("cache_key") == key:
                say(f"[claims] {name}: done (cached)")
                return cached
            say(f"[claims] {name}: cached result is from other settings or code (key {cached.get('cache_key')} "
                f"vs {key}): re-running it")
            self._stale.add(name)
        say(f"[claims] {name} ...", flush=True)
        t0 = time.time()
        result = fn()
        result["stage_wall_s"] = time.time() - t0
        result["cache_key"], result["code_version"] = key, code_version()
        path.parent.mkdir(exist_ok=True)
        write_json_atomic(path, result)
        return result

    def evaluate(self, model, teacher=None, cache: bool = True) -> dict:
        """Per-window CE / KL / agreement on every held-out set, and the zero ratio with its MSE optimum."""
        from ..quant.monitor import zero_ratio_stats
        teacher = teacher or self.teacher
        res = {"windows": {k: per_window(model, teacher, s, self.windows[k],
                                         teacher_logits=self._teacher_logits[k] if cache else None)
                           for k, s in self.sets.items()}}
        if getattr(model, "ternary_config", None) is not None:
            z = zero_ratio_stats(model, optimum=True)
            res.update(zero_ratio=z["zero_ratio"], zero_ratio_opt=z["zero_ratio_opt"],
                       zero_ratio_layers=z["zero_ratio_layers"], zero_ratio_opt_layers=z["zero_ratio_opt_layers"])
        return res

    def posthoc(self, name: str, teacher=None, folder: Path | None = None) -> dict:
        from ..commands.ptq import ptq
        settings, budget = POSTHOC[name]
        calib = self.args.calib_small if budget == "small" else self.args.calib_large
        if teacher is not None:         # the Transformer control: no folder, no packed size
            from ..commands.ptq import calibration_batches
            from ..quant.posthoc import PosthocConfig, posthoc_quantize
            pc = PosthocConfig(methods=settings.get("correct", ()), act_weighted=not settings.get("plain_svd"))
            student, _ = posthoc_quantize(teacher, calibration_batches(self.train, calib, 8, self.args.seed),
                                          self.args.group_size, pc)
            return {"label": pc.label, "calib_tokens": calib * (SEQ_LEN + 1), **_bits(student),
                    **self.evaluate(student, teacher, cache=False)}
        folder = self.out / "posthoc" / name
        if folder.exists():  # interrupted after writing: redo it (seconds)
            shutil.rmtree(folder)
        cfg = PtqConfig(teacher=self.teacher_path, out=str(folder), seed=self.args.seed, calib_seqs=calib,
                        group_size=self.args.group_size, eval_batches=1, **settings)   # evaluated below
        s = ptq(cfg, teacher=self.teacher, data=(self.train, self.held))
        student = load_model(folder / "student")
        return {**_bits(student), "label": s["method"] + ("" if budget == "small" else f", calib. {s['calib_tokens'] // 1000} k"),
                "model": _name(str(folder / "student")), "size_bytes": s["sizes_bytes"]["tq2"],
                "calib_tokens": s["calib_tokens"], "extra_params": s["extra_params"],
                **self.evaluate(student)}

    def _run_folder(self, name: str, seed: int) -> Path:
        """The arm's training run; removed first when its stage was stale (trained by other settings or code)."""
        run = self.out / "runs" / name / f"seed{seed}"
        if f"{name}@{seed}" in self._stale and run.exists():
            shutil.rmtree(run)
        return run

    def _train_config(self, run: Path, defaults, seed: int, tokens: int | None = None) -> dict:
        """What every training run shares: data, budget, seed, evaluation cadence (every 8 steps: often enough for
        the online collapse detector to see a rise); resumed where it stopped."""
        every = 8 if tokens is None else max(8, 8 * tokens // self.args.tokens)   # ~6 evaluations per 100 k tokens
        train = defaults.train.replace(tokens=tokens or self.args.tokens, seed=seed, eval_every=every)
        resume = (run / "checkpoint" / "trainer_state.json").exists()
        if not resume and run.exists():        # stopped before its first checkpoint: this folder is ours to redo
            shutil.rmtree(run)
        return {"out": str(run), "data": list(self.data), "eval_data": list(self.eval_data), "train": train,
                "resume": resume, "device": self.args.device, "dtype": self.args.dtype}

    def qat(self, name: str, seed: int) -> dict:
        from ..commands.quantize import quantize
        from ..quant.config import TernaryConfig
        from ..train.config import DistillConfig
        base, mult, _ = BUDGETS.get(name, (name, None, None))
        tokens = mult * self.args.tokens if mult else None
        label, quant, distill = QAT[base]
        if tokens:
            label = f"{label}, {tokens / 1e6:g} M tokens"
        run = self._run_folder(name, seed)
        if not (run / "summary.json").exists():
            quantize(QuantizeConfig(teacher=self.teacher_path,
                                    quant=TernaryConfig(group_size=self.args.group_size, **quant),
                                    distill=DistillConfig(**distill), final_eval_batches=1,   # evaluated below
                                    **self._train_config(run, QuantizeConfig(), seed, tokens)))
        summary = json.loads((run / "summary.json").read_text())
        return {"label": label, "model": _name(str(run / "student")), "tokens": summary["tokens"],
                "collapse_events": summary.get("collapse_events", []), "curve": _curve(run),
                **self.evaluate(load_model(run / "student"))}

    def scratch(self, name: str, seed: int) -> dict:
        from ..commands.pretrain import pretrain
        from ..quant.config import TernaryConfig
        label, quant, lr_mult = SCRATCH[name]
        run = self._run_folder(name, seed)
        if not (run / "summary.json").exists():
            pretrain(PretrainConfig(model=str(resolve_model_dir(self.teacher_path) / "config.json"),
                                    tokenizer=self.tok_path, ternary=quant is not None, scale_lr_mult=lr_mult,
                                    quant=TernaryConfig(group_size=self.args.group_size, **(quant or {})),
                                    **self._train_config(run, PretrainConfig(), seed)))
        summary = json.loads((run / "summary.json").read_text())
        return {"label": label, "model": _name(str(run / "model")), "tokens": summary["tokens"],
                "collapse_events": summary.get("collapse_events", []), "curve": _curve(run),
                **self.evaluate(load_model(run / "model"))}

    def teacher_row(self) -> dict:
        return {"label": "teacher (full precision)", "model": _name(self.teacher_path), **self.evaluate(self.teacher)}

    # ------------------------------------------------------------------ the Transformer control
    def control(self, results: dict) -> None:
        from . import transformer as T
        a = self.args
        root = self.out / "control"
        data = list(a.control_data or self.data)
        ctrain, _ = prepare_data(data, self.eval_data, self.tok, SEQ_LEN, 0.02, None) if a.control_data \
            else (self.train, None)
        holder = {}

        def teacher():
            if "t" not in holder:
                if "gpt-teacher" in self._stale and (root / "teacher").exists():   # trained by other code
                    shutil.rmtree(root / "teacher")
                holder["t"] = T.train_teacher(root / "teacher", self.teacher.config, ctrain, self.held,
                                              a.control_tokens, a.seed)
            return holder["t"]
        results["gpt-teacher"] = self.stage("gpt-teacher", lambda: {
            "label": "GPT teacher (full precision)", "tokens": a.control_tokens,
            **self.evaluate(teacher(), teacher(), cache=False)})
        for name in CONTROL_POSTHOC:
            results[f"gpt-{name}"] = self.stage(f"gpt-{name}", lambda n=name: self.posthoc(n, teacher=teacher()))
        for i, seed in enumerate(self.seeds):
            def qat(seed=seed):
                if f"gpt-qat-absmean@{seed}" in self._stale and (root / "qat-absmean" / f"seed{seed}").exists():
                    shutil.rmtree(root / "qat-absmean" / f"seed{seed}")
                s, events = T.qat_student(teacher(), root / "qat-absmean" / f"seed{seed}", self.train, self.held,
                                          a.tokens, seed, a.group_size)
                return {"label": "GPT QAT+KD, absmean scales", "tokens": a.tokens, "collapse_events": events,
                        **self.evaluate(s, teacher(), cache=False)}
            results[f"gpt-qat-absmean@{seed}"] = self.stage(f"gpt-qat-absmean@{seed}", qat)
            for name, (_, mult, n_seeds) in BUDGETS.items():      # the same token-budget sweep as Mamba-2's
                if name in a.skip or i >= n_seeds:
                    continue

                def qat_budget(seed=seed, name=name, tokens=mult * a.tokens):
                    run = root / name / f"seed{seed}"
                    if f"gpt-{name}@{seed}" in self._stale and run.exists():
                        shutil.rmtree(run)
                    s, events = T.qat_student(teacher(), run, self.train, self.held, tokens, seed, a.group_size)
                    return {"label": f"GPT QAT+KD, absmean scales, {tokens / 1e6:g} M tokens", "tokens": tokens,
                            "collapse_events": events, **self.evaluate(s, teacher(), cache=False)}
                results[f"gpt-{name}@{seed}"] = self.stage(f"gpt-{name}@{seed}", qat_budget)

    # ------------------------------------------------------------------ recurrence
    def recurrence(self, results: dict) -> dict:
        from .analysis import decay_horizons, inject_noise, recurrence_analysis, trajectories
        T, n = self.args.positions, self.args.sequences
        seqs = PackedSequences(self.held.tokens, T)
        if len(seqs) < n:
            raise UserError(f"held-out text has {len(seqs)} windows of {T} tokens; need {n} (lower --positions)")
        tokens = seqs.batch(eval_windows(seqs, n))[:, :T]
        horizons = decay_horizons(self.teacher, tokens)
        ref = trajectories(self.teacher, tokens)
        t0 = T // 2
        models = {}
        for name in ANALYSED:
            key = name if name in POSTHOC else f"{name}@{self.seeds[0]}"
            if key in results and "model" in results[key]:
                models[name] = (results[key]["label"], _path(results[key]["model"]))
        L, G = self.teacher.config.n_layer, self.args.group_size
        for layer in sorted({0, L // 2, L - 1}):
            models[f"noise-layer{layer}"] = (f"teacher + ternary-sized noise in layer {layer}",
                                             inject_noise(self.teacher, layer, G, seed=self.args.seed))
        out = {}
        for name, (label, model) in models.items():
            say(f"[claims] recurrence: {name}", flush=True)
            m = load_model(model) if isinstance(model, (str, Path)) else model
            out[name] = {"label": label, **recurrence_analysis(m, self.teacher, tokens, ref, horizons, t0)}
        return {"positions": T, "sequences": n, "t0": t0, "train_len": SEQ_LEN,
                "horizons": horizons.tolist(), "models": out}

    # ------------------------------------------------------------------ all
    def run(self) -> dict:
        a = self.args
        results = {"teacher": self.stage("teacher", self.teacher_row)}
        if "posthoc" not in a.skip:
            for name in POSTHOC:
                results[name] = self.stage(name, lambda n=name: self.posthoc(n))
        for i, seed in enumerate(self.seeds):     # seed-major: a stopped run has every arm at its first seeds
            for name in (*QAT, *BUDGETS):
                if name not in a.skip and (name not in BUDGETS or i < BUDGETS[name][2]):
                    results[f"{name}@{seed}"] = self.stage(f"{name}@{seed}", lambda n=name, s=seed: self.qat(n, s))
            for name in SCRATCH:
                if name not in a.skip:
                    results[f"{name}@{seed}"] = self.stage(f"{name}@{seed}", lambda n=name, s=seed: self.scratch(n, s))
        if "control" not in a.skip:
            self.control(results)
        rec = self.stage("recurrence", lambda: self.recurrence(results))
        from .results import write_results
        md = write_results(self.out, results, rec, self)
        say(md)
        return results


def _bits(student) -> dict:
    """The real storage of a post-hoc student per quantized weight: 2 bits of code (tq2), a 16-bit scale per group,
    and every extra (fp16) parameter its corrections carry (bias, low-rank branches), counted against it."""
    from ..quant.posthoc import correction_params
    from ..quant.qat import ternary_modules
    mods = [m for _, m in ternary_modules(student)]
    n = sum(m.out_features * m.in_features for m in mods)
    if not n:
        return {}
    extra = correction_params(student)
    return {"quantized_weights": n, "extra_params_counted": extra,
            "bits_per_weight": 2 + 16 / mods[0].group_size + 16 * extra / n}


def _windows(paths: list[str], tok) -> PackedSequences:
    return PackedSequences(load_tokens(tokenize_to_file(paths, tok, None, False)), SEQ_LEN)


def _curve(run: Path) -> list[dict]:
    """The run's zero ratio, its optimum and the held-out KL / loss over training (from metrics.jsonl)."""
    keep = ("step", "tokens", "zero_ratio", "zero_ratio_opt", "guard_bound", "eval_kl", "eval_loss", "eval_ppl", "kl",
            "loss", "state_mse")
    out = []
    for r in read_metrics(run / "metrics.jsonl"):
        if "zero_ratio" in r or "eval_kl" in r or "eval_loss" in r:
            out.append({k: r[k] for k in keep if k in r})
    return out


def _name(path: str) -> str:
    """How results name a file: relative to the working directory when inside it, `bundled:` for the
    package's assets — never a machine's absolute path."""
    p = Path(path).resolve()
    for root, tag in ((assets.ASSETS.resolve(), "bundled:"), (Path.cwd().resolve(), "")):
        if p.is_relative_to(root):
            return tag + str(p.relative_to(root))
    return str(path)


def _path(name: str) -> Path:
    return assets.ASSETS / name[len("bundled:"):] if name.startswith("bundled:") else Path(name)


def claims(cfg: ClaimsConfig | None = None) -> dict:
    """Run (or resume) the whole experiment; returns the results by stage name.  The Python twin of
    `ternary-mamba experiment claims`."""
    cfg = cfg or ClaimsConfig()
    torch.manual_seed(cfg.seed)
    return Claims(cfg).run()
