"""Typed configs of the smaller commands (info, push, report, parity, tokenizer train): as for the training
commands, the CLI's flags are made from these fields and the Python API takes the same objects."""
from __future__ import annotations

from dataclasses import dataclass

from ..config_base import Config, option
from ..spec import DECODE_MODES
from .configs import DTYPE_NAMES


@dataclass
class InfoConfig(Config):
    path: str | None = option(None, positional=True, required=True,
                              help="model folder, run folder, packed folder, .gguf file, config.json, preset or hub id")


@dataclass
class PushConfig(Config):
    folder: str | None = option(None, positional=True, required=True, help="packed, hf, student or run folder")
    repo_id: str | None = option(None, positional=True, required=True, help="OWNER/NAME on the hub")
    dry_run: bool = option(False, help="list what would be uploaded and print the card (nothing is written)")
    private: bool = option(False, help="create the repository private")


@dataclass
class ReportConfig(Config):
    run: str | None = option(None, positional=True, required=True, help="the run folder")


@dataclass
class ParityConfig(Config):
    seq_len: int = option(100, help="tokens per sequence")
    device: str = option("cpu", help="cpu, cuda or cuda:N")
    dtype: str = option("fp32", choices=DTYPE_NAMES, help="autocast precision of both models (fp32: the exactness "
                        "check)")

    def __post_init__(self):
        if self.seq_len < 1:
            from ..errors import UserError
            raise UserError(f"--seq-len {self.seq_len}: must be >= 1")


@dataclass
class TokenizerTrainConfig(Config):
    data: list[str] | None = option(None, required=True, help="text / jsonl / parquet files or folders")
    vocab_size: int = option(8192, help="tokens, <|endoftext|> included")
    out: str | None = option(None, required=True, help="the tokenizer.json to write")


@dataclass
class ServeConfig(Config):
    model: str | None = option(None, positional=True, required=True,
                               help="model / run / packed folder, .gguf file or hub id")
    host: str = option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    port: int = option(8080, help="TCP port (0: any free one, printed)")
    tokenizer: str | None = option(None, help="tokenizer.json (default: the model's)")
    max_tokens_limit: int = option(2048, help="the most tokens one request may generate")
    max_batch: int = option(8, help="requests decoded together (one decode step advances all of them)")
    max_queue: int = option(64, help="requests that may wait for a place in the batch (more: HTTP 503)")
    int8_head: bool = option(False, help="8-bit output head (faster decoding; logits change slightly)")
    a8: bool = option(False, help="packed models: int8 activations (faster, not bit-exact)")
    mode: str = option("auto", choices=("auto", *DECODE_MODES), help="packed models: decode mode; auto: the fastest "
                       "whose quality cost recorded at export is within the stated thresholds (printed), else exact")
    exact: bool = option(False, help="the exact decode path: fp32 activations, the stored head, an fp32 state (= --mode exact)")
    device: str | None = option(None, help="cpu, cuda or cuda:N (default: cuda when available)")
    threads: int | None = option(None, help="CPU threads of torch and the C kernels")

    def __post_init__(self):
        from ..errors import UserError
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port {self.port}: must be in 0..65535")
        if self.max_tokens_limit < 1:
            raise UserError("--max-tokens-limit must be >= 1")
        from ..spec import DECODE_MAX_BATCH
        if (self.exact or self.int8_head or self.a8) and self.mode not in ("auto", "exact") \
                or self.exact and (self.int8_head or self.a8):
            raise UserError("--exact, --mode and --int8-head / --a8 each set the decode mode: choose one")
        if not 1 <= self.max_batch <= DECODE_MAX_BATCH:
            raise UserError(f"--max-batch {self.max_batch}: must be in 1..{DECODE_MAX_BATCH}")
        if not 1 <= self.max_queue <= 1 << 16:
            raise UserError(f"--max-queue {self.max_queue}: must be in 1..65536")
        if self.threads is not None and self.threads < 1:
            raise UserError("--threads must be >= 1")
