"""Text -> a token file on disk -> fixed-length training sequences in a deterministic, resumable order.

Sources are text / jsonl files, parquet / arrow tables and hub datasets (formats/datasets.py); documents are
tokenized in batches and appended to a flat binary token file (uint16 when the vocabulary
fits), documents separated by the end-of-text id; training reads it through np.memmap, so the corpus is
never held in memory twice.  Token files are cached by a hash of (file paths, sizes, mtimes, tokenizer).
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import UserError
from ..formats.datasets import HubSource, is_hub_source
from ..formats.text import find_text_files, iter_documents

PIECE_CHARS = 1 << 16     # longer documents are encoded in newline-aligned pieces
BATCH_DOCS = 256          # shorter ones in batches of this many

def _cache_key(files: list[Path], hubs: list, tokenizer, max_tokens: int | None) -> str:
    h = hashlib.sha256(Path(tokenizer.path).read_bytes())
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    for src in hubs:
        h.update(f"hub|{src.key}".encode())
    h.update(f"max={max_tokens}".encode())
    return h.hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("TERNARY_MAMBA_CACHE", Path.home() / ".cache" / "ternary-mamba")) / "tokens"


def _documents(files: list[Path], hubs: list) -> Iterator[tuple[str, str]]:
    """(source name, document) in a fixed order: local files first, then hub streams."""
    for f in files:
        for doc in iter_documents(f):
            yield str(f), doc
    for src in hubs:
        for doc in src.documents():
            yield f"hf:{src.name}", doc


class _Progress:
    """Tokenization progress: a live line on a terminal, a plain line every 30 s otherwise (logs, SLURM)."""

    def __init__(self, enabled: bool):
        self.enabled, self.tty, self.t0, self.last = enabled, sys.stderr.isatty(), time.time(), time.time()

    def update(self, docs: int, tokens: int, where: str) -> None:
        now = time.time()
        if not self.enabled or (not self.tty and now - self.last < 30):
            return
        self.last = now
        line = f"tokenizing {where}: {docs:,} documents, {tokens:,} tokens, {tokens / max(now - self.t0, 1e-9):,.0f} tok/s"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)


def tokenize_to_file(paths: list[str | os.PathLike], tokenizer, cache_dir: Path | None = None,
                     verbose: bool = True, max_tokens: int | None = None) -> Path:
    """Tokenize text / parquet / arrow files, folders and hub datasets (`hf:NAME[:SPLIT]`) into a cached .bin
    token file and return its path.  Documents are encoded in batches by the Rust tokenizer (parallel over
    the cores); `max_tokens` stops early, at most one batch of documents past it (what makes a streamed hub
    dataset finite)."""
    hubs = [HubSource.parse(str(p)) for p in paths if is_hub_source(str(p))]
    local = [p for p in paths if not is_hub_source(str(p))]
    files = find_text_files(local) if local else []
    cache_dir = Path(cache_dir or default_cache_dir())
    cache_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    out = cache_dir / f"{_cache_key(files, hubs, tokenizer, max_tokens)}.{np.dtype(dtype).name}.bin"
    if out.exists():
        return out
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    progress = _Progress(verbose)
    try:
        n_docs, n_tokens = _write_tokens(tmp, files, hubs, tokenizer, dtype, max_tokens, progress)
    except BaseException:
        tmp.unlink(missing_ok=True)          # never leave a partial token file in the cache
        raise
    if verbose:
        print(f"{chr(13) if sys.stderr.isatty() else ''}tokenized {len(files) + len(hubs)} sources: {n_docs:,} documents, "
              f"{n_tokens:,} tokens -> {out}", file=sys.stderr)
    if n_tokens == 0:
        tmp.unlink()
        raise UserError(f"{', '.join(map(str, paths))}: no text to train on (all files empty)")
    os.replace(tmp, out)
    return out


def _write_tokens(tmp: Path, files, hubs, tokenizer, dtype, max_tokens, progress) -> tuple[int, int]:
    """Stream every document's tokens (end-of-text after each) into `tmp`; returns (documents, tokens)."""
    n_tokens, n_docs = 0, 0
    sep = tokenizer.eos_id
    pending: list[str] = []

    def flush(f) -> None:
        nonlocal n_tokens, n_docs
        for ids in tokenizer.encode_batch(pending):
            if sep is not None:
                ids.append(sep)
            np.asarray(ids, dtype=dtype).tofile(f)
            n_tokens += len(ids)
            n_docs += 1
        pending.clear()

    with open(tmp, "wb") as f:
        for where, doc in _documents(files, hubs):
            if len(doc) > PIECE_CHARS:      # one long document (a book): its pieces in one parallel batch
                flush(f)
                ids = tokenizer_encode_pieces(tokenizer, doc) + ([sep] if sep is not None else [])
                np.asarray(ids, dtype=dtype).tofile(f)
                n_tokens, n_docs = n_tokens + len(ids), n_docs + 1
            else:
                pending.append(doc)
                if len(pending) >= BATCH_DOCS:
                    flush(f)
            progress.update(n_docs, n_tokens, where)
            if max_tokens is not None and n_tokens >= max_tokens:
                break
        flush(f)
    return n_docs, n_tokens


def tokenizer_encode_pieces(tokenizer, doc: str, piece_chars: int = PIECE_CHARS) -> list[int]:
    """Encode a long document in newline-aligned pieces (parallel in the Rust tokenizer).  Pieces end at
    a newline so no word is split; byte-level BPE merges never cross a newline boundary in practice."""
    pieces, start = [], 0
    while start < len(doc):
        end = min(len(doc), start + piece_chars)
        if end < len(doc):
            nl = doc.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        pieces.append(doc[start:end])
        start = end
    ids: list[int] = []
    for enc in tokenizer.encode_batch(pieces):
        ids += enc
    return ids


def load_tokens(path: Path) -> np.ndarray:
    dtype = np.uint16 if ".uint16." in path.name else np.uint32
    return np.memmap(path, dtype=dtype, mode="r")


@dataclass
class PackedSequences:
    """A token stream cut into non-overlapping windows of seq_len+1 tokens (inputs + shifted targets)."""
    tokens: np.ndarray
    seq_len: int
    start: int = 0          # window range [start, stop) — used for the train / held-out split
    stop: int | None = None

    def __post_init__(self):
        total = (len(self.tokens) - 1) // self.seq_len
        self.stop = total if self.stop is None else self.stop
        if self.stop - self.start < 1:
            raise UserError(f"data: {len(self.tokens):,} tokens is less than one sequence of {self.seq_len}")

    def __len__(self) -> int:
        return self.stop - self.start

    def window(self, i: int) -> torch.Tensor:
        s = (self.start + i) * self.seq_len
        return torch.from_numpy(self.tokens[s:s + self.seq_len + 1].astype(np.int64))

    def batch(self, indices) -> torch.Tensor:
        return torch.stack([self.window(int(i)) for i in indices])


def split_heldout(tokens: np.ndarray, seq_len: int, heldout_fraction: float) -> tuple[PackedSequences, PackedSequences]:
    """The last `heldout_fraction` of windows (at least one) is held out; the rest is training data."""
    full = PackedSequences(tokens, seq_len)
    n_held = max(1, int(len(full) * heldout_fraction))
    if len(full) - n_held < 1:
        raise UserError(f"data: only {len(full)} sequences of {seq_len} tokens; need at least 2 to split off held-out data")
    return PackedSequences(tokens, seq_len, 0, len(full) - n_held), PackedSequences(tokens, seq_len, len(full) - n_held, len(full))


def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0, world: int = 1,
                  accum: int = 1, micro: int = 0) -> np.ndarray:
    """Window indices of one rank's micro-batch `micro` of optimizer step `step`: a fresh seeded permutation every
    epoch, cut into global batches of batch_size x world x accum windows.  A step's windows are a pure function of
    (seed, step, global batch), whatever the world size and accumulation that share them out, so a run resumes
    exactly, and resumes at another world size when the global batch stays the same."""
    global_bs = batch_size * world * accum
    per_epoch = max(1, n // global_bs)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    idx = perm[k * global_bs:(k + 1) * global_bs]
    if len(idx) < global_bs:  # fewer windows than one global batch: wrap around
        idx = np.resize(perm, global_bs)
    j = micro * world + rank
    return idx[j * batch_size:(j + 1) * batch_size]
