"""GGUF export (for llama.cpp) of a ternary student (reading it back: `gguf_load.py`).

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
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..spec import group_paths
from ..quant.qat import TernaryLinear
from .configs import GGUF_TYPES

ARCH = "mamba2"


def gguf_module():
    try:
        import gguf
    except ImportError:
        raise UserError("GGUF files need the gguf package: pip install 'ternary-mamba[gguf]'") from None
    return gguf


def _ternary_weight(module, qtype: str):
    """(array, raw ggml type or None) for one TernaryLinear in the requested GGUF type; exact or refused."""
    gguf = gguf_module()
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


def export_gguf(model, out: Path, qtype: str = "tq2_0", tokenizer_path: Path | None = None, name: str = "",
                metadata: dict[str, str] | None = None) -> dict:
    """Write `model` (a ternary student) as one GGUF file, atomically, with `metadata` as extra string keys.
    Returns {tensor name: ggml type name}."""
    gguf = gguf_module()
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
        for key, value in (metadata or {}).items():
            w.add_string(key, value)
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
