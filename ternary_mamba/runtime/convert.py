"""`convert_(model)`: a fake-quant student (TernaryLinear modules) -> the same model with PackedTernaryLinear
modules, in memory (the codes are `quant.qat.packed_codes`, as in the packed export).  A test asserts the converted
model's logits equal the fake-quant model's."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UserError
from ..quant.qat import TernaryConfig, packed_codes, quantize_, ternary_modules
from .packed_linear import PackedTernaryLinear


@torch.no_grad()
def convert_(model: nn.Module) -> nn.Module:
    """Swap, in place, every TernaryLinear for a PackedTernaryLinear holding its 2-bit codes and fp16 scales.
    The latent full-precision weights are dropped; `model.ternary_config` moves to `model.converted_from`."""
    mods = ternary_modules(model)
    if not mods:
        raise UserError("convert_: the model has no ternary modules (quantize_ it, or load a QAT student)")
    for name, m in mods:
        codes, s16 = packed_codes(m, "tq2")
        bias = m.bias.detach() if m.bias is not None else None
        packed = PackedTernaryLinear(codes.view(m.out_features, m.in_features // 4), s16, m.in_features,
                                     m.group_size, bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, packed)
    model.converted_from = model.ternary_config
    model.ternary_config = None
    return model.eval()


@torch.no_grad()
def pack_if_ternary_(model: nn.Module) -> int | None:
    """A model whose projections are packed already (while a TQ2_0 / TQ1_0 GGUF was read: `load_for_decoding`) or
    exactly ternary though dense (an f16 GGUF export of a student: `adopt_ternary_`, then `convert_`, the same
    codes and scales, nothing re-quantized), made ready for the decode engine as a packed folder is: the head read
    in fp16 where the embedding holds fp16 values.  Returns the group size, or None (the model is unchanged)."""
    from ..quant.adopt import adopt_ternary_
    from .heads import head_weight, use_fp16_head
    packed = {m.group_size for m in model.modules() if isinstance(m, PackedTernaryLinear)}
    G = adopt_ternary_(model) if not packed else min(packed)
    if G is None:
        return None
    if not packed:
        convert_(model)
    w = head_weight(model).detach()
    if torch.equal(w.half().float(), w):
        use_fp16_head(model)
    model.packed_header = {"packed_in_memory": True, "group_size": G}
    return G


def ptq_pack_(model: nn.Module, group_size: int) -> nn.Module:
    """Absmean PTQ of a full-precision model's projections, packed (what the decode benchmarks run)."""
    return convert_(quantize_(model, TernaryConfig(group_size=group_size)))
