"""Typed configs of the shipped benchmarks (`ternary-mamba bench model|qat|gpu|decode|prefill`)."""
from __future__ import annotations

from dataclasses import dataclass

from ..config_base import Config, option
from ..errors import UserError
from ..spec import SCALE_MODES


def _at_least_one(cfg, *names):
    for n in names:
        v = getattr(cfg, n)
        if v is not None and v < 1:
            raise UserError(f"--{n.replace('_', '-')} {v}: must be >= 1")


@dataclass
class BenchModelConfig(Config):
    skip_130m: bool = option(False, help="only the training benchmark")
    profile: bool = option(False, help="also: where a training step's time goes (torch.profiler)")
    rounds: int = option(3, help="interleaved rounds of every measurement (each keeps its best)")
    json: str | None = option(None, help="also write the results here")
    threads: int = option(2, help="CPU threads of torch and the C kernels")

    def __post_init__(self):
        _at_least_one(self, "rounds", "threads")


@dataclass
class BenchQatConfig(Config):
    model: str = option("teacher-8k", flag="--model-config", help="model preset")
    scale_mode: str = option("absmean", choices=SCALE_MODES, help="scale mode of the QAT+KD step")
    threads: int = option(2, help="CPU threads of torch and the C kernels")

    def __post_init__(self):
        _at_least_one(self, "threads")


@dataclass
class BenchGpuConfig(Config):
    models: list[str] = option(default_factory=lambda: ["mamba2-130m", "mamba2-1.3b"], help="presets (random weights)")
    seq_len: int = option(2048, help="tokens per sequence")
    steps: int = option(4, help="timed steps per setting, after 2 warm-up steps")
    profile: bool = option(False, help="also: where the last setting's step spends GPU time")
    chunk_size: int | None = option(None, help="the scan's chunk length instead of the preset's (the same function "
                                    "of the inputs; a speed knob of the PyTorch scan)")
    json: str | None = option(None, help="also write the results here")

    def __post_init__(self):
        _at_least_one(self, "seq_len", "steps", "chunk_size")


@dataclass
class _BenchRuntimeConfig(Config):
    models: list[str] = option(default_factory=lambda: ["mamba2-130m"], help="presets (random weights) or FP model "
                               "folders")
    tokens: int = option(160, help="tokens decoded per variant, spread over the rounds")
    rounds: int = option(5, help="interleaved rounds over all variants; each variant's best round counts")
    threads: int = option(2, help="CPU threads of torch and the C kernels")

    def __post_init__(self):
        _at_least_one(self, "tokens", "rounds", "threads")


@dataclass
class BenchDecodeConfig(_BenchRuntimeConfig):
    quality_tokens: int = option(64, help="teacher-forced tokens on which each mode's KL and top-1 agreement to "
                                 "the exact tq2 path are measured (0: skip)")
    agreement: int = option(0, help="also generate this many greedy tokens with the fast mode's bf16 SSM state and "
                            "with an fp32 state, and report the share of positions that agree (e.g. 2048)")
    what = "decode"

    def __post_init__(self):
        super().__post_init__()
        if self.quality_tokens < 0 or self.agreement < 0:
            raise UserError("--quality-tokens and --agreement must be >= 0")


@dataclass
class BenchPrefillConfig(_BenchRuntimeConfig):
    tokens: int = option(512, help="prompt length")
    what = "prefill"


@dataclass
class BenchOpsConfig(Config):
    model: str = option("mamba2-1.3b", flag="--model-config", help="model preset whose shapes the ops see")
    device: str = option("cpu", help="cpu, cuda or cuda:N")
    batch_size: int = option(1, help="sequences")
    seq_len: int = option(512, help="tokens per sequence")
    chunk_size: int | None = option(None, help="the scan's chunk length instead of the preset's")
    rounds: int = option(3, help="timed repetitions (each figure is the best)")
    json: str | None = option(None, help="also write the results here")

    def __post_init__(self):
        _at_least_one(self, "batch_size", "seq_len", "chunk_size", "rounds")


@dataclass
class BenchServeConfig(Config):
    model: str | None = option(None, help="model to serve (default: the bundled teacher, absmean PTQ, packed tq2 in "
                               "a temporary folder: what serving a shipped ternary model runs)")
    clients: list[int] = option(default_factory=lambda: [1, 4, 16], help="concurrent clients, one load level each")
    requests: int = option(3, help="requests each client sends, one after the other")
    max_tokens: int = option(64, help="tokens each request generates (sampled, temperature 1: no early stop)")
    threads: int = option(2, help="CPU threads of torch and the C kernels")
    json: str | None = option(None, help="also write the results here")

    def __post_init__(self):
        _at_least_one(self, "requests", "max_tokens", "threads")
        if not self.clients or min(self.clients) < 1 or max(self.clients) > 64:
            raise UserError(f"--clients {self.clients}: each level must be in 1..64")
