"""Weights of model folders: reading mamba_ssm / transformers / the project's state dicts, and saving the
project's own folder.  Every failure a user can cause becomes one `UserError` line naming the file.

The project's own folder:  config.json  ({"format": "ternary-mamba", "architecture": "mamba2",
"config": {Mamba2Config fields}, ...}),  model.safetensors (mamba_ssm key names, tied weight stored
once),  tokenizer.json (when known).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import UserError
from .configs import FORMAT_NAME
from .fs import atomic_dir, read_json, save_safetensors


def _hf_to_ours(key: str) -> str:
    return key.replace("backbone.embeddings.", "backbone.embedding.")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # weights_only refuses arbitrary objects: report, never retry unsafely
        msg = str(e).strip().splitlines()[0][:200]
        raise UserError(f"{path}: not a plain tensor state dict (refused by weights_only loading: {msg})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: expected a dict of tensors")
    return sd


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        wm = read_json(index).get("weight_map")
        if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
            raise UserError(f"{index}: weight_map must be a non-empty object of tensor name -> shard file")
        sd = {}
        root = folder.resolve()
        for shard in sorted(set(wm.values())):
            p = (folder / shard).resolve()
            if Path(shard).is_absolute() or p.parent != root:     # shards live in the model folder, nowhere else
                raise UserError(f"{index}: shard {shard!r} is outside the model folder")
            sd.update(_load_safetensors(p))
        return sd
    if (folder / "model.safetensors").exists():
        return _load_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").exists():
        return _load_pickle(folder / "pytorch_model.bin")
    raise UserError(f"{folder}: no weights (model.safetensors, its index, or pytorch_model.bin)")


def load_state_dict_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str,
                           assign: bool = False, own: bool = False) -> None:
    """Load `sd` (our names or transformers') after checking every key, shape and dtype against the model; as fp32.
    assign=True: the tensors replace the model's (a model built on the meta device), the tied head re-tied; they are
    copied first unless own=True (the caller made them and hands them over: no second copy of the model)."""
    sd = {_hf_to_ours(k): v for k, v in sd.items()}
    expected = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sd))
    unknown = sorted(set(sd) - set(expected))
    if missing:
        raise UserError(f"{source}: missing keys {missing[:3]}{' ...' if len(missing) > 3 else ''} ({len(missing)} in all)")
    if unknown:
        raise UserError(f"{source}: unexpected keys {unknown[:3]}{' ...' if len(unknown) > 3 else ''} ({len(unknown)} in all)")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise UserError(f"{source}: {k} has shape {tuple(v.shape)}, config expects {tuple(expected[k].shape)}")
        if not v.is_floating_point():
            raise UserError(f"{source}: {k} has dtype {v.dtype}, expected floating point")
    # assign: own copies (a tensor read from a memory-mapped file must not become a parameter as it is)
    model.load_state_dict({k: v.to(torch.float32, copy=assign and not own) for k, v in sd.items()}, strict=False,
                          assign=assign)
    if assign and model.config.tie_embeddings and isinstance(getattr(model.lm_head, "weight", None), torch.nn.Parameter):
        model.lm_head.weight = model.backbone.embedding.weight


def model_state_for_saving(model) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # stored once, as the embedding
    return sd


def save_model(model, out: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
               extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write the project's folder atomically: config.json + model.safetensors (+ tokenizer.json)."""
    meta = {"format": FORMAT_NAME, "architecture": "mamba2", "config": model.config.to_dict()}
    q = getattr(model, "ternary_config", None)
    if q is not None:
        meta["quantization"] = q.to_dict()
    meta.update(extra or {})
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_safetensors(model_state_for_saving(model), tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
    return out


def find_tokenizer(folder: str | os.PathLike) -> Path | None:
    p = Path(folder) / "tokenizer.json"
    return p if p.exists() else None
