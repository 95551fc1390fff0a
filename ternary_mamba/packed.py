"""The packed ternary checkpoint (docs/PACKED_FORMAT.md): export, validation and loading.

A packed folder holds config.json (the self-describing header) and model.safetensors with, per ternary
module `<name>`: `<name>.codes` (uint8, the packed flattened codes) and `<name>.scales` (fp16,
(out, in // G)); every other tensor in fp16 (or fp32), the tied embedding stored once.

At load, ternary weights stay packed: tq2 codes are used as stored (memory-mapped), tq1 codes are
re-packed once to the 2-bit layout the kernel reads.  Decoding multiplies straight from the codes
(csrc/tq2_gemv.c); longer inputs (prefill) dequantize one matrix at a time into a scratch buffer and
use the fp32 GEMM.  `PackedTernaryLinear.reference = True` forces the pure-PyTorch path."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import PACKED_FORMAT_NAME, _read_json, atomic_dir, load_state_dict_strict
from .config import Mamba2Config
from .errors import UserError
from .quant.packing import PER_BYTE, pack, unpack
from .quant.ternary import dequantize

FORMAT_VERSION = 1
KERNEL_MAX_ROWS = 16  # up to this many tokens per call use the packed GEMV kernel
_SCRATCH: dict[str, Tensor | None] = {"w": None}   # dequantization buffer for prefill (no autograd)


class PackedTernaryLinear(nn.Module):
    reference = False  # class-wide switch: True = pure-PyTorch unpack + F.linear (the slow reference)

    def __init__(self, codes2: Tensor, scales16: Tensor, in_features: int, group_size: int, bias: Tensor | None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, codes2.size(0), group_size
        self.register_buffer("codes", codes2, persistent=False)          # (out, in/4) uint8, tq2 layout
        self.register_buffer("scales", scales16.float(), persistent=False)  # (out, in/G)
        self.register_buffer("bias", bias.float() if bias is not None else None, persistent=False)
        self.a8 = False  # opt-in: int8 activations in the decode GEMV (see use_a8_activations); not exact

    def dequantized_weight(self, scratch: bool = False) -> Tensor:
        """The fp32 weight.  scratch=True (no autograd only) writes it into a buffer shared by all packed
        modules: no fresh allocation (page faults, zeroing) per call, which costs more than the dequantization."""
        if not self.reference:
            from .kernels import get_kernel, tq2_dequant
            if get_kernel() is not None:
                out = None
                if scratch:
                    n = self.out_features * self.in_features
                    if _SCRATCH.get("w") is None or _SCRATCH["w"].numel() < n:
                        _SCRATCH["w"] = torch.empty(n)
                    out = _SCRATCH["w"][:n].view(self.out_features, self.in_features)
                return tq2_dequant(self.codes, self.scales, self.group_size, out)
        codes = unpack(self.codes.reshape(-1), "tq2", (self.out_features, self.in_features))
        return dequantize(codes, self.scales, self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if not self.reference and x2.size(0) <= KERNEL_MAX_ROWS and self.group_size % 8 == 0:
            from .kernels import get_kernel, tq2_gemv, tq2_gemv_a8
            if get_kernel() is not None:
                gemv = tq2_gemv_a8 if self.a8 and self.group_size % 128 == 0 else tq2_gemv
                y = gemv(self.codes, self.scales, x2.float(), self.group_size)
                if self.bias is not None:
                    y = y + self.bias
                return y.reshape(*lead, self.out_features)
        scratch = not torch.is_grad_enabled()   # the shared buffer is overwritten by the next call
        return F.linear(x, self.dequantized_weight(scratch), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, group_size={self.group_size}, packed=tq2"


# ------------------------------------------------------------------ export
def export_packed(model, out: Path, packing: str = "tq2", other_dtype: str = "fp16",
                  tokenizer_path: Path | None = None, source: str = "") -> dict:
    """Write a packed folder from a fake-quant student (a model with TernaryLinear modules)."""
    from safetensors.torch import save_file
    from .checkpoint import model_state_for_saving
    from .quant.qat import ternary_modules
    if packing not in PER_BYTE:
        raise UserError(f"--format {packing}: choose tq2 or tq1")
    dt = {"fp16": torch.float16, "fp32": torch.float32}[other_dtype]
    mods = ternary_modules(model)
    if not mods:
        raise UserError("nothing to export: the model has no ternary modules")
    if any(m.has_corrections for _, m in mods):
        raise UserError("this model carries post-hoc corrections (bias / low-rank), which the packed format "
                        "does not hold; export a plain PTQ, QEP or QAT student")
    tensors, header_t = {}, {}
    skip = set()
    for name, m in mods:
        codes, s16 = m.export()
        tensors[f"{name}.codes"] = pack(codes, packing)
        tensors[f"{name}.scales"] = s16.contiguous()
        header_t[name] = {"shape": [m.out_features, m.in_features], "group_size": m.group_size}
        skip |= {f"{name}.weight", f"{name}.scale"}
    for k, v in model_state_for_saving(model).items():
        if k not in skip:
            tensors[k] = v.to(dt).contiguous()
    header = {"format": PACKED_FORMAT_NAME, "format_version": FORMAT_VERSION, "packing": packing,
              "other_dtype": other_dtype, "architecture": "mamba2", "config": model.config.to_dict(),
              "ternary": header_t, "tokenizer": "tokenizer.json" if tokenizer_path else None, "source": source}
    with atomic_dir(Path(out)) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"ternary_mamba": json.dumps(header)})
        (tmp / "config.json").write_text(json.dumps(header, indent=2) + "\n")
        if tokenizer_path:
            import shutil
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
    return header


# ------------------------------------------------------------------ load
def _check_header(h: dict, folder: Path) -> None:
    if h.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{folder}: packed format version {h.get('format_version')!r} is not supported "
                        f"(this ternary-mamba reads version {FORMAT_VERSION})")
    if h.get("packing") not in PER_BYTE:
        raise UserError(f"{folder}: unknown packing {h.get('packing')!r} (expected tq2 or tq1)")
    if not isinstance(h.get("ternary"), dict) or not h["ternary"]:
        raise UserError(f"{folder}: header lists no ternary modules")


def load_packed(folder: Path):
    from safetensors import SafetensorError, safe_open
    from .model import Mamba2LM
    folder = Path(folder)
    h = _read_json(folder / "config.json")
    _check_header(h, folder)
    cfg = Mamba2Config.from_dict(h["config"])
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
        packed = PackedTernaryLinear(codes.view(out_f, in_f // 4), scales, in_f, G,
                                     get(f"{name}.bias") if f"{name}.bias" in keys else None)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, packed)
        keys -= {f"{name}.codes", f"{name}.scales", f"{name}.bias"}
    load_state_dict_strict(model, {k: get(k) for k in keys}, str(path))
    if h.get("other_dtype") == "fp16" and cfg.tie_embeddings:
        from .int8_head import Fp16Head   # the stored fp16 head, read at half the bytes of fp32, same values
        model.lm_head = Fp16Head(model.backbone.embedding.weight)
    model.packed_header = h
    return model.eval()


def use_a8_activations(model, enabled: bool = True) -> int:
    """Opt-in fast decode: packed projections quantize their input to int8 (one absmax scale per token) and use
    integer dot products, as llama.cpp's TQ2_0 does.  No longer bit-exact to the fake-quant student (≈ 1 %
    relative error per projection).  Needs groups that are a multiple of 128.  Returns how many modules use it."""
    n = 0
    for m in model.modules():
        if isinstance(m, PackedTernaryLinear) and m.group_size % 128 == 0:
            m.a8 = enabled
            n += 1
    return n
