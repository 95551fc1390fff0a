"""Where a model is: the folder, run folder, bundled name, GGUF file or hub id a user hands us, resolved to a path
(the reading itself is formats' other modules; building the model is `runtime.load.load_model`)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError

RUN_MODEL_DIRS = ("student", "model")   # where quantize / ptq and pretrain put a run's finished model


BUNDLED_NAMES = ("bundled", "teacher")    # the teacher shipped in ternary_mamba/assets, by name


def resolve_model_dir(path_or_id: str | os.PathLike) -> Path:
    """A local folder, the bundled teacher by name (`bundled` / `teacher`, unless a local folder has that name),
    or a hub id downloaded with huggingface_hub (fails in one line when offline)."""
    p = Path(path_or_id)
    if not p.exists() and str(path_or_id) in BUNDLED_NAMES:
        from ..assets import TEACHER
        return TEACHER
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{p}: expected a model folder (with config.json), got a file")
        return p
    s = str(path_or_id)
    # only what cannot be a local path is a hub id: not ./x or /x, not inside a folder that exists here
    if s.count("/") != 1 or s.startswith((".", "/", "~")) or Path(s).parent.exists():
        raise UserError(f"{s}: no such folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{s}: no such folder, and huggingface_hub is not installed to fetch it from the hub") from None
    try:
        return Path(snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"]))
    except Exception as e:
        raise UserError(f"{s}: could not download from the hub ({type(e).__name__}); pass a local folder instead") from None


def resolve_student_dir(path_or_id: str | os.PathLike) -> Path:
    """A model folder; for a run folder (it holds run.json) the finished model inside it."""
    folder = resolve_model_dir(path_or_id)
    if (folder / "run.json").exists():
        for d in RUN_MODEL_DIRS:
            if (folder / d / "config.json").exists():
                return folder / d
        raise UserError(f"{folder}: run folder without a finished model (no student/ or model/); "
                        "wait for the run to finish or --resume it")
    return folder


def in_progress(path_or_id) -> Path | None:
    """A run folder still training (or stopped) that has a checkpoint but no finished model yet."""
    p = Path(path_or_id)
    if (p / "run.json").exists() and (p / "checkpoint" / "trainer_state.json").exists() \
            and not any((p / d / "config.json").exists() for d in RUN_MODEL_DIRS):
        return p
    return None


def is_gguf(path_or_id: str | os.PathLike) -> bool:
    return str(path_or_id).endswith(".gguf") and Path(path_or_id).is_file()
