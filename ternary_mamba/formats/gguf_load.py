"""Reading a mamba2 GGUF file back (ours from `formats.gguf.export_gguf`, or llama.cpp's converter): the dense
model, or with a `ternary` hook its TQ2_0 / TQ1_0 projections as codes and scales (never dense), and the embedded
byte-level BPE tokenizer.  The file itself is parsed by `gguf_read.read_gguf` (bounds-checked, no gguf-py reader);
gguf-py's `dequantize` turns the other tensor types into fp32."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..core.config import Mamba2Config
from ..core.model import Mamba2LM
from ..errors import UserError
from .folders import load_state_dict_strict
from .gguf import ARCH, gguf_module
from .gguf_read import STRING, GGUFFile, read_gguf
from .tokenizer import Tokenizer


def load_gguf(path: Path, ternary: Callable[[torch.Tensor, torch.Tensor, int], torch.nn.Module] | None = None):
    """A GGUF file written by `export_gguf` (or llama.cpp's converter for mamba2) -> a dense fp32 Mamba2LM.
    ternary: for each projection stored as TQ2_0 / TQ1_0 whose blocks are exactly ternary, called with its codes
    (out, in/4, our tq2 bytes), fp16 scales and group size (256) instead of building the dense weight; the module it
    returns replaces that nn.Linear (`runtime.load.load_for_decoding` packs them so)."""
    gguf = gguf_module()
    path = Path(path)
    r = read_gguf_file(path, gguf)
    return _as_user_error(path, lambda: _model_from_gguf(r, path, gguf, ternary))


def _as_user_error(path: Path, build):
    """build(), any failure of a file that is not a mamba2 model turned into one line."""
    try:
        return build()
    except UserError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError, ZeroDivisionError) as e:
        raise UserError(f"{path}: GGUF metadata or tensors do not describe a mamba2 model "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


# the tensor types a mamba2 GGUF of ours (or llama.cpp's converter) holds; anything else is refused unread
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "TQ1_0", "TQ2_0")


def gguf_summary(path: Path) -> tuple[Mamba2Config, dict[str, int]]:
    """(config, {tensor type: how many tensors}) of a mamba2 GGUF file from its metadata and tensor table alone:
    no tensor is read (what `info` prints)."""
    gguf = gguf_module()
    path = Path(path)
    r = read_gguf_file(path, gguf)
    cfg, _ = _as_user_error(path, lambda: _config_of(r, path))
    types: dict[str, int] = {}
    for t in r.tensors:
        name = gguf.GGMLQuantizationType(t.ggml_type).name
        types[name] = types.get(name, 0) + 1
    return cfg, types


def read_gguf_file(path: Path, gguf) -> GGUFFile:
    """Parse a mamba2 GGUF file, accepting the tensor types such a file holds (TENSOR_TYPES)."""
    Q = gguf.GGMLQuantizationType
    sizes = {int(getattr(Q, n)): gguf.GGML_QUANT_SIZES[getattr(Q, n)] for n in TENSOR_TYPES if hasattr(Q, n)}
    return read_gguf(path, sizes, {int(t): t.name for t in Q})


def _config_of(r: GGUFFile, path: Path) -> tuple[Mamba2Config, dict[str, tuple[int, ...]]]:
    """The model config from the metadata, and every tensor's shape, checked against that config."""

    def field(key):
        f = r.fields.get(key)
        if f is None:
            raise UserError(f"{path}: GGUF metadata lacks {key}")
        return f[0]

    def int_field(key, hi=1 << 24):
        v = field(key)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
            raise UserError(f"{path}: GGUF metadata {key} = {v!r:.40} is not an integer in [1, {hi}]")
        return v

    if field("general.architecture") != ARCH:
        raise UserError(f"{path}: architecture {field('general.architecture')!r} is not mamba2")
    infos = _checked_tensor_infos(r, path)
    d_model, d_inner = int_field(f"{ARCH}.embedding_length"), int_field(f"{ARCH}.ssm.inner_size")
    nh = int_field(f"{ARCH}.ssm.time_step_rank")
    emb_shape = infos.get("token_embd.weight")
    if emb_shape is None or len(emb_shape) != 2 or emb_shape[1] != d_model:
        raise UserError(f"{path}: token_embd.weight has shape {emb_shape}, expected (vocab, {d_model})")
    eps = field(f"{ARCH}.attention.layer_norm_rms_epsilon")
    if d_inner % d_model or d_inner % nh:
        raise UserError(f"{path}: GGUF metadata inner_size {d_inner} is not a multiple of embedding_length "
                        f"{d_model} and of time_step_rank {nh}")
    cfg = Mamba2Config(d_model=d_model, n_layer=int_field(f"{ARCH}.block_count", 1024), vocab_size=emb_shape[0],
                       d_state=int_field(f"{ARCH}.ssm.state_size", 1024), d_conv=int_field(f"{ARCH}.ssm.conv_kernel", 16),
                       expand=d_inner // d_model, headdim=d_inner // nh,
                       ngroups=int_field(f"{ARCH}.ssm.group_count", 1024), pad_vocab_size_multiple=1,
                       tie_embeddings="output.weight" not in infos, norm_eps=eps,
                       conv_bias="blk.0.ssm_conv1d.bias" in infos)
    expected = _expected_numels(cfg)
    for name, shape in infos.items():
        if name not in expected:
            raise UserError(f"{path}: tensor {name!r:.60} is not part of a {cfg.n_layer}-layer mamba2 model")
        if math.prod(shape) != expected[name]:
            raise UserError(f"{path}: tensor {name} has shape {shape} ({math.prod(shape)} values); this model's "
                            f"metadata needs {expected[name]}")
    return cfg, infos


def _model_from_gguf(r: GGUFFile, path: Path, gguf, ternary):
    cfg, infos = _config_of(r, path)
    with torch.device("meta"):          # no random init of weights about to be replaced (~17 s at 1.3B)
        model = Mamba2LM(cfg, init=False)
    sd, kept = {}, {}
    for tensor in r.tensors:            # one tensor in fp32 at a time, and the packed projections never
        key, f = _ours(tensor.name)
        if ternary is not None and key.endswith("_proj.weight") and tensor.ggml_type in _tq_types(gguf):
            found = _ternary_codes(tensor, infos[tensor.name], gguf)
            if found is not None:
                kept[key.removesuffix(".weight")] = ternary(*found)
                continue
        value = _dense(tensor, infos[tensor.name], gguf)
        value = f(value) if f else value
        if not bool(torch.isfinite(value).all()):
            raise UserError(f"{path}: tensor for {key} holds NaN or infinite values; the file is corrupt")
        sd[key] = value
    for name, module in kept.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    load_state_dict_strict(model, sd, str(path), assign=True, own=True)   # fresh arrays, made above
    meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if meta:
        raise UserError(f"{path}: no tensor for {meta[:3]} in the GGUF file")
    return model.eval()


def _tq_types(gguf) -> set[int]:
    return {int(gguf.GGMLQuantizationType.TQ1_0), int(gguf.GGMLQuantizationType.TQ2_0)}


_LAYER_NAMES = {"attn_norm.weight": ("norm.weight", None), "ssm_in.weight": ("mixer.in_proj.weight", None),
                "ssm_out.weight": ("mixer.out_proj.weight", None),
                "ssm_conv1d.weight": ("mixer.conv1d.weight", lambda v: v.unsqueeze(1)),
                "ssm_conv1d.bias": ("mixer.conv1d.bias", None), "ssm_dt.bias": ("mixer.dt_bias", None),
                "ssm_a": ("mixer.A_log", lambda v: torch.log(-v.squeeze(-1))),
                "ssm_d": ("mixer.D", lambda v: v.squeeze(-1)),
                "ssm_norm.weight": ("mixer.norm.weight", lambda v: v.reshape(-1))}


def _ours(name: str):
    """A GGUF tensor name (checked against the model's by `_expected_numels`) -> our state-dict key and the change
    of its value (None: as it is)."""
    top = {"token_embd.weight": "backbone.embedding.weight", "output_norm.weight": "backbone.norm_f.weight",
           "output.weight": "lm_head.weight"}
    if name in top:
        return top[name], None
    _, i, rest = name.split(".", 2)                    # blk.{i}.{rest}
    key, f = _LAYER_NAMES[rest]
    return f"backbone.layers.{i}.{key}", f


def _dense(tensor, shape: tuple[int, ...], gguf) -> torch.Tensor:
    data = gguf.quants.dequantize(tensor.data, gguf.GGMLQuantizationType(tensor.ggml_type))
    return torch.from_numpy(np.array(data, dtype=np.float32).reshape(shape))


def _ternary_codes(tensor, shape: tuple[int, ...], gguf) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(codes (out, in/4) uint8 in our tq2 layout, fp16 scales (out, in/256), 256) of a TQ2_0 / TQ1_0 projection
    whose blocks are exactly scale x {-1, 0, +1}; None otherwise.  TQ2_0 is re-ordered byte by byte, never
    dequantized: block = 64 bytes of 2-bit fields, then the fp16 scale d; field q of weight 128 h + 32 l + m is bits
    2l..2l+1 of byte 32 h + m and means (q - 1) d, the same q = t + 1 that our bytes hold four weights at a time."""
    out, inn = shape
    if tensor.ggml_type != int(gguf.GGMLQuantizationType.TQ2_0):
        from ..ops.packing import pack
        from ..quant.adopt import ternary_scales
        from ..quant.ternary import ternary_codes
        w = _dense(tensor, shape, gguf)
        s = ternary_scales(w, 256) if bool(torch.isfinite(w).all()) else None
        return None if s is None else (pack(ternary_codes(w, s, 256), "tq2").view(out, inn // 4), s.half(), 256)
    blocks = np.asarray(tensor.data).reshape(-1, 66)
    d = blocks[:, 64:].copy().view(np.float16)[:, 0]
    if not np.isfinite(d).all() or (d < 0).any():
        return None
    qs = blocks[:, :64].reshape(-1, 2, 1, 32)
    q = ((qs >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(-1, 4)   # weights in order
    if (q == 3).any():                                  # (3 - 1) d: not ternary
        return None
    codes = q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)
    return torch.from_numpy(codes.reshape(out, inn // 4)), torch.from_numpy(d.reshape(out, inn // 256)), 256


def _checked_tensor_infos(r: GGUFFile, path: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape (PyTorch order) of every tensor, checked before any is read: unique non-empty names (the
    reader checked types, dimensions and extents)."""
    infos = {}
    for tensor in r.tensors:
        name = tensor.name
        if not name or len(name) > 256:
            raise UserError(f"{path}: a tensor has an empty or invalid name")
        if name in infos:
            raise UserError(f"{path}: tensor {name!r:.60} appears twice")
        infos[name] = tensor.shape
    return infos


def _expected_numels(cfg: Mamba2Config) -> dict[str, int]:
    """GGUF tensor name -> number of values, for a model of this config (no tensor allocated)."""
    n_in, conv = cfg.d_in_proj, cfg.conv_dim
    out = {"token_embd.weight": cfg.vocab_size * cfg.d_model, "output_norm.weight": cfg.d_model}
    if not cfg.tie_embeddings:
        out["output.weight"] = cfg.vocab_size * cfg.d_model
    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        out.update({b + "attn_norm.weight": cfg.d_model, b + "ssm_in.weight": n_in * cfg.d_model,
                    b + "ssm_out.weight": cfg.d_model * cfg.d_inner, b + "ssm_conv1d.weight": conv * cfg.d_conv,
                    b + "ssm_dt.bias": cfg.nheads, b + "ssm_a": cfg.nheads, b + "ssm_d": cfg.nheads,
                    b + "ssm_norm.weight": cfg.d_inner})
        if cfg.conv_bias:
            out[b + "ssm_conv1d.bias"] = conv
    return out


def load_gguf_tokenizer(path: Path):
    """The byte-level BPE tokenizer embedded in a GGUF file (tokenizer.ggml.model = gpt2) as our Tokenizer."""
    gguf = gguf_module()
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    r = read_gguf_file(Path(path), gguf)

    def field(key):
        f = r.fields.get(key)
        if f is None:
            raise UserError(f"{path}: has no embedded tokenizer ({key} is missing); pass --tokenizer")
        return f

    def strings(key):
        value, vtype = field(key)
        if vtype == STRING:
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{path}: {key} is not a list of strings")
        return value

    kinds = strings("tokenizer.ggml.model")
    model_kind = kinds[0] if kinds else ""
    if model_kind != "gpt2":
        raise UserError(f"{path}: embedded tokenizer {model_kind!r} is not supported (gpt2 BPE only); pass --tokenizer")
    tokens = strings("tokenizer.ggml.tokens")
    value = field("tokenizer.ggml.token_type")[0]
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu":
        raise UserError(f"{path}: tokenizer.ggml.token_type is not a list of integers")
    types = value.tolist()
    if len(types) != len(tokens) or not tokens:
        raise UserError(f"{path}: {len(tokens)} tokens but {len(types)} token types")
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty != 5}      # drop [PADi]
    merges = []
    for m in strings("tokenizer.ggml.merges"):
        a, sep, b = m.partition(" ")
        if not sep or not a or not b:
            raise UserError(f"{path}: tokenizer.ggml.merges entry {m!r:.40} is not two tokens separated by a space")
        merges.append((a, b))
    tok = HFTokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t, ty in zip(tokens, types) if ty == 3])
    return Tokenizer(tok, Path(path))
