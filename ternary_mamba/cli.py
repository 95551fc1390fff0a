# PYTHON_ARGCOMPLETE_OK
"""The `ternary-mamba` command line: flags made from each command's typed config (commands/configs.py), then
one call of the command's function.  Heavy imports (torch, transformers) live inside the commands so that
`--help` is instant.  A `UserError` prints as one line and exits 1."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

EPILOG = """examples:
  ternary-mamba quantize                                   # bundled teacher + bundled books (the demo)
  ternary-mamba quantize --teacher state-spaces/mamba2-130m --data books/ --tokens 5000000 --out runs/130m
  ternary-mamba quantize --config runs/130m/run.json --out runs/130m-again   # replay a run (flags override)
  ternary-mamba info mamba2-1.3b                           # a preset: 1,343,757,312 parameters
  ternary-mamba info bundled                               # the bundled teacher, by name
  ternary-mamba pretrain --model-config teacher-8k --tokenizer tok.json --data books/ --tokens 20000000 --out runs/t
  ternary-mamba tokenizer train --data books/ --vocab-size 8192 --out tokenizer.json
  ternary-mamba export runs/130m --format tq1 --out packed/130m
  ternary-mamba generate packed/130m --prompt "Once upon a time"
  ternary-mamba bench model
"""


@dataclass(frozen=True)
class Typed:
    """A command whose settings are one typed config: where its config class and function live."""
    config: str        # "module:Class" under ternary_mamba.commands (or experiment)
    function: str      # "module:function"
    help: str
    groups: tuple = ()  # (nested config field, argument-group title)
    config_file: bool = True   # the command takes --config FILE

    def load(self, which: str):
        import importlib
        mod, name = (self.config if which == "config" else self.function).split(":")
        return getattr(importlib.import_module(f"ternary_mamba.{mod}"), name)


TYPED = {
    "quantize": Typed("commands.configs:QuantizeConfig", "commands.quantize:quantize",
                      "grouped ternary QAT + distillation from a frozen teacher (no args: the demo)",
                      (("quant", "quantization"), ("distill", "distillation"), ("monitor", "zero-ratio monitor"),
                       ("train", "training"))),
    "pretrain": Typed("commands.configs:PretrainConfig", "commands.pretrain:pretrain",
                      "train a Mamba-2 from scratch (the teacher; --ternary: the from-scratch control)",
                      (("quant", "quantization (--ternary)"), ("train", "training"))),
    "ptq": Typed("commands.configs:PtqConfig", "commands.ptq:ptq",
                 "post-training ternarization (no training) + post-hoc corrections"),
    "export": Typed("commands.configs:ExportConfig", "commands.export:export",
                    "pack a QAT student (or PTQ a full-precision model) into tq2/tq1, or GGUF"),
    "generate": Typed("commands.configs:GenerateConfig", "commands.generate:generate",
                      "generate text (FP checkpoints, QAT runs, packed folders and GGUF files alike)"),
    "eval": Typed("commands.configs:EvalConfig", "commands.evaluate:evaluate",
                  "zero-shot tasks (lm-eval prompts) from local files, models side by side"),
    "ppl": Typed("commands.configs:PplConfig", "commands.evaluate:perplexity",
                 "perplexity and bits per byte on held-out text"),
    "plan": Typed("commands.configs:PlanConfig", "commands.plan:plan",
                  "memory per GPU and hours of a QAT+KD run (traced on the meta device; nothing is allocated)"),
    "info": Typed("commands.tool_configs:InfoConfig", "commands.info:info_command",
                  "config, parameter counts by component and sizes of a model, run or preset", config_file=False),
    "push": Typed("commands.tool_configs:PushConfig", "commands.push:push_command",
                  "upload a model folder to the Hugging Face hub with its model card", config_file=False),
    "report": Typed("commands.tool_configs:ReportConfig", "commands.report:report",
                    "(re)generate report.md with plots for a run folder", config_file=False),
    "serve": Typed("commands.tool_configs:ServeConfig", "commands.serve:serve",
                   "an OpenAI-compatible HTTP API (completions, chat completions, streaming) over a model",
                   config_file=False),
    "parity": Typed("commands.tool_configs:ParityConfig", "commands.parity:parity",
                    "our model vs transformers' Mamba2ForCausalLM on the same weights (max abs logit differences; "
                    "needs transformers)", config_file=False),
}
BENCH = {
    "model": Typed("bench.configs:BenchModelConfig", "bench.model:run_bench_model",
                   "training / prefill / decode of our Mamba-2 vs transformers'", config_file=False),
    "qat": Typed("bench.configs:BenchQatConfig", "bench.model:run_bench_qat",
                 "cost of a QAT+KD step relative to a plain training step", config_file=False),
    "gpu": Typed("bench.configs:BenchGpuConfig", "bench.gpu:run_bench_gpu",
                 "QAT+KD training steps of the real configs on a CUDA GPU: tokens/s, MFU, peak memory vs `plan`",
                 config_file=False),
    "decode": Typed("bench.configs:BenchDecodeConfig", "bench.runtime:run_bench_runtime",
                    "decode tokens/s: dense fp32 vs packed ternary with our runtime", config_file=False),
    "prefill": Typed("bench.configs:BenchPrefillConfig", "bench.runtime:run_bench_runtime",
                     "prefill tokens/s: dense fp32 vs packed ternary with our runtime", config_file=False),
    "serve": Typed("bench.configs:BenchServeConfig", "bench.serve:run_bench_serve",
                   "load test of `serve` on loopback: tokens/s and latency percentiles at 1, 4, 16 concurrent "
                   "clients (official openai client)", config_file=False),
    "ops": Typed("bench.configs:BenchOpsConfig", "bench.ops:run_bench_ops",
                 "every op's fast path against its reference at a model's shapes: which ran, max error, time",
                 config_file=False),
}
TOKENIZER_TRAIN = Typed("commands.tool_configs:TokenizerTrainConfig", "commands.tokenizer:train_tokenizer_command",
                        "train a byte-level BPE tokenizer", config_file=False)
CLAIMS = Typed("commands.configs:ClaimsConfig", "experiment.claims:claims",
               "the paper's claims on one teacher: table + plots (resumable)")


def _add_typed(sub, name: str, spec: Typed) -> None:
    from .commands.flags import add_config_flags
    p = sub.add_parser(name, help=spec.help, description=spec.help)
    add_config_flags(p, spec.load("config"), groups=dict(spec.groups), with_config_file=spec.config_file)
    if name == "quantize":   # --guard-band LOW HIGH: both ends of the band in one flag
        p.add_argument("--guard-band", type=float, nargs=2, metavar=("LOW", "HIGH"), default=argparse.SUPPRESS,
                       help="guarded: scale kept within [LOW, HIGH] x the group's current absmean")
    p.set_defaults(typed=spec)


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags (`--token` would be --tokens or --tokenizer, and a new flag can change what an old
    command line means); a mistake is one line, not the usage block (`--help` has that)."""

    def __init__(self, *args, **kw):
        kw.setdefault("allow_abbrev", False)
        super().__init__(*args, **kw)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _subparser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The (sub)parser that parsed the command the user typed (bench decode, tokenizer train, ...)."""
    p = parser
    for dest in ("command", "bench_command", "tok_command", "exp_command"):
        name = getattr(args, dest, None)
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if name is None or not subs or name not in subs[0].choices:
            continue
        p = subs[0].choices[name]
    return p


def _unknown_arguments(parser, args, extra: list[str]) -> str:
    """One line for arguments nobody takes, with the closest flag the command has."""
    import difflib
    p = _subparser(parser, args)
    bad = next((e for e in extra if e.startswith("-")), extra[0])
    flags = sorted(s for s in p._option_string_actions if s.startswith("--"))
    close = difflib.get_close_matches(bad.split("=")[0], flags, n=1, cutoff=0.6) if bad.startswith("-") else []
    hint = f"; did you mean {close[0]}?" if close else f" ({p.prog} --help lists what it takes)"
    return f"{p.prog}: error: unrecognized argument {bad}{hint}"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ternary-mamba", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Grouped ternary (W1.58A16) QAT + distillation for Mamba-2, packed export and CPU inference.")
    from .version import __version__
    parser.add_argument("--version", action="version", version=f"ternary-mamba {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for name, spec in TYPED.items():
        _add_typed(sub, name, spec)

    p = sub.add_parser("experiment", help="reproducible experiments (claims: PTQ/corrections vs QAT+KD vs scratch)")
    esub = p.add_subparsers(dest="exp_command", metavar="WHICH")
    _add_typed(esub, "claims", CLAIMS)

    p = sub.add_parser("lm-eval", help="lm-evaluation-harness's CLI with the ternary-mamba model type registered",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser("bench", help="speed benchmarks (ratios against a reference measured in the same run)")
    bsub = p.add_subparsers(dest="bench_command", metavar="WHAT")
    for name, spec in BENCH.items():
        _add_typed(bsub, name, spec)
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tok_command", metavar="ACTION")
    _add_typed(tsub, "train", TOKENIZER_TRAIN)
    return parser


def _check_pretrain_config_flag(args) -> None:
    """`pretrain --config` is a run config, as for every command (a run.json, or a file of PretrainConfig fields);
    a model preset or a model config.json goes to --model-config.  Said in one line instead of guessed."""
    from .commands.flags import DEST
    from .errors import UserError
    path = getattr(args, DEST + "file", None)
    if path is not None and not _is_pretrain_config(path):
        raise UserError(f"--config {path}: not a pretrain config (a run.json or a file of its fields); a model "
                        f"preset or a model config.json goes to --model-config")


def _is_pretrain_config(path: str) -> bool:
    from .commands.configs import PretrainConfig
    from .commands.flags import field_names, read_config_file
    from .core.config import PRESETS
    if path in PRESETS or not os.path.isfile(path):
        return False
    try:
        keys = set(read_config_file(path))
        return bool(keys) and keys <= field_names(PretrainConfig)
    except Exception:  # noqa: BLE001 - unreadable as a run config: the model-config reader will say why
        return False


def _recorded_threads(cfg) -> int | None:
    """The threads recorded in the run.json of a run being resumed (None when there is none to read)."""
    if not getattr(cfg, "resume", False) or not getattr(cfg, "out", None):
        return None
    import json
    try:
        rec = json.loads((Path(cfg.out) / "run.json").read_text())
        n = rec["config"]["threads"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def typed_config(args):
    """The command's typed config from its parsed flags (and --config file)."""
    from .commands.flags import DEST, config_from_args
    spec: Typed = args.typed
    if args.command == "pretrain":
        _check_pretrain_config_flag(args)
    band = vars(args).pop("guard_band", None)
    if band is not None:
        from .errors import UserError
        given = [f for f in ("guard_low", "guard_high") if hasattr(args, DEST + "quant__" + f)]
        if given:
            raise UserError(f"--guard-band sets both ends; drop --{given[0].replace('_', '-')} (or --guard-band)")
        setattr(args, DEST + "quant__guard_low", band[0])
        setattr(args, DEST + "quant__guard_high", band[1])
    return config_from_args(spec.load("config"), args, args.command)


def _run(args) -> None:
    from .errors import UserError
    if getattr(args, "typed", None) is not None:
        cfg = args._cfg
        fn = args.typed.load("function")
        if args.command == "generate":
            fn(cfg, stream=True)
        else:
            fn(cfg)
        return
    if args.command == "experiment":
        raise UserError("usage: ternary-mamba experiment claims [--tokens N] [--out DIR]")
    elif args.command == "lm-eval":
        from .eval.lm_eval_main import main as lm_eval_main
        lm_eval_main(args.rest)
    elif args.command == "tokenizer":
        raise UserError("usage: ternary-mamba tokenizer train --data PATH... --vocab-size N --out tokenizer.json")
    elif args.command == "bench":
        raise UserError(f"usage: ternary-mamba bench {{{','.join(BENCH)}}}")


# commands that allocate the same large activations every step: they keep freed memory in the heap
MEMORY_HUNGRY = ("quantize", "pretrain", "experiment", "bench", "ptq")
AUTO_THREADS = ("quantize", "pretrain", "experiment", "ptq", "eval", "ppl", "parity", "serve")   # generate decides after loading


def main(argv: list[str] | None = None) -> int:
    from .errors import cli_mode
    cli_mode(True)
    try:
        return _main(argv)
    finally:
        cli_mode(False)


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:          # lm-eval parses its own flags, --help included
        from .errors import UserError
        try:
            from .eval.lm_eval_main import main as lm_eval_main
            lm_eval_main(argv[1:])
        except UserError as e:
            print(f"ternary-mamba lm-eval: error: {e}", file=sys.stderr)
            return 1
        return 0
    parser = build_parser()
    try:                                  # shell completion: eval "$(register-python-argcomplete ternary-mamba)"
        import argcomplete
        argcomplete.autocomplete(parser)
    except ImportError:
        pass
    args, extra = parser.parse_known_args(argv)
    if extra:
        print(_unknown_arguments(parser, args, extra), file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 0
    from .errors import UserError
    usage = {"experiment": ("exp_command", "experiment claims [--tokens N] [--out DIR]"),
             "bench": ("bench_command", f"bench {{{','.join(BENCH)}}}"),
             "tokenizer": ("tok_command", "tokenizer train --data PATH... --vocab-size N --out tokenizer.json")}
    if args.command in usage and getattr(args, usage[args.command][0], None) is None:   # instantly, before torch
        print(f"ternary-mamba {args.command}: error: usage: ternary-mamba {usage[args.command][1]}", file=sys.stderr)
        return 1
    completed = False
    try:
        threads = getattr(args, "threads", None)
        if getattr(args, "typed", None) is not None:
            args._cfg = typed_config(args)
            threads = getattr(args._cfg, "threads", None)
        if os.environ.get("TERNARY_MAMBA_REFERENCE") or os.environ.get("TERNARY_MAMBA_FAULT"):
            from .faults import ENV, parse
            from .ops.dispatch import reference_kind
            reference_kind()                  # the environment switches, checked before anything runs
            if os.environ.get(ENV):
                parse(os.environ[ENV])
        if args.command in MEMORY_HUNGRY:
            from .runtime.memory import keep_freed_memory
            keep_freed_memory()   # no page faults on every step's fresh activations (see runtime/memory.py)
        if not threads and getattr(args, "_cfg", None) is not None:
            threads = _recorded_threads(args._cfg)   # --resume: the thread count the run was started with
        if threads:
            from .ops.build import set_threads
            set_threads(threads)          # torch and the C kernels (their own OpenMP runtime)
        elif args.command in AUTO_THREADS:
            from .ops.build import set_threads
            from .ops.threads import default_threads
            n, why = default_threads()    # idle physical cores: a busy core would stall every barrier
            set_threads(n)
            threads = n
            if "busy" in why:   # a note with the command's report (stdout): stderr stays for the one-line error
                print(f"ternary-mamba {args.command}: {why}", flush=True)
        if threads and hasattr(getattr(args, "_cfg", None), "threads"):
            # the count in force is what run.json records: the summation order (and so the last digits of every
            # figure) depends on it, and a replay or a resume then uses it
            args._cfg = args._cfg.replace(threads=threads)
        if args.command in ("pretrain", "quantize"):
            from .train.distributed import init_if_launched, is_main
            init_if_launched()
            if not is_main():  # rank 0 alone prints
                sys.stdout = open(os.devnull, "w")
        _run(args)
        completed = True
    except UserError as e:
        if not (type(e).__name__ == "CollectiveError" and os.environ.get("RANK", "0") != "0"):
            print(f"ternary-mamba {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ternary-mamba {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:          # a full disk, a read-only or missing folder, a file where a folder belongs, ...
        where = e.filename if e.filename is not None else "?"
        print(f"ternary-mamba {args.command}: error: {where}: {e.strerror or e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        if "can't allocate memory" in str(e) or type(e).__name__ == "OutOfMemoryError":
            print(f"ternary-mamba {args.command}: error: out of memory ({str(e).splitlines()[0][:160]}); use a smaller "
                  f"model, batch or sequence length (`ternary-mamba plan` estimates the memory)", file=sys.stderr)
            return 1
        if str(e).startswith("Symlink loop from "):     # pathlib's resolve() before Python 3.13 (then: OSError ELOOP)
            print(f"ternary-mamba {args.command}: error: {str(e)[len('Symlink loop from '):].strip(chr(39))}: Too many "
                  f"levels of symbolic links", file=sys.stderr)
            return 1
        from .train.distributed import active, world
        if not active() or world()[1] == 1:
            raise
        # under torchrun a rank that failed has left; the collectives of the others fail: one line, not a traceback
        print(f"ternary-mamba {args.command}: error: rank {world()[0]}: stopped because another rank failed "
              f"({str(e).splitlines()[0][:120]}); see that rank's message", file=sys.stderr)
        return 1
    finally:
        if "ternary_mamba.train.runs" in sys.modules:
            from .train.runs import release_run_dirs
            release_run_dirs(failed=not completed)
        if "torch.distributed" in sys.modules:
            from .train.distributed import shutdown
            shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
