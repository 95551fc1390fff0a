"""Load and save Mamba-2 checkpoints: mamba_ssm folders, transformers folders, the project's own
folders, and hub ids.  Every failure a user can cause becomes one `UserError` line naming the file.

The project's own folder:  config.json  ({"format": "ternary-mamba", "architecture": "mamba2",
"config": {Mamba2Config fields}, ...}),  model.safetensors (mamba_ssm key names, tied weight stored
once),  tokenizer.json (when known).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import Mamba2Config
from .errors import UserError

FORMAT_NAME = "ternary-mamba"
PACKED_FORMAT_NAME = "ternary-mamba-packed"


# ------------------------------------------------------------------ configs
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def config_from_dict(d: dict, source: str = "config") -> Mamba2Config:
    """Recognise the project's, mamba_ssm's and transformers' config.json layouts."""
    try:
        if d.get("format") in (FORMAT_NAME, PACKED_FORMAT_NAME):
            return Mamba2Config.from_dict(d["config"])
        if "model_type" in d or "hidden_size" in d:
            if d.get("model_type") not in (None, "mamba2"):
                raise UserError(f"{source}: model_type '{d.get('model_type')}' is not Mamba-2")
            return _config_from_hf(d, source)
        if "ssm_cfg" in d or "n_layer" in d and "d_model" in d and "d_state" not in d:
            return _config_from_mamba_ssm(d, source)
        if "d_model" in d:  # a bare dict of Mamba2Config fields
            return Mamba2Config.from_dict(d)
    except UserError as e:   # the config's own checks say "config: ..."; name the file instead
        msg = str(e)
        raise UserError(f"{source}:{msg[len('config:'):]}" if msg.startswith("config:") else msg) from None
    except KeyError as e:
        raise UserError(f"{source}: missing field {e}") from None
    except TypeError as e:
        raise UserError(f"{source}: bad field ({e})") from None
    raise UserError(f"{source}: not a Mamba-2 config (expected mamba_ssm, transformers or ternary-mamba fields)")


def _config_from_mamba_ssm(d: dict, source: str) -> Mamba2Config:
    ssm = dict(d.get("ssm_cfg") or {})
    if ssm.get("layer", "Mamba1") != "Mamba2":
        raise UserError(f"{source}: ssm_cfg.layer is '{ssm.get('layer', 'Mamba1')}', not Mamba2 (Mamba-1 is not supported)")
    if d.get("d_intermediate", 0):
        raise UserError(f"{source}: d_intermediate > 0 (MLP blocks) is not supported")
    if d.get("attn_layer_idx"):
        raise UserError(f"{source}: hybrid attention layers are not supported")
    if ssm.get("d_ssm") not in (None, d["d_model"] * ssm.get("expand", 2)):
        raise UserError(f"{source}: d_ssm != d_inner is not supported")
    if not d.get("rms_norm", True):
        raise UserError(f"{source}: LayerNorm blocks (rms_norm=false) are not supported")
    return Mamba2Config(
        d_model=d["d_model"], n_layer=d["n_layer"], vocab_size=d["vocab_size"],
        d_state=ssm.get("d_state", 128), d_conv=ssm.get("d_conv", 4), expand=ssm.get("expand", 2),
        headdim=ssm.get("headdim", 64), ngroups=ssm.get("ngroups", 1), chunk_size=64,
        pad_vocab_size_multiple=d.get("pad_vocab_size_multiple", 8),
        tie_embeddings=d.get("tie_embeddings", True), norm_eps=d.get("norm_epsilon", 1e-5),
        conv_bias=ssm.get("conv_bias", True), bias=ssm.get("bias", False))


def _config_from_hf(d: dict, source: str) -> Mamba2Config:
    cfg = Mamba2Config(
        d_model=d["hidden_size"], n_layer=d["num_hidden_layers"], vocab_size=d["vocab_size"],
        d_state=d.get("state_size", 128), d_conv=d.get("conv_kernel", 4), expand=d.get("expand", 2),
        headdim=d.get("head_dim", 64), ngroups=d.get("n_groups", 1), chunk_size=64,
        pad_vocab_size_multiple=1, tie_embeddings=d.get("tie_word_embeddings", True),
        norm_eps=d.get("layer_norm_epsilon", 1e-5), conv_bias=d.get("use_conv_bias", True),
        bias=d.get("use_bias", False))
    if "num_heads" in d and d["num_heads"] != cfg.nheads:
        raise UserError(f"{source}: num_heads={d['num_heads']} but expand*hidden_size/head_dim={cfg.nheads}")
    lo, hi = (float(v["__float__"]) if isinstance(v, dict) else float(v)  # transformers writes inf as a dict
              for v in d.get("time_step_limit", (0.0, float("inf"))))
    if lo > 0.0 or hi < 1e30:
        raise UserError(f"{source}: a non-default time_step_limit is not supported")
    return cfg


def config_from_json(path: Path) -> Mamba2Config:
    return config_from_dict(_read_json(Path(path)), str(path))


# ------------------------------------------------------------------ state dicts
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
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise UserError(f"{index}: empty weight_map")
        sd = {}
        for shard in shards:
            sd.update(_load_safetensors(folder / shard))
        return sd
    if (folder / "model.safetensors").exists():
        return _load_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").exists():
        return _load_pickle(folder / "pytorch_model.bin")
    raise UserError(f"{folder}: no weights (model.safetensors, its index, or pytorch_model.bin)")


def load_state_dict_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
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
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False, assign=False)


# ------------------------------------------------------------------ public API
def resolve_model_dir(path_or_id: str | os.PathLike) -> Path:
    """A local folder, or a hub id downloaded with huggingface_hub (fails in one line when offline)."""
    p = Path(path_or_id)
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{p}: expected a model folder (with config.json), got a file")
        return p
    s = str(path_or_id)
    if s.count("/") != 1 or s.startswith((".", "/")):
        raise UserError(f"{s}: no such folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"{s}: no such folder, and huggingface_hub is not installed to fetch it from the hub") from None
    try:
        return Path(snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"]))
    except Exception as e:
        raise UserError(f"{s}: could not download from the hub ({type(e).__name__}); pass a local folder instead") from None


def load_model(path_or_id: str | os.PathLike, device: str = "cpu"):
    """Any supported checkpoint -> an fp32 `Mamba2LM` in eval mode.  Packed folders load through
    `ternary_mamba.packed` (ternary weights stay packed); QAT students get their ternary modules back."""
    from .model import Mamba2LM
    if str(path_or_id).endswith(".gguf") and Path(path_or_id).is_file():
        from .gguf_io import load_gguf
        return load_gguf(Path(path_or_id)).to(device)
    folder = resolve_model_dir(path_or_id)
    meta = _read_json(folder / "config.json")
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
        from .quant.qat import TernaryConfig, quantize_
        quantize_(model, TernaryConfig.from_dict(quant))
    load_state_dict_strict(model, sd, str(folder))
    return model.to(device).eval()


def atomic_dir(out: Path, overwrite: bool = False):
    """Context manager: yields a temporary sibling folder, renamed onto `out` only on success."""
    import contextlib

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


def model_state_for_saving(model) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # stored once, as the embedding
    return sd


def save_model(model, out: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
               extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write the project's folder atomically: config.json + model.safetensors (+ tokenizer.json)."""
    from safetensors.torch import save_file
    meta = {"format": FORMAT_NAME, "architecture": "mamba2", "config": model.config.to_dict()}
    q = getattr(model, "ternary_config", None)
    if q is not None:
        meta["quantization"] = q.to_dict()
    meta.update(extra or {})
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(model_state_for_saving(model), str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
    return out


def find_tokenizer(folder: str | os.PathLike) -> Path | None:
    p = Path(folder) / "tokenizer.json"
    return p if p.exists() else None
