"""One `load_model` for every path a user may hand us: the project's folders (full precision, QAT students,
packed), run folders (their finished model), mamba_ssm and transformers folders, GGUF files, hub ids."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..core.model import Mamba2LM
from ..errors import UserError
from .configs import PACKED_FORMAT_NAME, config_from_dict
from .folders import load_state_dict_strict, read_state_dict
from .fs import read_json

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


def load_checkpoint_model(run: Path):
    """The model of a run in progress, from its latest checkpoint (rebuilt from run.json: the teacher and the
    quantization of a quantize run, the model config of a pretrain run).  Says which step it is."""
    import sys
    from safetensors.torch import load_file
    from .configs import resolve_config
    rec = read_json(run / "run.json")
    c, command = rec.get("config") or {}, rec.get("command")
    if command == "quantize":
        model = load_model(c["teacher"])
        from ..quant.config import TernaryConfig
        from ..quant.qat import quantize_
        quantize_(model, TernaryConfig.from_saved(c["quant"]))
    elif command == "pretrain":
        sd = load_file(str(run / "checkpoint" / "model.safetensors"))
        cfg = resolve_config(c["model"]).replace(vocab_size=sd["backbone.embedding.weight"].shape[0])
        model = Mamba2LM(cfg, init=False)
        if c.get("ternary"):
            from ..quant.config import TernaryConfig
            from ..quant.qat import quantize_
            if "quant" in c:         # the quantization as the run recorded it (scale format included)
                quantize_(model, TernaryConfig.from_dict(c["quant"], f"{run / 'run.json'}: config.quant"))
            else:                    # run records written before pretrain nested its TernaryConfig (flat fields)
                quantize_(model, TernaryConfig.from_dict(
                    {k: c[k] for k in ("group_size", "scale_mode", "scale_param") if k in c},
                    f"{run / 'run.json'}: config"))
    else:
        raise UserError(f"{run}: run.json names no known command; cannot rebuild its model")
    load_state_dict_strict(model, load_file(str(run / "checkpoint" / "model.safetensors")), str(run / "checkpoint"))
    step = read_json(run / "checkpoint" / "trainer_state.json").get("step")
    print(f"({run}: a run in progress; using its checkpoint at step {step})", file=sys.stderr)
    return model.eval()


def is_gguf(path_or_id: str | os.PathLike) -> bool:
    return str(path_or_id).endswith(".gguf") and Path(path_or_id).is_file()


def load_model(path_or_id: str | os.PathLike, device: str = "cpu"):
    """Any supported checkpoint -> an fp32 `Mamba2LM` in eval mode: a model folder, a run folder (its
    finished student/ or model/), a packed folder (ternary weights stay packed), a QAT student (its ternary
    modules rebuilt), a .gguf file, or a hub id."""
    if is_gguf(path_or_id):
        from .gguf import load_gguf
        return load_gguf(Path(path_or_id)).to(device)
    if in_progress(path_or_id) is not None:
        return load_checkpoint_model(Path(path_or_id)).to(device)
    folder = resolve_student_dir(path_or_id)
    meta = read_json(folder / "config.json")
    if meta.get("format") == PACKED_FORMAT_NAME:
        from .packed import load_packed
        return load_packed(folder).to(device)
    cfg = config_from_dict(meta, str(folder / "config.json"))
    with torch.device("meta"):
        model = Mamba2LM(cfg, init=False)
    model = model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.backbone.embedding.weight
    sd = read_state_dict(folder)
    quant = meta.get("quantization")
    if quant:  # a QAT student: rebuild its ternary modules before loading latent weights + scales
        from ..quant.qat import TernaryConfig, quantize_
        quantize_(model, TernaryConfig.from_saved(quant))
    load_state_dict_strict(model, sd, str(folder))
    return model.to(device).eval()


def load_model_and_tokenizer(path: str | os.PathLike, tokenizer: str | None = None):
    """(model, tokenizer) of a model / run / packed folder, the bundled teacher, a hub id or a .gguf file (its
    embedded tokenizer unless `tokenizer` is given)."""
    from .tokenizer import load_tokenizer, tokenizer_path_for
    if is_gguf(path):
        from .gguf import load_gguf, load_gguf_tokenizer
        return load_gguf(Path(path)), (load_tokenizer(tokenizer) if tokenizer else load_gguf_tokenizer(Path(path)))
    run = in_progress(path)
    if run is not None:
        tok = tokenizer or (read_json(run / "run.json").get("config") or {}).get("tokenizer")
        return load_checkpoint_model(run), load_tokenizer(tokenizer_path_for(run, tok))
    folder = resolve_student_dir(path)
    return load_model(folder), load_tokenizer(tokenizer_path_for(folder, tokenizer))
