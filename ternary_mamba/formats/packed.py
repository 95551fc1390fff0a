"""The packed ternary checkpoint (docs/PACKED_FORMAT.md): writing one, and reading one back as a checked header
and tensors.  Pure serialization: building a model from it is `runtime.packed_model.load_packed`.

A packed folder holds config.json (the self-describing header) and model.safetensors with, per ternary
module `<name>`: `<name>.codes` (uint8, the packed flattened codes) and `<name>.scales` (fp16,
(out, in // G)); every other tensor in fp16 (or fp32), the tied embedding stored once.  `read_packed` returns
the ternary weights as 2-bit codes (tq1 re-packed once to the layout the kernels read)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.config import Mamba2Config
from ..errors import UserError
from ..ops.packing import pack, unpack
from ..quant.qat import packed_codes, ternary_modules
from ..quant.tables import check_table_format, quantize_table
from ..spec import (PACKED_FORMAT_NAME, PACKED_VERSION_DENSE, PACKED_VERSION_TABLES, PACKED_VERSIONS, PER_BYTE,
                    Q4_GROUP, TABLE_FORMATS, TQ2_INVALID_FIELD)
from .folders import model_state_for_saving
from .fs import atomic_dir, read_json, save_safetensors

EMB = "backbone.embedding"


# ------------------------------------------------------------------ export
def export_packed(model, out: Path, packing: str = "tq2", other_dtype: str = "fp16",
                  tokenizer_path: Path | None = None, source: str = "", embedding: str = "fp16") -> dict:
    """Write a packed folder from a fake-quant student (a model with TernaryLinear modules).  embedding:
    "fp16" (stored in other_dtype like every other tensor), or "int8" / "q4" (the tied embedding and head as one
    quantized table, quant/tables.py)."""
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
        save_safetensors(tensors, tmp / "model.safetensors", metadata={"ternary_mamba": json.dumps(header)})
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
    bad = sum(((c >> s & 3) == TQ2_INVALID_FIELD).to(torch.uint8) for s in (0, 2, 4, 6)).bool()
    if bool(bad.any()):
        raise UserError(f"{where}: invalid tq2 byte {int(c[bad][0])} at offset {int(bad.nonzero()[0])} "
                        "(a 2-bit field equal to 3); the file is corrupt")


def _check_finite(t: torch.Tensor, where: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise UserError(f"{where}: holds NaN or infinite values; the file is corrupt")


@dataclass
class TernaryTensors:
    """One ternary projection as read: 2-bit codes (out, in / 4) uint8, fp16 scales (out, in / G), bias or None."""
    shape: tuple[int, int]
    group_size: int
    codes: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None


@dataclass
class PackedRead:
    """A packed folder, read and checked: its header, model config, ternary projections, the quantized embedding
    table (format, codes, scales) if any, and every other tensor by name."""
    header: dict
    config: Mamba2Config
    ternary: dict[str, TernaryTensors]
    table: tuple[str, torch.Tensor, torch.Tensor] | None
    rest: dict[str, torch.Tensor] = field(default_factory=dict)


def read_packed(folder: Path) -> PackedRead:
    """Read and check a packed folder (header, every tensor's dtype and shape against it, codes, finiteness)."""
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
    ternary = {}
    for name, spec in h["ternary"].items():
        out_f, in_f = spec["shape"]
        G = spec["group_size"]
        want = {"in_proj": (cfg.d_in_proj, cfg.d_model), "out_proj": (cfg.d_model, cfg.d_inner)}.get(name.rsplit(".", 1)[-1])
        if want is not None and (out_f, in_f) != want:
            raise UserError(f"{folder}: {name} header shape {spec['shape']} does not match the config ({list(want)})")
        if in_f % G or in_f % 4:
            raise UserError(f"{folder}: {name} header shape {spec['shape']} / group {G}: groups must divide the "
                            "row and rows hold whole bytes of 2-bit codes")
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
        ternary[name] = TernaryTensors((out_f, in_f), G, codes.view(out_f, in_f // 4), scales, bias)
        keys -= {f"{name}.codes", f"{name}.scales", f"{name}.bias"}
    table = None
    if h.get("embedding", "fp16") != "fp16":
        table = _read_table(cfg, h["embedding"], get, keys, path)
        keys -= {f"{EMB}.codes", f"{EMB}.scales"}
    rest = {k: get(k) for k in keys}
    for k, v in rest.items():
        _check_finite(v, f"{path}: {k}")
    return PackedRead(h, cfg, ternary, table, rest)


def _read_table(cfg: Mamba2Config, fmt: str, get, keys: set, path: Path) -> tuple[str, torch.Tensor, torch.Tensor]:
    """The quantized embedding + tied head table: (format, codes, scales), checked against the config."""
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
        raise UserError(f"{path}: q4 embedding needs d_model a multiple of {Q4_GROUP} (config has {d})")
    if (codes.dtype, tuple(codes.shape)) != want_codes:
        raise UserError(f"{path}: {EMB}.codes is {codes.dtype} {tuple(codes.shape)}, expected {want_codes[0]} "
                        f"{want_codes[1]} for a {fmt} table")
    if scales.dtype != torch.float16 or tuple(scales.shape) != want_scales:
        raise UserError(f"{path}: {EMB}.scales is {scales.dtype} {tuple(scales.shape)}, expected float16 {want_scales}")
    _check_finite(scales, f"{path}: {EMB}.scales")
    return fmt, codes, scales
