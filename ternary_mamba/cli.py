"""The `ternary-mamba` command line.  Heavy imports (torch, transformers) live inside the commands so
that `--help` is instant.  A `UserError` prints as one line and exits 1."""
from __future__ import annotations

import argparse
import os
import sys

EPILOG = """examples:
  ternary-mamba quantize                                   # bundled teacher + bundled books (the demo)
  ternary-mamba quantize --teacher state-spaces/mamba2-130m --data books/ --tokens 5000000 --out runs/130m
  ternary-mamba info models/teacher                        # config, parameter counts, FP16 size
  ternary-mamba info mamba2-1.3b                           # a preset: 1,343,757,312 parameters
  ternary-mamba pretrain --config teacher-8k --tokenizer tok.json --data books/ --tokens 20000000 --out runs/t
  ternary-mamba tokenizer train --data books/ --vocab-size 8192 --out tokenizer.json
  ternary-mamba generate models/teacher --prompt "Once upon a time"
  ternary-mamba bench model
"""


def _add_train_args(p: argparse.ArgumentParser, tokens: int, lr: float, seq_len: int = 256, batch: int = 8) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--tokens", type=int, default=tokens, help="token budget (default %(default)s)")
    g.add_argument("--seq-len", type=int, default=seq_len)
    g.add_argument("--batch-size", type=int, default=batch, help="sequences per micro-batch (per rank)")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--warmup-frac", type=float, default=0.05)
    g.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations (0: never)")
    g.add_argument("--eval-batches", type=int, default=8)
    g.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chunk-size", type=int, default=None, help="SSD chunk length (compute knob; default from config)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    g.add_argument("--cache-dir", default=None, help="where tokenized data is cached")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard the student with FSDP2 "
                   "(parameters, gradients, optimizer state) instead of DDP")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ternary-mamba", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Grouped ternary (W1.58A16) QAT + distillation for Mamba-2, packed export and CPU inference.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="config, parameter counts by component and sizes of a model, run or preset")
    p.add_argument("path", help="model folder, run folder, packed folder, config.json, preset name or hub id")

    p = sub.add_parser("pretrain", help="train a Mamba-2 from scratch (the teacher; --ternary: the from-scratch control)")
    p.add_argument("--config", required=True, help="preset name or JSON file of Mamba2Config fields")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json")
    p.add_argument("--data", nargs="+", required=True, help="text files / folders / jsonl")
    p.add_argument("--eval-data", nargs="+", default=None, help="held-out text (default: 1%% split off --data)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--ternary", action="store_true", help="ternary QAT from random init (from-scratch control)")
    p.add_argument("--group-size", type=int, default=128)
    _add_train_args(p, tokens=10_000_000, lr=3e-3)

    p = sub.add_parser("quantize", help="grouped ternary QAT + distillation from a frozen teacher (no args: the demo)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default=None, help="teacher folder or hub id (default: the bundled teacher)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the teacher's)")
    p.add_argument("--data", nargs="+", default=None, help="text files / folders / jsonl (default: bundled books)")
    p.add_argument("--eval-data", nargs="+", default=None, help="held-out text (default: bundled held-out book, "
                   "or 2%% split off --data)")
    p.add_argument("--out", default=None, help="run folder (default: runs/ternary-<teacher>-<time>)")
    q = p.add_argument_group("quantization")
    q.add_argument("--group-size", type=int, default=128, help="weights per scale along in_features; -1: per row")
    q.add_argument("--scale-mode", default="absmean", choices=["absmean", "learned", "guarded"])
    q.add_argument("--guard-band", type=float, nargs=2, default=(0.5, 1.5), metavar=("LOW", "HIGH"),
                   help="guarded: scale kept within [LOW, HIGH] x the group's current absmean")
    q.add_argument("--scale-lr-mult", type=float, default=1.0, help="lr multiplier of the learned scales")
    q.add_argument("--lam-warmup", type=int, default=0, help="steps of quantization warm-up w + lam (q(w) - w)")
    q.add_argument("--tau", type=float, default=1.0, help="distillation temperature")
    q.add_argument("--alpha-ce", type=float, default=0.0, help="weight of the cross-entropy on the data")
    q.add_argument("--beta-hidden", type=float, default=0.0, help="weight of per-block hidden-state matching")
    q.add_argument("--on-collapse", default="warn", choices=["warn", "guard", "stop"])
    q.add_argument("--collapse-threshold", type=float, default=0.6, help="zero ratio that counts as collapse")
    q.add_argument("--monitor-every", type=int, default=10, help="steps between zero-ratio measurements")
    q.add_argument("--final-eval-batches", type=int, default=16)
    _add_train_args(p, tokens=250_000, lr=2e-3)
    p.set_defaults(weight_decay=0.0, eval_every=50, save_every=50)

    p = sub.add_parser("ptq", help="post-training ternarization (no training) + post-hoc corrections",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default=None, help="full-precision model (default: the bundled teacher)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--data", nargs="+", default=None, help="calibration text (default: bundled books)")
    p.add_argument("--eval-data", nargs="+", default=None, help="held-out text (default: bundled held-out book)")
    p.add_argument("--out", default=None, help="write the student folder + summary.json here")
    p.add_argument("--correct", nargs="*", default=[], choices=["bias", "lowrank", "qep"],
                   help="post-hoc corrections, applied layer by layer in this order: qep, lowrank, bias")
    p.add_argument("--rank", type=int, default=8, help="rank of the low-rank correction")
    p.add_argument("--plain-svd", action="store_true", help="low-rank: plain SVD of W - Q (default: "
                   "activation-weighted)")
    p.add_argument("--qep-alpha", type=float, default=1.0, help="QEP: strength of the propagation correction")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--calib-seqs", type=int, default=32, help="calibration windows of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-batches", type=int, default=16, help="held-out batches of 8 windows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)

    p = sub.add_parser("experiment", help="reproducible experiments (claims: PTQ/corrections vs QAT+KD vs scratch)")
    esub = p.add_subparsers(dest="exp_command", metavar="WHICH")
    e = esub.add_parser("claims", help="the paper's claims on one teacher: table + plots (resumable)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--teacher", default=None, help="full-precision model (default: the bundled teacher)")
    e.add_argument("--data", nargs="+", default=None, help="training / calibration text (default: bundled books)")
    e.add_argument("--eval-data", nargs="+", default=None, help="held-out text (default: bundled held-out book)")
    e.add_argument("--tokens", type=int, default=500_000, help="training tokens of every QAT / scratch run")
    e.add_argument("--out", default="runs/claims", help="experiment folder (re-run the command to resume)")
    e.add_argument("--skip", nargs="*", default=[], help="training runs to leave out (e.g. qat-learned-lr10 scratch-fp)")
    e.add_argument("--group-size", type=int, default=128, help="weights per scale, every ternary model")
    e.add_argument("--positions", type=int, default=512, help="sequence length of the recurrence analysis")
    e.add_argument("--sequences", type=int, default=8, help="held-out sequences of the recurrence analysis")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=None)

    p = sub.add_parser("export", help="pack a QAT student (or PTQ a full-precision model) into tq2/tq1, or GGUF")
    p.add_argument("model", help="QAT run folder, student folder, or full-precision model")
    p.add_argument("--format", default="tq2", choices=["tq2", "tq1", "gguf"],
                   help="tq2: 2 bits/weight; tq1: 1.6; gguf: one .gguf file for llama.cpp")
    p.add_argument("--gguf-type", default="tq2_0", choices=["tq2_0", "tq1_0", "f16", "f32"],
                   help="GGUF type of the ternary projections (tq*_0 need groups of 256; f16 is exact for any)")
    p.add_argument("--out", required=True, help="output folder (tq2/tq1) or .gguf file")
    p.add_argument("--other-dtype", default="fp16", choices=["fp16", "fp32"], help="dtype of non-ternary tensors")
    p.add_argument("--group-size", type=int, default=None,
                   help="for PTQ of a full-precision model (default 128; 256 for GGUF tq types)")

    p = sub.add_parser("generate", help="generate text (FP checkpoints, QAT runs and packed folders alike)")
    p.add_argument("model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--int8-head", action="store_true", help="8-bit output head (4x less to read per token)")
    p.add_argument("--a8", action="store_true", help="packed models: int8 activations in the ternary GEMV "
                   "(faster decode, not bit-exact; groups of 128k)")
    p.add_argument("--threads", type=int, default=None)

    p = sub.add_parser("eval", help="zero-shot tasks (lm-eval prompts) from local files, models side by side")
    p.add_argument("models", nargs="+", help="model / run / packed folders")
    p.add_argument("--tasks", default="all", help="comma-separated: boolq,piqa,hellaswag,winogrande,arc_easy,"
                   "arc_challenge,openbookqa,lambada_openai (default: all)")
    p.add_argument("--data-dir", default="../shared/data/evals", help="folder with the task files")
    p.add_argument("--limit", type=int, default=None, help="first N documents per task")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=1024, help="context length (tokens) for scoring")
    p.add_argument("--out", default=None, help="write results JSON here (+ a .md table beside it)")
    p.add_argument("--harness", action="store_true", help="score with lm-evaluation-harness itself (offline task "
                   "YAMLs generated for the local files) instead of the built-in evaluator")
    p.add_argument("--threads", type=int, default=None)

    p = sub.add_parser("report", help="(re)generate report.md with plots for a run folder")
    p.add_argument("run")

    p = sub.add_parser("lm-eval", help="lm-evaluation-harness's CLI with the ternary-mamba model type registered",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)

    p = sub.add_parser("ppl", help="perplexity and bits per byte on held-out text")
    p.add_argument("models", nargs="+")
    p.add_argument("--text", nargs="+", required=True, help="text files or folders")
    p.add_argument("--seq-len", type=int, default=1024, help="context length of each scored window")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    p.add_argument("--int8-head", action="store_true", help="also score with the 8-bit inference head")
    p.add_argument("--threads", type=int, default=None)

    p = sub.add_parser("bench", help="speed benchmarks (ratios against a reference measured in the same run)")
    bsub = p.add_subparsers(dest="bench_command", metavar="WHAT")
    b = bsub.add_parser("model", help="training / prefill / decode of our Mamba-2 vs transformers'")
    b.add_argument("--skip-130m", action="store_true", help="only the training benchmark")
    b.add_argument("--profile", action="store_true", help="also: where a training step's time goes (torch.profiler)")
    b.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every measurement (each keeps its best)")
    b.add_argument("--json", default=None, help="also write the results here")
    b.add_argument("--threads", type=int, default=2)

    b = bsub.add_parser("qat", help="cost of a QAT+KD step relative to a plain training step")
    b.add_argument("--config", default="teacher-8k")
    b.add_argument("--scale-mode", default="absmean", choices=["absmean", "learned", "guarded"])
    b.add_argument("--threads", type=int, default=2)

    for what, n, tok_help in (("decode", 160, "tokens decoded per variant, spread over the rounds"),
                              ("prefill", 512, "prompt length")):
        b = bsub.add_parser(what, help=f"{what} tokens/s: dense fp32 vs packed ternary with our runtime")
        b.add_argument("--models", nargs="+", default=["mamba2-130m"], help="presets (random weights) or FP model folders")
        b.add_argument("--tokens", type=int, default=n, help=f"{tok_help} (default %(default)s)")
        b.add_argument("--rounds", type=int, default=5,
                       help="interleaved rounds over all variants; each variant's best round counts (default 5)")
        b.add_argument("--threads", type=int, default=2)
        b.set_defaults(what=what)

    p = sub.add_parser("parity", help="our model vs transformers' Mamba2ForCausalLM on the same weights (max abs "
                       "logit differences; needs transformers)")
    p.add_argument("--seqlen", type=int, default=100, help="tokens per sequence (default %(default)s)")

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tok_command", metavar="ACTION")
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer")
    t.add_argument("--data", nargs="+", required=True)
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--out", required=True)
    return parser


def cmd_info(args) -> None:
    from pathlib import Path
    from .config import PRESETS, Mamba2Config
    from .info import format_info
    if args.path in PRESETS:
        print(format_info(Mamba2Config(**PRESETS[args.path]), args.path))
        return
    p = Path(args.path)
    from .checkpoint import config_from_json, resolve_model_dir
    if p.is_file():
        print(format_info(config_from_json(p), str(p)))
        return
    from .export import format_size_table, packed_info, resolve_student_dir
    folder = resolve_student_dir(args.path)
    if (folder / "config.json").exists():
        import json
        meta = json.loads((folder / "config.json").read_text())
        if meta.get("format") == "ternary-mamba-packed" and (folder / "model.safetensors").exists():
            print(format_info(config_from_json(folder / "config.json"), str(folder)))
            print(packed_info(folder))
            return
        cfg = config_from_json(folder / "config.json")
        print(format_info(cfg, str(folder)))
        q = meta.get("quantization")
        print(format_size_table(cfg, q["group_size"] if q else 128))
        return
    from .errors import UserError
    raise UserError(f"{folder}: no config.json")


def cmd_pretrain(args) -> None:
    from .train.pretrain import run_pretrain
    run_pretrain(args)


def cmd_quantize(args) -> None:
    from .train.quantize import run_quantize
    run_quantize(args)


def cmd_ptq(args) -> None:
    from .ptq import run_ptq
    run_ptq(args)


def cmd_experiment(args) -> None:
    from .errors import UserError
    if args.exp_command != "claims":
        raise UserError("usage: ternary-mamba experiment claims [--tokens N] [--out DIR]")
    from .experiment.claims import run_claims
    run_claims(args)


def cmd_export(args) -> None:
    from .export import run_export
    run_export(args)


def cmd_generate(args) -> None:
    from .generate import run_generate
    run_generate(args)


def cmd_eval(args) -> None:
    from .eval.evaluate import run_eval
    run_eval(args)


def cmd_report(args) -> None:
    from .report import run_report
    run_report(args)


def cmd_lm_eval(args) -> None:
    from .eval.lm_eval_main import main as lm_eval_main
    lm_eval_main(args.rest)


def cmd_ppl(args) -> None:
    from .eval.perplexity import run_ppl
    run_ppl(args)


def cmd_bench(args) -> None:
    from .errors import UserError
    if args.bench_command == "model":
        from .bench import run_bench_model
        return run_bench_model(args)
    if args.bench_command == "qat":
        from .bench import run_bench_qat
        return run_bench_qat(args)
    if args.bench_command in ("decode", "prefill"):
        from .bench_runtime import run_bench_runtime
        return run_bench_runtime(args)
    raise UserError("usage: ternary-mamba bench {model,qat,decode,prefill}")


def cmd_parity(args) -> None:
    from .parity import run_parity
    run_parity(args)


def cmd_tokenizer(args) -> None:
    from pathlib import Path
    from .errors import UserError
    if args.tok_command != "train":
        raise UserError("usage: ternary-mamba tokenizer train --data PATH... --vocab-size N --out tokenizer.json")
    from .tokenizer import train_bpe_tokenizer
    from .train.data import find_text_files
    out = Path(args.out)
    if out.exists():
        raise UserError(f"{out}: already exists; choose another --out")
    if args.vocab_size < 300:
        raise UserError("--vocab-size must be at least 300 (256 bytes + merges)")
    tok = train_bpe_tokenizer(find_text_files(args.data), args.vocab_size, out)
    sample = "It was the best of times."
    print(f"wrote {out}: {tok.vocab_size} tokens; {sample!r} -> {len(tok.encode(sample))} tokens")


COMMANDS = {"info": cmd_info, "pretrain": cmd_pretrain, "quantize": cmd_quantize, "tokenizer": cmd_tokenizer,
            "bench": cmd_bench, "ptq": cmd_ptq, "experiment": cmd_experiment, "export": cmd_export, "generate": cmd_generate,
            "eval": cmd_eval, "ppl": cmd_ppl, "lm-eval": cmd_lm_eval,
            "report": cmd_report, "parity": cmd_parity}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    threads = getattr(args, "threads", None)
    from .errors import UserError
    try:
        import torch

        from .runtime import keep_freed_memory
        keep_freed_memory()   # no page faults on every step's fresh activations (see runtime.py)
        if threads:
            torch.set_num_threads(threads)
        if args.command in ("pretrain", "quantize"):
            from .train.distributed import init_if_launched, is_main
            init_if_launched()
            if not is_main():  # rank 0 alone prints
                sys.stdout = open(os.devnull, "w")
        COMMANDS[args.command](args)
    except UserError as e:
        print(f"ternary-mamba {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ternary-mamba {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
