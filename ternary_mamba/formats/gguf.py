"""GGUF export (for llama.cpp) of a ternary student, and a reader that loads such a file back into our model.

Layout follows llama.cpp's `mamba2` architecture (tensor names and shapes as its HF converter writes them):

    token_embd (vocab, d)       output_norm (d)      output (vocab, d) only if the head is not tied
    blk.i.attn_norm (d)         blk.i.ssm_in (in_proj)      blk.i.ssm_out (out_proj)
    blk.i.ssm_conv1d.weight (conv_dim, d_conv) + .bias      blk.i.ssm_dt.bias (nheads)
    blk.i.ssm_a = -exp(A_log) (nheads, 1)    blk.i.ssm_d (nheads, 1)    blk.i.ssm_norm (ngroups, d_inner/ngroups)

Ternary projections are written as
    tq2_0 / tq1_0  llama.cpp's ternary types: blocks of 256 weights along a row with one fp16 scale each
                   (2.06 / 1.69 bits per weight).  Exact only when every block lies inside one of our groups,
                   i.e. the student's group size is a multiple of 256 (or -1 with rows a multiple of 256);
                   otherwise the export refuses rather than silently re-scaling.
    f16            codes × fp16 scale, which fp16 represents exactly: exact for any group size, 16 bits/weight.
    f32            the same in fp32 (also what a full-precision model is written as, e.g. for benchmarks).
The tokenizer (byte-level BPE from tokenizer.json) is embedded as `gpt2` tokens + merges, padded to the
model's padded vocabulary with [PADi] tokens as llama.cpp's converter does.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from ..core.config import Mamba2Config
from ..core.model import Mamba2LM
from ..errors import UserError
from ..spec import group_paths
from ..quant.qat import TernaryLinear
from .configs import GGUF_TYPES
from .folders import load_state_dict_strict
from .gguf_read import STRING, GGUFFile, read_gguf
from .tokenizer import Tokenizer

ARCH = "mamba2"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF export needs the gguf package: pip install 'ternary-mamba[gguf]'") from None
    return gguf


def _ternary_weight(module, qtype: str):
    """(array, raw ggml type or None) for one TernaryLinear in the requested GGUF type; exact or refused."""
    gguf = _gguf()
    codes, s16 = module.export()
    G = module.group_size
    dense = (codes.float().view(codes.shape[0], -1, G) * s16.float().unsqueeze(-1)).view_as(codes)
    if qtype in ("f16", "f32"):
        return dense.to(torch.float16 if qtype == "f16" else torch.float32).numpy(), None
    if not group_paths(G).gguf_tq:
        raise UserError(f"GGUF {qtype.upper()} has one scale per 256 weights but this student has groups of {G}; "
                        f"export with --gguf-type f16 (exact) or train with --group-size 256")
    # each 256-block holds codes × one scale s: the block max |x| is s (if any code is non-zero), so
    # llama.cpp's quantizer reproduces the codes and the scale exactly; all-zero blocks stay zero.
    t = {"tq2_0": gguf.GGMLQuantizationType.TQ2_0, "tq1_0": gguf.GGMLQuantizationType.TQ1_0}[qtype]
    return gguf.quants.quantize(dense.numpy().astype(np.float32), t), t


def _vocab(writer, tokenizer_path: Path | None, n_vocab: int) -> None:
    if tokenizer_path is None:
        raise UserError("the model has no tokenizer.json to embed; GGUF needs one")
    tj = json.loads(Path(tokenizer_path).read_text())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"{tokenizer_path}: only BPE tokenizers can be embedded in GGUF (found {model.get('type')})")
    vocab = dict(model["vocab"])
    added = {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
    vocab.update(added)
    if max(vocab.values()) >= n_vocab:
        raise UserError(f"{tokenizer_path}: has token ids up to {max(vocab.values())} but the model's vocabulary "
                        f"is {n_vocab}; this tokenizer does not belong to this model")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [5] * n_vocab                     # 5 = unused (padding)
    for tok, i in vocab.items():
        if i < n_vocab:
            tokens[i] = tok
            types[i] = 3 if tok in added else 1   # 3 = control, 1 = normal
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eos = added.get("<|endoftext|>")
    if eos is not None:
        writer.add_bos_token_id(eos)
        writer.add_eos_token_id(eos)


def export_gguf(model, out: Path, qtype: str = "tq2_0", tokenizer_path: Path | None = None, name: str = "") -> dict:
    """Write `model` (a ternary student) as one GGUF file, atomically. Returns {tensor name: ggml type name}."""
    gguf = _gguf()
    if qtype not in GGUF_TYPES:
        raise UserError(f"--gguf-type {qtype}: choose from {', '.join(GGUF_TYPES)}")
    cfg = model.config
    if cfg.expand != 2:
        raise UserError(f"llama.cpp's mamba2 requires expand = 2 (this model has {cfg.expand})")
    out = Path(out)
    if out.exists():
        raise UserError(f"{out}: already exists; choose another --out")
    if getattr(model, "ternary_config", None) is None and qtype not in ("f16", "f32"):
        raise UserError(f"the model is not ternary: {qtype.upper()} needs a QAT/PTQ student (f16/f32 write it dense)")
    if out.is_dir():
        raise UserError(f"{out}: is a folder; --out of a GGUF export is a .gguf file path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(tmp, ARCH)
    types: dict[str, str] = {}

    def add(gname: str, t, raw=None):
        arr = t if isinstance(t, np.ndarray) else t.detach().float().numpy()
        w.add_tensor(gname, arr, raw_dtype=raw)
        types[gname] = raw.name if raw is not None else str(arr.dtype)

    try:
        d_inner, nh = cfg.d_model * cfg.expand, cfg.d_model * cfg.expand // cfg.headdim
        w.add_name(name or "ternary-mamba")
        w.add_context_length(2 ** 20)
        w.add_embedding_length(cfg.d_model)
        w.add_feed_forward_length(0)
        w.add_head_count(0)
        w.add_block_count(cfg.n_layer)
        w.add_ssm_conv_kernel(cfg.d_conv)
        w.add_ssm_inner_size(d_inner)
        w.add_ssm_state_size(cfg.d_state)
        w.add_ssm_time_step_rank(nh)
        w.add_ssm_group_count(cfg.ngroups)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_file_type({"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
                         "f16": gguf.LlamaFileType.MOSTLY_F16, "f32": gguf.LlamaFileType.ALL_F32}[qtype])
        emb = model.backbone.embedding.weight
        _vocab(w, tokenizer_path, emb.shape[0])
        edt = torch.float32 if qtype == "f32" else torch.float16
        add("token_embd.weight", emb.detach().to(edt).numpy())
        add("output_norm.weight", model.backbone.norm_f.weight)
        if not cfg.tie_embeddings:
            add("output.weight", model.lm_head.weight.detach().to(edt).numpy())
        for i, layer in enumerate(model.backbone.layers):
            mx, b = layer.mixer, f"blk.{i}."
            add(b + "attn_norm.weight", layer.norm.weight)
            for gname, lin in (("ssm_in.weight", mx.in_proj), ("ssm_out.weight", mx.out_proj)):
                if not isinstance(lin, TernaryLinear):   # full precision (f16 / f32 only, checked above)
                    add(b + gname, lin.weight.detach().to(edt).numpy())
                    continue
                if lin.has_corrections:
                    raise UserError("this model carries post-hoc corrections (bias / low-rank), which GGUF's "
                                    "mamba2 graph does not hold")
                arr, raw = _ternary_weight(lin, qtype)
                add(b + gname, arr, raw)
            add(b + "ssm_conv1d.weight", mx.conv1d.weight.squeeze(1))
            if mx.conv1d.bias is not None:
                add(b + "ssm_conv1d.bias", mx.conv1d.bias)
            add(b + "ssm_dt.bias", mx.dt_bias)
            add(b + "ssm_a", -torch.exp(mx.A_log.float()).unsqueeze(-1))
            add(b + "ssm_d", mx.D.unsqueeze(-1))
            add(b + "ssm_norm.weight", mx.norm.weight.reshape(cfg.ngroups, d_inner // cfg.ngroups))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException as e:
        try:
            w.close()                     # may fail again on a full disk; the temporary file goes either way
        except OSError:
            pass
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:     # gguf's writer does not say which file
            raise OSError(e.errno, e.strerror, str(out)) from None
        raise
    return types


def load_gguf(path: Path):
    """A GGUF file written by `export_gguf` (or llama.cpp's converter for mamba2) -> a dense fp32 Mamba2LM."""
    gguf = _gguf()
    path = Path(path)
    r = _read(path, gguf)
    try:
        return _model_from_gguf(r, path, gguf)
    except UserError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError, ZeroDivisionError) as e:
        raise UserError(f"{path}: GGUF metadata or tensors do not describe a mamba2 model "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


# the tensor types a mamba2 GGUF of ours (or llama.cpp's converter) holds; anything else is refused unread
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "TQ1_0", "TQ2_0")


def _read(path: Path, gguf) -> GGUFFile:
    Q = gguf.GGMLQuantizationType
    sizes = {int(getattr(Q, n)): gguf.GGML_QUANT_SIZES[getattr(Q, n)] for n in TENSOR_TYPES if hasattr(Q, n)}
    return read_gguf(path, sizes, {int(t): t.name for t in Q})


def _model_from_gguf(r: GGUFFile, path: Path, gguf):

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
    t = {}
    for tensor in r.tensors:
        data = gguf.quants.dequantize(tensor.data, gguf.GGMLQuantizationType(tensor.ggml_type))
        t[tensor.name] = torch.from_numpy(np.array(data, dtype=np.float32).reshape(infos[tensor.name]))
    emb = t["token_embd.weight"]
    sd = {"backbone.embedding.weight": emb, "backbone.norm_f.weight": t["output_norm.weight"]}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = t["output.weight"]
    for i in range(cfg.n_layer):
        b, p = f"blk.{i}.", f"backbone.layers.{i}."
        sd.update({p + "norm.weight": t[b + "attn_norm.weight"],
                   p + "mixer.in_proj.weight": t[b + "ssm_in.weight"],
                   p + "mixer.out_proj.weight": t[b + "ssm_out.weight"],
                   p + "mixer.conv1d.weight": t[b + "ssm_conv1d.weight"].unsqueeze(1),
                   p + "mixer.dt_bias": t[b + "ssm_dt.bias"],
                   p + "mixer.A_log": torch.log(-t[b + "ssm_a"].squeeze(-1)),
                   p + "mixer.D": t[b + "ssm_d"].squeeze(-1),
                   p + "mixer.norm.weight": t[b + "ssm_norm.weight"].reshape(-1)})
        if cfg.conv_bias:
            sd[p + "mixer.conv1d.bias"] = t[b + "ssm_conv1d.bias"]
    for k, v in sd.items():
        if not bool(torch.isfinite(v).all()):
            raise UserError(f"{path}: tensor for {k} holds NaN or infinite values; the file is corrupt")
    with torch.device("meta"):          # no random init of weights about to be replaced (~17 s at 1.3B)
        model = Mamba2LM(cfg, init=False)
    load_state_dict_strict(model, sd, str(path), assign=True)
    meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if meta:
        raise UserError(f"{path}: no tensor for {meta[:3]} in the GGUF file")
    return model.eval()


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
    gguf = _gguf()
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers
    r = _read(Path(path), gguf)

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
