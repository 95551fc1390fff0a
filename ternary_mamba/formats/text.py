"""Text corpora on disk: finding the text files under the paths a user gives, and reading documents
(.jsonl: one "text" field per line; anything else: the file is one document), strictly UTF-8."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError

TEXT_SUFFIXES = {".txt", ".md", ".text", ".jsonl"}


def find_text_files(paths: list[str | os.PathLike]) -> list[Path]:
    """The corpus files under `paths` (files, or folders searched recursively), sorted within each folder."""
    from .datasets import TABLE_SUFFIXES
    suffixes = TEXT_SUFFIXES | TABLE_SUFFIXES
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
            if not found:
                raise UserError(f"{p}: no text files ({', '.join(sorted(suffixes))}) in this folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p}: no such file or folder")
    return files


def iter_documents(path: Path):
    """Documents of one corpus file: parquet / arrow tables stream their `text` column; text files as below."""
    from .datasets import TABLE_SUFFIXES, table_documents
    if path.suffix in TABLE_SUFFIXES:
        return table_documents(path)
    return iter(read_documents(path))


def read_documents(path: Path) -> list[str]:
    """A .jsonl file gives one document per line (its "text" field); any other file is one document.
    Files that are not UTF-8 text are rejected, naming the file."""
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise UserError(f"{path}: looks binary (NUL bytes), not a text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); convert it or leave it out") from None
    if path.suffix != ".jsonl":
        return [text] if text.strip() else []
    docs = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError, IndexError, RecursionError):
            raise UserError(f"{path}:{i}: expected a JSON object with a \"text\" field") from None
        if not isinstance(doc, str):
            raise UserError(f"{path}:{i}: \"text\" must be a string, got {type(doc).__name__}")
        docs.append(doc)
    return docs
