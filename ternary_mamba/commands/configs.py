"""Each command's settings as one typed config: the CLI's flags are made from these fields (commands/flags.py),
`--config FILE` loads them from JSON / YAML (a run's run.json replays the run), and the Python API takes them
directly (`ternary_mamba.quantize(QuantizeConfig(...))`).  No torch here."""
from __future__ import annotations

from dataclasses import dataclass

from ..config_base import Config, option
from ..errors import UserError
from ..formats.configs import GGUF_TYPES
from ..quant.config import SCALE_MODES, MonitorConfig, TernaryConfig
from ..spec import DECODE_MODES, DEFAULT_GROUP_SIZE, GGUF_TQ_BLOCK, GPUS, PACKINGS, TABLE_FORMATS, check_chunk_size
from ..train.config import DistillConfig, TrainConfig
from ..log import say

CORRECTIONS = ("bias", "lowrank", "qep", "gptq")
DTYPE_NAMES = ("fp32", "bf16", "fp16")   # ops/device.py maps them to torch dtypes
EVAL_TASKS = "boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,lambada_openai"


def _positive(cfg, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if v is not None and v < 1:
            raise UserError(f"--{n.replace('_', '-')} must be >= 1, got {v}")
        if n == "chunk_size" and v is not None:
            check_chunk_size(v, "--chunk-size")


def _threads():
    return option(None, help="CPU threads of torch and the C kernels (default: the idle physical cores; "
                  "generate: 1 for models under 10 M parameters)", resume_free=True)


def _device():
    return option(None, help="cpu, cuda or cuda:N (default: cuda when available, cuda:LOCAL_RANK under torchrun, "
                  "else cpu)", resume_free=True)


def _checkpointing():
    return option(False, help="keep only each block's input for the backward and recompute the rest (~1/3 more "
                  "compute, activations no longer grow with depth)", resume_free=True)


def _log_to():
    return option(("jsonl",), choices=("jsonl", "csv", "tensorboard", "wandb"), resume_free=True,
                  help="metric sinks besides metrics.jsonl (always written): csv, tensorboard, wandb (offline)")


def _dtype():
    return option("fp32", choices=DTYPE_NAMES, help="compute precision: the forward under autocast; master weights "
                  "and optimizer state stay fp32; a teacher is stored in this dtype")


def _train_dtype():
    return option("auto", choices=("auto", *DTYPE_NAMES), help="compute precision: the forward under autocast; master "
                  "weights and optimizer state stay fp32; a teacher is stored in this dtype.  auto: bf16 where the "
                  "hardware has bf16 dot products (CUDA with bf16, CPUs with AVX512-BF16 / AMX: 1.36-1.51x faster "
                  "training on such a CPU), else fp32; the choice is printed and recorded in run.json")


def _check_dtype(cfg) -> None:
    if cfg.dtype not in DTYPE_NAMES and cfg.dtype != "auto":
        raise UserError(f"--dtype {cfg.dtype}: choose one of {', '.join(DTYPE_NAMES)}")


@dataclass
class QuantizeConfig(Config):
    teacher: str | None = option(None, help="teacher folder or hub id (default: the bundled teacher)")
    tokenizer: str | None = option(None, help="tokenizer.json (default: the teacher's)")
    data: list[str] | None = option(None, help="text files / folders / jsonl (default: the bundled books)")
    eval_data: list[str] | None = option(None, help="held-out text (default: the bundled held-out book, or 2%% "
                                         "split off --data)")
    out: str | None = option(None, help="run folder (default: runs/ternary-<teacher>-<time>)", resume_free=True)
    quant: TernaryConfig = option(default_factory=TernaryConfig)
    distill: DistillConfig = option(default_factory=DistillConfig)
    monitor: MonitorConfig = option(default_factory=MonitorConfig)
    train: TrainConfig = option(default_factory=lambda: TrainConfig(tokens=250_000, lr=2e-3, weight_decay=0.0,
                                                                     eval_every=50, save_every=50))
    final_eval_batches: int = option(16, help="held-out batches of the final summary table")
    target: str = option("packed", choices=("packed", "gguf"), help="where the student goes: packed (tq2/tq1, "
                         "any group) or gguf (llama.cpp's TQ types: groups of 256, chosen when left at 128)")
    activation_checkpointing: bool = _checkpointing()
    log_to: tuple[str, ...] = _log_to()
    device: str | None = _device()
    dtype: str = _train_dtype()
    chunk_size: int | None = option(None, help="SSD chunk length (a compute knob; default: the model's)",
                                    resume_free=True)
    threads: int | None = _threads()
    cache_dir: str | None = option(None, help="where tokenized data is cached", resume_free=True)
    resume: bool = option(False, help="continue the run in --out from its last checkpoint", resume_free=True)
    fsdp: bool = option(False, help="under torchrun: shard the student with FSDP2 (parameters, gradients, "
                        "optimizer state) instead of DDP", resume_free=True)

    def __post_init__(self):
        _check_dtype(self)
        _positive(self, "final_eval_batches", "chunk_size", "threads")


@dataclass
class PretrainConfig(Config):
    model: str | None = option(None, flag="--model-config", required=True,
                               help="preset name or JSON file of Mamba2Config fields")
    tokenizer: str | None = option(None, required=True, help="tokenizer.json")
    data: list[str] | None = option(None, required=True, help="text files / folders / jsonl")
    eval_data: list[str] | None = option(None, help="held-out text (default: 1%% split off --data)")
    out: str | None = option(None, required=True, help="run folder", resume_free=True)
    ternary: bool = option(False, help="ternary QAT from random init (the paper's from-scratch control)")
    scale_lr_mult: float = option(1.0, help="--ternary with learned scales: lr multiplier of the scales (as "
                                  "quantize's --scale-lr-mult)")
    quant: TernaryConfig = option(default_factory=TernaryConfig)   # --ternary: as for quantize (learned scales
    # start from the random init's absmean); --dtype bf16 records scale_format bf16 here
    train: TrainConfig = option(default_factory=lambda: TrainConfig(tokens=10_000_000, lr=3e-3))
    activation_checkpointing: bool = _checkpointing()
    log_to: tuple[str, ...] = _log_to()
    device: str | None = _device()
    dtype: str = _train_dtype()
    chunk_size: int | None = option(None, help="SSD chunk length (a compute knob; default: the config's)",
                                    resume_free=True)
    threads: int | None = _threads()
    cache_dir: str | None = option(None, help="where tokenized data is cached", resume_free=True)
    resume: bool = option(False, help="continue the run in --out from its last checkpoint", resume_free=True)
    fsdp: bool = option(False, help="under torchrun: shard the model with FSDP2 instead of DDP", resume_free=True)

    def __post_init__(self):
        _check_dtype(self)
        _positive(self, "chunk_size", "threads")
        if not 0 < self.scale_lr_mult <= 1e4:
            raise UserError(f"--scale-lr-mult {self.scale_lr_mult}: must be in (0, 1e4]")


@dataclass
class PtqConfig(Config):
    teacher: str | None = option(None, help="full-precision model (default: the bundled teacher)")
    tokenizer: str | None = option(None, help="tokenizer.json (default: the teacher's)")
    data: list[str] | None = option(None, help="calibration text (default: the bundled books)")
    eval_data: list[str] | None = option(None, help="held-out text (default: the bundled held-out book)")
    out: str | None = option(None, help="write the student folder + summary.json here")
    correct: tuple[str, ...] = option((), choices=CORRECTIONS, help="post-hoc methods, applied layer by layer "
                                      "in this order: qep, gptq (second-order ternarization), lowrank, bias")
    rank: int = option(8, help="rank of the low-rank correction")
    plain_svd: bool = option(False, help="low-rank: plain SVD of W - Q (default: activation-weighted)")
    qep_alpha: float = option(1.0, help="QEP: strength of the propagation correction")
    group_size: int = option(DEFAULT_GROUP_SIZE, help="weights per scale along in_features; -1: one per row")
    calib_seqs: int = option(32, help="calibration windows of --seq-len tokens")
    seq_len: int = option(256, help="tokens per calibration / held-out window")
    eval_batches: int = option(16, help="held-out batches of 8 windows")
    seed: int = option(0, help="seed of the calibration windows")
    threads: int | None = _threads()

    def __post_init__(self):
        _positive(self, "rank", "calib_seqs", "seq_len", "eval_batches", "threads")


@dataclass
class ExportConfig(Config):
    model: str | None = option(None, positional=True, help="QAT run folder, student folder, or full-precision model")
    format: str = option("tq2", choices=(*PACKINGS, "gguf", "hf"), help="tq2: 2 bits/weight; tq1: 1.6; gguf: one "
                         ".gguf file for llama.cpp; hf: a transformers Mamba2ForCausalLM folder (dequantized)")
    gguf_type: str = option("auto", choices=("auto", *GGUF_TYPES), help="GGUF type of the ternary projections: "
                            "tq2_0 / tq1_0 need groups of a multiple of 256, f16 is exact for any; auto: tq2_0 "
                            "when the groups allow it, else f16")
    out: str | None = option(None, required=True, help="output folder (tq2/tq1) or .gguf file")
    other_dtype: str = option("fp16", choices=("fp16", "fp32"), help="dtype of the non-ternary tensors")
    embedding: str = option("fp16", choices=TABLE_FORMATS, help="tq2/tq1: the tied embedding + head as fp16 (exact), "
                            "int8 per row, or q4 (4 bits per value, a scale per 32; the 1.3B tq1 file 476 -> 328 MB)")
    hf_dtype: str = option("fp16", choices=("fp16", "bf16", "fp32"), help="--format hf: dtype of the weights")
    group_size: int = option(GGUF_TQ_BLOCK, help="for PTQ of a full-precision model, every format (256: what GGUF's "
                             "TQ types hold exactly)")
    cost_tokens: int = option(256, help="tq2/tq1/gguf: held-out tokens on which each faster decode mode's KL and "
                              "top-1 agreement to the exact path are measured and recorded (decode_modes.json, or "
                              "the GGUF's metadata; generate's fast default reads it); 0: skip")
    cost_text: str | None = option(None, help="text file or folder for --cost-tokens (default: the bundled "
                                   "held-out books)")


@dataclass
class GenerateConfig(Config):
    model: str | None = option(None, positional=True, help="model / run / packed folder, .gguf file or hub id")
    prompt: str | None = option(None, required=True, help="the text to continue")
    max_new_tokens: int = option(100, help="tokens to generate")
    temperature: float = option(0.8, help="sampling temperature; 0: greedy")
    top_p: float = option(0.95, help="nucleus sampling: smallest set of tokens with this much probability")
    seed: int = option(0, help="sampling seed")
    tokenizer: str | None = option(None, help="tokenizer.json (default: the model's)")
    int8_head: bool = option(False, help="8-bit output head (4x less to read per token; logits change slightly)")
    a8: bool = option(False, help="packed models: int8 activations in the ternary GEMV (faster decode, not "
                      "bit-exact; groups a multiple of 128)")
    a16: bool = option(False, help="packed models: bf16 activations (the paper's A16) on CPUs with AVX512-BF16, "
                       "decode and prefill (faster, not bit-exact; groups a multiple of 64)")
    mode: str = option("auto", choices=("auto", *DECODE_MODES), help="packed models: decode mode; auto: the fastest "
                       "whose quality cost recorded at export is within the stated thresholds (printed), else exact")
    exact: bool = option(False, help="the exact decode path: fp32 activations, the stored head, an fp32 state (= --mode exact)")
    device: str | None = _device()
    dtype: str = _dtype()
    threads: int | None = _threads()

    def __post_init__(self):
        _check_dtype(self)
        _positive(self, "max_new_tokens", "threads")
        if self.exact and self.mode not in ("auto", "exact"):
            raise UserError(f"--exact and --mode {self.mode}: choose one")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError("--temperature must be >= 0 and --top-p in (0, 1]")


@dataclass
class EvalConfig(Config):
    models: list[str] | None = option(None, positional=True, help="model / run / packed folders")
    tasks: str = option("all", help=f"comma-separated: {EVAL_TASKS} (default: all)")
    data_dir: str | None = option(None, required=True, help="folder with the task files (boolq/, piqa/, ...; "
                                  "lm-eval's JSONL exports)")
    limit: int | None = option(None, help="first N documents per task")
    batch_size: int = option(16, help="sequences scored per forward")
    max_len: int = option(1024, help="context length (tokens) for scoring")
    out: str | None = option(None, help="write results JSON here (+ a .md table beside it)")
    harness: bool = option(False, help="score with lm-evaluation-harness itself (offline task YAMLs generated "
                           "for the local files) instead of the built-in evaluator")
    device: str | None = _device()
    dtype: str = _dtype()
    threads: int | None = _threads()

    def __post_init__(self):
        _check_dtype(self)
        _positive(self, "limit", "batch_size", "max_len", "threads")


@dataclass
class PplConfig(Config):
    models: list[str] | None = option(None, positional=True, help="model / run / packed folders")
    text: list[str] | None = option(None, required=True, help="text files or folders")
    seq_len: int = option(1024, help="context length of each scored window")
    batch_size: int = option(8, help="windows per forward")
    max_tokens: int | None = option(None, help="score at most this many tokens")
    int8_head: bool = option(False, help="also score with the 8-bit inference head")
    quantized_embedding: bool = option(False, help="also score with the tied embedding + head in int8 and in q4, "
                                       "as `export --embedding int8|q4` stores them")
    activations: bool = option(False, help="packed models: also score token by token through the decode GEMVs, "
                               "exact vs int8 (--a8) and bf16 (--a16) activations, with the KL to exact "
                               "(--max-tokens, default 4096)")
    device: str | None = _device()
    dtype: str = _dtype()
    threads: int | None = _threads()

    def __post_init__(self):
        _check_dtype(self)
        _positive(self, "seq_len", "batch_size", "max_tokens", "threads")


@dataclass
class ClaimsConfig(Config):
    teacher: str | None = option(None, help="full-precision model (default: the bundled teacher)")
    data: list[str] | None = option(None, help="training / calibration text (default: the bundled books)")
    eval_data: list[str] | None = option(None, help="primary held-out text (default: the bundled clean held-out "
                                         "books, whose authors and series no training split holds)")
    all_heldout: list[str] | None = option(None, help="a further held-out set reported beside (e.g. all eight "
                                           "held-out books of the Gutenberg corpus's held-out split)")
    tokens: int = option(100_000, help="training tokens of every QAT / scratch run (100 k: the whole experiment "
                         "then fits in < 3 h on 2 cores; raise it where there is time)")
    seeds: int = option(3, help="seeds of every training arm (more can be added to a finished experiment)")
    out: str = option("runs/claims", help="experiment folder (re-run the command to resume)")
    skip: tuple[str, ...] = option((), help="stages to leave out: training arms (e.g. qat-learned-lr30 "
                                   "scratch-fp), control, posthoc")
    group_size: int = option(DEFAULT_GROUP_SIZE, help="weights per scale, every ternary model")
    calib_small: int = option(32, help="calibration windows of 257 tokens, the small budget (8 k tokens)")
    calib_large: int = option(389, help="calibration windows, the large budget (99,973 tokens: at most the QAT "
                              "tokens, so the headline comparison is at equal budget)")
    eval_windows: int = option(128, help="held-out windows of 256 tokens per set, spread over the whole set")
    control_data: list[str] | None = option(None, help="the Transformer control teacher's training text (default: "
                                            "--data; pass the books the Mamba teacher was trained on)")
    control_tokens: int = option(8_000_000, help="training tokens of the Transformer control teacher (the "
                                 "bundled teacher's: 8 M)")
    positions: int = option(256, help="sequence length of the recurrence analysis (the teacher's training length)")
    sequences: int = option(32, help="held-out sequences of the recurrence analysis (its verdict's CI resamples them)")
    publish: str | None = option(None, help="also copy results.md, results.json and the plots to this folder "
                                 "(e.g. docs/claims)")
    readme: str | None = option(None, help="also rewrite the claims section of this README (between the "
                                "<!-- claims:begin --> and <!-- claims:end --> markers), linking to --publish")
    seed: int = option(0, help="the first seed; arms run seeds seed .. seed + seeds - 1")
    device: str | None = _device()
    dtype: str = _dtype()
    threads: int | None = _threads()

    def __post_init__(self):
        _check_dtype(self)
        _positive(self, "positions", "sequences", "threads", "seeds", "calib_small", "calib_large",
                  "eval_windows")
        if self.tokens < 10_000:
            raise UserError(f"--tokens {self.tokens}: too small for a training run (use at least 10000)")
        if self.control_tokens < 10_000:
            raise UserError(f"--control-tokens {self.control_tokens}: too small (use at least 10000)")
        if self.positions < 16:
            raise UserError(f"--positions {self.positions}: use at least 16")


# nominal dense 16-bit tensor-core TFLOP/s and memory (GB) from the vendors' spec sheets
GPU_PEAK_TFLOPS = {k: (g.tensor_tflops, g.memory_gb) for k, g in GPUS.items()}   # (nominal 16-bit TFLOP/s, GB)


@dataclass
class PlanConfig(Config):
    teacher: str = option("mamba2-1.3b", help="preset, model folder, config.json or hub id")
    device: str = option("cuda", help="the device to plan for: cuda (a GPU named by --gpu) or cpu")
    gpu: str = option("h100", choices=tuple(GPU_PEAK_TFLOPS), help="GPU kind (its memory and nominal dense "
                      "16-bit tensor TFLOP/s)")
    dtype: str = option("bf16", choices=DTYPE_NAMES, help="training precision")
    batch_size: int = option(8, help="sequences per micro-batch per GPU")
    seq_len: int = option(2048, help="tokens per sequence")
    nproc: int = option(1, help="GPUs (data-parallel ranks)")
    fsdp: bool = option(False, help="shard student weights, gradients and optimizer state over the ranks")
    activation_checkpointing: bool = _checkpointing()
    group_size: int = option(DEFAULT_GROUP_SIZE, help="ternary group size")
    scale_mode: str = option("guarded", choices=SCALE_MODES, help="scale mode (learned / "
                             "guarded scales are parameters too)")
    tokens: int = option(102_000_000, help="token budget (the paper's: 102 M)")
    mfu: float | None = option(None, help="time from an assumed utilisation (fraction of the nominal peak of the "
                               "planner's FLOPs) instead of the per-op cost model; `bench gpu` measures yours")
    peak_tflops: float | None = option(None, help="override the GPU's nominal TFLOP/s")
    outlook: bool = option(False, help="also predict the step with the scan's products on tensor cores (16-bit "
                           "inputs, fp32 sums) instead of fp32")

    def __post_init__(self):
        _positive(self, "batch_size", "seq_len", "nproc", "tokens")
        _check_dtype(self)
        if self.mfu is not None and not 0 < self.mfu <= 1:          # NaN fails this too
            raise UserError(f"--mfu {self.mfu}: must be in (0, 1]")
        if self.peak_tflops is not None and not 0 < self.peak_tflops <= 1e5:
            raise UserError(f"--peak-tflops {self.peak_tflops}: must be a positive number of TFLOP/s")
        # what a real run can be: the activations of one micro-batch are traced, so bound them before anything
        if self.seq_len > 1 << 20 or self.batch_size > 1 << 16 or self.seq_len * self.batch_size > 1 << 24:
            raise UserError(f"--batch-size {self.batch_size} x --seq-len {self.seq_len}: more tokens per micro-batch "
                            f"than any GPU holds (at most {1 << 24:,}; sequences up to {1 << 20:,})")
        if self.nproc > 1 << 16 or self.tokens > 10 ** 15:
            raise UserError(f"--nproc {self.nproc} / --tokens {self.tokens}: beyond any real run")


def resolve_auto_dtype(cfg):
    """A training config with `dtype: auto` resolved for its device (printed; run.json records the result, so a
    replay or --resume keeps the precision the run started with)."""
    if cfg.dtype != "auto":
        return cfg
    from ..ops.device import auto_dtype, resolve_device
    try:
        device = resolve_device(cfg.device)
    except RuntimeError as e:
        raise UserError(f"--device {cfg.device}: {e}") from None
    name, why = auto_dtype(device)
    say(f"--dtype auto: {why}")
    return cfg.replace(dtype=name)
