"""`ternary-mamba tokenizer train`: a byte-level BPE tokenizer from text files."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..formats.tokenizer import train_bpe_tokenizer
from ..formats.text import find_text_files
from .flags import require
from ..log import say


def train_tokenizer(data: list[str], vocab_size: int, out: str) -> Path:
    out_p = Path(out)
    if out_p.exists():
        raise UserError(f"{out_p}: already exists; choose another --out")
    if vocab_size < 300:
        raise UserError("--vocab-size must be at least 300 (256 bytes + merges)")
    tok = train_bpe_tokenizer(find_text_files(data), vocab_size, out_p)
    sample = "It was the best of times."
    say(f"wrote {out_p}: {tok.vocab_size} tokens; {sample!r} -> {len(tok.encode(sample))} tokens")
    return out_p


def train_tokenizer_command(cfg) -> Path:
    """`ternary-mamba tokenizer train` over its typed config (commands.tool_configs.TokenizerTrainConfig)."""
    require(cfg, "data", "out", command="tokenizer train")
    return train_tokenizer(cfg.data, cfg.vocab_size, cfg.out)
