"""Crash-safe file writing and strict JSON reading, shared by every writer of the package."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def atomic_dir(out: Path, overwrite: bool = False):
    """Context manager: yields a temporary sibling folder, renamed onto `out` only on success."""
    @contextlib.contextmanager
    def _ctx():
        out_p = Path(out)
        if out_p.exists() and not overwrite:
            raise UserError(f"{out_p}: already exists; choose another output folder")
        out_p.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_p.name}.", dir=out_p.parent))
        os.chmod(tmp, 0o755)
        try:
            yield tmp
            for f in tmp.rglob("*"):
                os.chmod(f, 0o755 if f.is_dir() else 0o644)
            if out_p.exists():
                shutil.rmtree(out_p)
            os.replace(tmp, out_p)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return _ctx()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)




def write_json_atomic(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())
