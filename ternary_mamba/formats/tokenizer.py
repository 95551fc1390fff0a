"""Tokenizers: any Hugging Face `tokenizer.json` through the `tokenizers` library."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from .fs import atomic_write_bytes


class Tokenizer:
    """Thin wrapper: encode/decode plus the ids the trainer needs (end-of-text separator)."""

    def __init__(self, tok, path: Path):
        self._tok, self.path = tok, path
        self.vocab_size = tok.get_vocab_size()
        self.eos_id = next((tok.token_to_id(t) for t in ("<|endoftext|>", "</s>", "<eos>")
                            if tok.token_to_id(t) is not None), None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> Path:
        """Write it as a tokenizer.json (e.g. the tokenizer embedded in a GGUF file)."""
        atomic_write_bytes(Path(path), self._tok.to_str().encode())
        return Path(path)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer.json file, or a folder holding one (a .gguf file's: `runtime.load.load_tokenizer`)."""
    from tokenizers import Tokenizer as HFTokenizer
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.exists():
        raise UserError(f"{p}: tokenizer file not found")
    try:
        tok = HFTokenizer.from_file(str(p))
    except Exception as e:
        raise UserError(f"{p}: not a tokenizers JSON file ({str(e).splitlines()[0][:120]})") from None
    return Tokenizer(tok, p)


def train_bpe_tokenizer(files: list[Path], vocab_size: int, out: Path) -> Tokenizer:
    """Byte-level BPE (GPT-2/NeoX style) trained on text files, with <|endoftext|> as id 0.  The files are read
    as documents first (binary or non-UTF-8 files are refused, naming them), and an empty corpus is an error."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    from .text import iter_documents

    def docs():
        for f in files:
            yield from iter_documents(Path(f))
    chars = sum(len(d) for d in docs())            # validates every file before any training
    if chars < 1000:
        raise UserError(f"{', '.join(map(str, files[:3]))}: {chars} characters of text; a tokenizer needs a real "
                        "corpus (at least thousands of characters)")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs(), trainer)
    atomic_write_bytes(out, tok.to_str().encode())
    return Tokenizer(tok, Path(out))


NEOX_TOKENIZER = "EleutherAI/gpt-neox-20b"   # what state-spaces' Mamba / Mamba-2 checkpoints were trained with


def _looks_like_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/")) and not Path(spec).exists()


def _hub_tokenizer(repo: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise UserError(f"{repo}: huggingface_hub is not installed to fetch the tokenizer; pass a local "
                        "tokenizer.json") from None
    try:
        return Path(hf_hub_download(repo, "tokenizer.json"))
    except Exception as e:  # noqa: BLE001 - offline / unknown repo: one line naming the fix
        raise UserError(f"{repo}: could not fetch its tokenizer.json ({type(e).__name__}); pass --tokenizer "
                        "with a local tokenizer.json") from None


def tokenizer_path_for(model_folder: Path, explicit: str | None = None) -> Path:
    """The tokenizer of a model: `explicit` (a tokenizer.json, a folder holding one, or a hub id), else the
    model folder's tokenizer.json, else — for mamba_ssm checkpoints such as state-spaces/mamba2-*, which ship
    none — GPT-NeoX-20B's from the hub.  Fails in one line saying what to pass."""
    if explicit:
        if _looks_like_hub_id(explicit):
            return _hub_tokenizer(explicit)
        p = Path(explicit)
        p = p / "tokenizer.json" if p.is_dir() else p
        if not p.exists():
            raise UserError(f"{p}: tokenizer file not found")
        return p
    own = Path(model_folder) / "tokenizer.json"
    if own.exists():
        return own
    cfg = Path(model_folder) / "config.json"
    if cfg.exists() and '"ssm_cfg"' in cfg.read_text(errors="replace"):
        try:
            return _hub_tokenizer(NEOX_TOKENIZER)
        except UserError:
            raise UserError(f"{model_folder}: a mamba_ssm checkpoint without tokenizer.json: it uses GPT-NeoX-20B's; "
                            f"pass --tokenizer {NEOX_TOKENIZER} (hub) or a local copy of its tokenizer.json") from None
    raise UserError(f"{model_folder}: no tokenizer.json; pass --tokenizer (a tokenizer.json or a hub id)")
