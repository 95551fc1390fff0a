"""Model configs from files: the project's, mamba_ssm's and transformers' config.json layouts, and presets."""
from __future__ import annotations

from pathlib import Path

from ..core.config import PRESETS, Mamba2Config
from ..errors import UserError
from ..spec import PACKED_FORMAT_NAME, PACKINGS  # noqa: F401 - re-exported for the format readers
from .fs import read_json

FORMAT_NAME = "ternary-mamba"
GGUF_TYPES = ("tq2_0", "tq1_0", "f16", "f32")   # how `export --format gguf` writes the ternary projections


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
    except (TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{source}: bad field ({e})") from None
    raise UserError(f"{source}: not a Mamba-2 config (expected mamba_ssm, transformers or ternary-mamba fields)")


def _config_from_mamba_ssm(d: dict, source: str) -> Mamba2Config:
    if not isinstance(d.get("ssm_cfg") or {}, dict):
        raise UserError(f"{source}: ssm_cfg must be an object, got {d.get('ssm_cfg')!r:.80}")
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
    return config_from_dict(read_json(Path(path)), str(path))




def resolve_config(spec: str) -> Mamba2Config:
    """A preset name, or a path to a JSON file of Mamba2Config fields (or any supported config.json)."""
    if spec in PRESETS:
        return Mamba2Config(**PRESETS[spec])
    path = Path(spec)
    if not path.exists():
        raise UserError(f"config: '{spec}' is neither a preset ({', '.join(PRESETS)}) nor a file")
    return config_from_json(path)
