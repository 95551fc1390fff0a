"""Typed configs of the smaller commands (info, push, report, parity, tokenizer train): as for the training
commands, the CLI's flags are made from these fields and the Python API takes the same objects."""
from __future__ import annotations

from dataclasses import dataclass

from ..config_base import Config, option
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
