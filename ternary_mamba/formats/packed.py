"""The packed ternary checkpoint (docs/PACKED_FORMAT.md): export, validation and loading.

A packed folder holds config.json (the self-describing header) and model.safetensors with, per ternary
module `<name>`: `<name>.codes` (uint8, the packed flattened codes) and `<name>.scales` (fp16,
(out, in // G)); every other tensor in fp16 (or fp32), the tied embedding stored once.

At load, ternary weights stay packed: tq2 codes are used as stored (memory-mapped), tq1 codes are
re-packed once to the 2-bit layout the kernel reads.  Decoding multiplies straight from the codes
(`runtime.packed_linear.PackedTernaryLinear`)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.config import Mamba2Config
from ..core.model import Mamba2LM
from ..errors import UserError
from ..quant.packing import PER_BYTE, pack, unpack
from ..quant.qat import ternary_modules
from ..quant.tables import TABLE_FORMATS, check_table_format, quantize_table
from ..runtime.convert import packed_codes
from ..runtime.heads import Fp16Head
from ..runtime.packed_linear import PackedTernaryLinear
from ..runtime.tables import install_quantized_table
from ..spec import PACKED_FORMAT_NAME, PACKED_VERSION_DENSE, PACKED_VERSION_TABLES, PACKED_VERSIONS, Q4_GROUP
from .folders import load_state_dict_strict, model_state_for_saving
from .fs import atomic_dir, read_json

EMB = "backbone.embedding"


# ------------------------------------------------------------------ export
def export_packed(model, out: Path, packing: str = "tq2", other_dtype: str = "fp16",
                  tokenizer_path: Path | None = None, source: str = "", embedding: str = "fp16") -> dict:
    """Write a packed folder from a fake-quant student (a model with TernaryLinear modules).  embedding:
    "fp16" (stored in other_dtype like every other tensor), or "int8" / "q4" (the tied embedding and head as one
    quantized table, quant/tables.py)."""
    from safetensors.torch import save_file
    if packing not in PER_BYTE:
        raise UserError(f"--format {packing}: choose tq2 or tq1")
    dt = {"fp16": torch.float16, "fp32": torch.float32}[other_dtype]
    mods = ternary_modules(model)
    if not mods:
        raise UserError("nothing to export: the model has no ternary modules")
    if any(m.has_corrections for _, m in mods):
        raise UserError("this model carries post-hoc corrections (bias / low-rank), which the packed format "
                        "does not hold; export a plain PTQ, QEP or QAT student")
    if embedding not in TABLE_FORMATS:
        raise UserError(f"--embedding {embedding}: choose from {', '.join(TABLE_FORMATS)}")
    tensors, header_t = {}, {}
    skip = set()
    if embedding != "fp16":
        if not model.config.tie_embeddings:
            raise UserError(f"--embedding {embedding} needs a tied head (this model's lm_head is separate)")
        try:
            check_table_format(embedding, model.config.d_model)
        except ValueError as e:
            raise UserError(f"--embedding {embedding}: {e}") from None
        tensors[f"{EMB}.codes"], tensors[f"{EMB}.scales"] = quantize_table(model.backbone.embedding.weight, embedding)
        skip.add(f"{EMB}.weight")
    for name, m in mods:
        tensors[f"{name}.codes"], tensors[f"{name}.scales"] = packed_codes(m, packing)
        header_t[name] = {"shape": [m.out_features, m.in_features], "group_size": m.group_size}
        skip |= {f"{name}.weight", f"{name}.scale", f"{name}.log_scale"}
    for k, v in model_state_for_saving(model).items():
        if k not in skip:
            tensors[k] = v.to(dt).contiguous()
    version = PACKED_VERSION_DENSE if embedding == "fp16" else PACKED_VERSION_TABLES
    header = {"format": PACKED_FORMAT_NAME, "format_version": version,
              "packing": packing,
              "other_dtype": other_dtype, "architecture": "mamba2", "config": model.config.to_dict(),
              "ternary": header_t, "tokenizer": "tokenizer.json" if tokenizer_path else None, "source": source}
    if embedding != "fp16":
        header["embedding"] = embedding
    with atomic_dir(Path(out)) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"ternary_mamba": json.dumps(header)})
        (tmp / "config.json").write_text(json.dumps(header, indent=2) + "\n")
        if tokenizer_path:
            import shutil
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        from .hf import card_facts, model_card
        facts = card_facts(Path(source.split(" (")[0])) if source else {}
        size = (tmp / "model.safetensors").stat().st_size / 1e6
        (tmp / "README.md").write_text(model_card(model, source or str(out), packing, {**facts, "size_mb": round(size, 2)}))
    return header


# ------------------------------------------------------------------ load
def _check_header(h: dict, folder: Path) -> None:
    if type(h.get("format_version")) is not int or h["format_version"] not in PACKED_VERSIONS:
        raise UserError(f"{folder}: packed format version {h.get('format_version')!r} is not supported "
                        f"(this ternary-mamba reads versions {', '.join(map(str, PACKED_VERSIONS))})")
    emb = h.get("embedding", "fp16")
    if emb not in TABLE_FORMATS or (emb != "fp16" and h["format_version"] < PACKED_VERSION_TABLES):
        raise UserError(f"{folder}: header \"embedding\": {emb!r} is not a table format of version "
                        f"{h['format_version']} ({', '.join(TABLE_FORMATS)}; quantized ones need version 2)")
    if not isinstance(h.get("packing"), str) or h["packing"] not in PER_BYTE:
        raise UserError(f"{folder}: unknown packing {h.get('packing')!r} (expected tq2 or tq1)")
    if not isinstance(h.get("ternary"), dict) or not h["ternary"]:
        raise UserError(f"{folder}: header lists no ternary modules")
    if not isinstance(h.get("config"), dict):
        raise UserError(f"{folder}: header has no model config (\"config\" must be an object)")
    for name, spec in h["ternary"].items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        G = spec.get("group_size") if isinstance(spec, dict) else None
        if not (isinstance(shape, list) and len(shape) == 2 and all(_is_count(v) for v in shape) and _is_count(G)):
            raise UserError(f"{folder}: header entry {name!r} needs \"shape\": [out, in] and \"group_size\", "
                            f"positive integers; got {spec!r:.120}")


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 31


def _check_codes(codes: torch.Tensor, where: str) -> None:
    """tq2 bytes hold four 2-bit fields in {0, 1, 2}; a 3 would decode differently on each path."""
    c = codes.reshape(-1)
    bad = ((c & 3) == 3) | ((c >> 2 & 3) == 3) | ((c >> 4 & 3) == 3) | ((c >> 6 & 3) == 3)
    if bool(bad.any()):
        raise UserError(f"{where}: invalid tq2 byte {int(c[bad][0])} at offset {int(bad.nonzero()[0])} "
                        "(a 2-bit field equal to 3); the file is corrupt")


def _check_finite(t: torch.Tensor, where: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise UserError(f"{where}: holds NaN or infinite values; the file is corrupt")


def load_packed(folder: Path):
    from safetensors import SafetensorError, safe_open
    folder = Path(folder)
    h = read_json(folder / "config.json")
    _check_header(h, folder)
    try:
        cfg = Mamba2Config.from_dict(h["config"])
    except TypeError as e:
        raise UserError(f"{folder / 'config.json'}: bad model config ({e})") from None
    packing, per = h["packing"], PER_BYTE[h["packing"]]
    path = folder / "model.safetensors"
    try:
        f = safe_open(str(path), "pt")  # memory-mapped
        keys = set(f.keys())
        get = f.get_tensor
    except (SafetensorError, OSError, RuntimeError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    with torch.device("meta"):
        model = Mamba2LM(cfg, init=False)
    model = model.to_empty(device="cpu")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.backbone.embedding.weight
    for name, spec in h["ternary"].items():
        out_f, in_f = spec["shape"]
        G = spec["group_size"]
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{folder}: header names ternary module {name!r} that the model does not have") from None
        if (lin.out_features, lin.in_features) != (out_f, in_f) or G < 1 or in_f % G or in_f % 4:
            raise UserError(f"{folder}: {name} header shape {spec['shape']} / group {G} does not match the config")
        for suffix in ("codes", "scales"):
            if f"{name}.{suffix}" not in keys:
                raise UserError(f"{path}: missing tensor {name}.{suffix}")
        codes, scales = get(f"{name}.codes"), get(f"{name}.scales")
        if codes.dtype != torch.uint8 or codes.numel() != -(-out_f * in_f // per):
            raise UserError(f"{path}: {name}.codes has {codes.numel()} bytes, header needs {-(-out_f * in_f // per)}")
        if scales.dtype != torch.float16 or tuple(scales.shape) != (out_f, in_f // G):
            raise UserError(f"{path}: {name}.scales has shape {tuple(scales.shape)}, expected {(out_f, in_f // G)}")
        if packing == "tq1":  # re-pack once to the 2-bit layout the kernel reads
            try:
                codes = pack(unpack(codes, "tq1", (out_f, in_f)), "tq2")
            except ValueError as e:
                raise UserError(f"{path}: {name}.codes: {e}") from None
        else:
            _check_codes(codes, f"{path}: {name}.codes")
        _check_finite(scales, f"{path}: {name}.scales")
        bias = get(f"{name}.bias") if f"{name}.bias" in keys else None
        if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (out_f,)):
            raise UserError(f"{path}: {name}.bias has shape {tuple(bias.shape)} ({bias.dtype}); expected ({out_f},)")
        if bias is not None:
            _check_finite(bias, f"{path}: {name}.bias")
        packed = PackedTernaryLinear(codes.view(out_f, in_f // 4), scales, in_f, G, bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, packed)
        keys -= {f"{name}.codes", f"{name}.scales", f"{name}.bias"}
    if h.get("embedding", "fp16") != "fp16":
        keys -= _load_quantized_embedding(model, h["embedding"], get, keys, path)
    rest = {k: get(k) for k in keys}
    for k, v in rest.items():
        _check_finite(v, f"{path}: {k}")
    load_state_dict_strict(model, rest, str(path))
    if h.get("other_dtype") == "fp16" and cfg.tie_embeddings and h.get("embedding", "fp16") == "fp16":
        # the stored fp16 head, read at half the bytes of fp32, same values
        model.lm_head = Fp16Head(model.backbone.embedding.weight)
    model.packed_header = h
    return model.eval()


def _load_quantized_embedding(model, fmt: str, get, keys: set, path: Path) -> set:
    """Install the quantized table as the embedding and the tied head; returns the keys it consumed."""
    cfg = model.config
    if not cfg.tie_embeddings:
        raise UserError(f"{path}: a quantized embedding needs tie_embeddings in the config")
    for suffix in ("codes", "scales"):
        if f"{EMB}.{suffix}" not in keys:
            raise UserError(f"{path}: missing tensor {EMB}.{suffix} (header says embedding {fmt})")
    codes, scales = get(f"{EMB}.codes"), get(f"{EMB}.scales")
    V, d = cfg.padded_vocab_size, cfg.d_model
    want_codes = (torch.int8, (V, d)) if fmt == "int8" else (torch.uint8, (V, d // 2))
    want_scales = (V,) if fmt == "int8" else (V, d // Q4_GROUP)
    if fmt == "q4" and d % Q4_GROUP:
        raise UserError(f"{path}: q4 embedding needs d_model a multiple of 32 (config has {d})")
    if (codes.dtype, tuple(codes.shape)) != want_codes:
        raise UserError(f"{path}: {EMB}.codes is {codes.dtype} {tuple(codes.shape)}, expected {want_codes[0]} "
                        f"{want_codes[1]} for a {fmt} table")
    if scales.dtype != torch.float16 or tuple(scales.shape) != want_scales:
        raise UserError(f"{path}: {EMB}.scales is {scales.dtype} {tuple(scales.shape)}, expected float16 {want_scales}")
    _check_finite(scales, f"{path}: {EMB}.scales")
    install_quantized_table(model, codes, scales, fmt)
    return {f"{EMB}.codes", f"{EMB}.scales"}
