"""Crash-safe file writing and strict JSON reading, shared by every writer of the package."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .. import faults
from ..errors import UserError


MAX_JSON_BYTES = 64 << 20     # configs, headers, records: far below this; a bigger "JSON" file is not ours


def read_json(path: Path) -> dict:
    """A JSON object from a file we did not necessarily write: bounded in size and nesting, one line on failure."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise UserError(f"{path}: {path.stat().st_size / 1e6:.0f} MB, more than any JSON file of ours "
                            f"({MAX_JSON_BYTES >> 20} MB)")
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, not a JSON file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _fsync_path(p: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk (a rename is durable only after its folder is)."""
    try:
        fd = os.open(str(p), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def aside_path(out: Path) -> Path:
    """Where the previous version of `out` waits while the new one is renamed in."""
    return Path(out).with_name(f".{Path(out).name}.old")


def recover(out: Path) -> None:
    """Undo an interrupted replacement: if `out` is missing but its previous version is set aside, put it back."""
    out, old = Path(out), aside_path(out)
    if not out.exists() and old.exists():
        try:
            os.replace(old, out)
        except FileNotFoundError:      # another process (rank) put it back first
            return
        _fsync_path(out.parent)


def remove_stale_temps(out: Path) -> int:
    """Remove what a killed `atomic_dir(out)` left: its `.NAME.tmp*` siblings (a whole checkpoint, maybe).  Call it
    only where no other process can be writing `out` now (a run folder its lock holds).  Returns how many."""
    out = Path(out)
    n = 0
    for p in out.parent.glob(f".{out.name}.tmp*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


def shared_temp(out: Path) -> Path:
    """The temporary sibling that several processes write into (a sharded checkpoint: every rank its file) before
    one of them commits it with `commit_dir`; a `.NAME.tmp*` name, so `remove_stale_temps` clears what a killed
    save left."""
    out = Path(out)
    return out.parent / f".{out.name}.tmp-shared"


def atomic_dir(out: Path, overwrite: bool = False):
    """Context manager: yields a temporary sibling folder, renamed onto `out` only on success.  Replacing an
    existing `out` renames it aside, renames the new one in, then deletes the old one: at every instant one
    complete version exists under `out` or aside (`recover` puts an aside one back).  Files are fsynced before
    the renames; permissions follow the umask."""
    @contextlib.contextmanager
    def _ctx():
        out_p = Path(out)
        recover(out_p)
        if out_p.exists() and not overwrite:
            raise UserError(f"{out_p}: already exists; choose another output folder")
        if out_p.exists() and not out_p.is_dir():
            raise UserError(f"{out_p}: exists and is a file; choose another output folder")
        out_p.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_p.name}.tmp", dir=out_p.parent))
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)
        done = False
        try:
            try:
                yield tmp
            except OSError as e:   # name the file as the user knows it, not its temporary folder (gone next)
                if e.filename is not None and str(e.filename).startswith(str(tmp)):
                    raise OSError(e.errno, e.strerror, str(out_p) + str(e.filename)[len(str(tmp)):]) from None
                raise
            commit_dir(tmp, out_p)
            done = True
        finally:
            if not done and tmp.exists():       # the incomplete new version; the previous one is untouched
                shutil.rmtree(tmp, ignore_errors=True)
    return _ctx()


def commit_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` in place of `out` (see `atomic_dir`): fsync, previous version aside, the new
    one in, then the previous one deleted.  On failure `tmp` stays for the caller to remove."""
    mask = _umask()
    for f in tmp.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)
        _fsync_path(f)
    _fsync_path(tmp)
    old = aside_path(out)
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)                    # 1. the previous version aside (still complete)
        faults.point("swap")
    os.replace(tmp, out)                        # 2. the new one in
    _fsync_path(out.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)  # 3. only now is the previous version deleted


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file by write-to-temporary, fsync, rename (the parent folder is created if needed)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_path(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, with its I/O failures (a full disk, say) raised as the OSError they are, so the CLI
    reports them in one line like every other OS error."""
    import errno as _errno

    from safetensors.torch import save_file
    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:  # noqa: BLE001 - SafetensorError wraps the OS error in its message
        m = re.search(r"os error (\d+)", str(e))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code) if code in _errno.errorcode else str(e), str(path)) from None
