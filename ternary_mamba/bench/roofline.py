"""The bytes a decode step moves, by what is read (the roofline's numerator, `bench decode`), and which kernels the
decode engine runs for them."""
from __future__ import annotations

import torch


def _ssm_state_bytes(model) -> int:
    """Every layer's SSM state (nheads x headdim x d_state, fp32 or bf16: `use_bf16_state`) read and written."""
    from ..runtime.decode_engine import state_dtype
    c = model.config
    return 2 * state_dtype(model).itemsize * c.n_layer * c.nheads * c.headdim * c.d_state


def state_bytes_per_token(model) -> int:
    """The recurrent state a decode step reads and writes back: every layer's SSM state (`_ssm_state_bytes`) and
    fp32 conv window (conv_dim x (d_conv - 1)), twice."""
    c = model.config
    return _ssm_state_bytes(model) + 2 * 4 * c.n_layer * c.conv_dim * (c.d_conv - 1)


def bytes_per_token(model) -> int:
    """Bytes a decode step moves: every weight buffer/parameter once (but one embedding row where the head does not
    read the embedding) plus the recurrent state read and written (`state_bytes_per_token`): the roofline's bytes."""
    return weight_bytes_per_token(model) + state_bytes_per_token(model)


def _engine_bytes(model) -> dict[int, int]:
    """Bytes per token of the buffers the decode engine reads in a layout of its own, by id: the packed projections'
    fp32 scales that its r32 and lut kernels (csrc/decode_r32.c, decode_lut.c) hold in fp16 (half their bytes), and
    the codes the lut kernel holds as 5-bit indexes of weight triples (ceil(G / 18) dwords per row and group: tq2's
    bytes at G = 128, fewer at some larger G)."""
    from ..ops import decode_layouts
    from ..runtime.decode_engine import engine_for
    eng = engine_for(model)
    if eng is None:
        return {}
    kinds = eng.kernel_kinds()
    lins = [lin for layer in model.backbone.layers for lin in (layer.mixer.in_proj, layer.mixer.out_proj)]
    out = {}
    for lin, k in zip(lins, kinds):
        if k in ("tq2_r32", "tq2_lut"):
            out[id(lin.scales)] = 2 * lin.scales.numel()
        if k == "tq2_lut":      # per row: the layout's bytes per block of rows over its rows (the kernel's own count)
            per_block = decode_layouts.block_bytes("lut", lin.in_features, lin.group_size)
            out[id(lin.codes)] = lin.out_features * per_block // decode_layouts.ROWS_PER_BLOCK["lut"]
    return out


def kernel_summary(model) -> str:
    """Which decode kernels ran, counted (e.g. 'tq2_r32 x96, q4_a8 x1'), or 'module path' without the engine."""
    from collections import Counter
    from ..runtime.decode_engine import engine_for
    eng = engine_for(model)
    return ", ".join(f"{k} x{n}" for k, n in Counter(eng.kernel_kinds()).items()) if eng else "module path"


def bytes_breakdown(model) -> dict[str, int]:
    """`bytes_per_token` by what is read: ternary codes, their scales, dense projection weights, the output head,
    the embedding row, the small per-layer tensors (norms, conv, A, D, dt bias), and the SSM and conv states read
    and written.  The parts sum to `bytes_per_token`."""
    from ..runtime.packed_linear import PackedTernaryLinear
    c = model.config
    out = {"codes": 0, "scales": 0, "dense weights": 0, "head": 0, "embedding row": 0, "small tensors": 0,
           "ssm state": _ssm_state_bytes(model),
           "conv state": 2 * 4 * c.n_layer * c.conv_dim * (c.d_conv - 1)}
    emb = getattr(model.backbone.embedding, "weight", None)
    head_reads_emb = emb is not None and getattr(model.lm_head, "weight", None) is emb
    seen, relaid = set(), _engine_bytes(model)
    for mname, mod in model.named_modules():
        for pname, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            n = relaid.get(id(t), t.numel() * t.element_size())
            if t is emb:
                out["head" if head_reads_emb else "embedding row"] += n if head_reads_emb else t.size(1) * t.element_size()
            elif mname == "lm_head" or mname.startswith("lm_head."):
                out["head"] += n
            elif isinstance(mod, PackedTernaryLinear):
                out["codes" if pname == "codes" else "scales" if pname == "scales" else "small tensors"] += n
            elif isinstance(mod, torch.nn.Linear) and t.dim() == 2:
                out["dense weights"] += n
            else:
                out["small tensors"] += n
    return out


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: every buffer/parameter once (those the engine keeps in a layout of its
    own at that layout's size: `_engine_bytes`), but only one embedding row (tied head reads all)."""
    seen, total, relaid = set(), 0, _engine_bytes(model)
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += relaid.get(id(t), t.numel() * t.element_size())
    emb = getattr(model.backbone.embedding, "weight", None)   # None: a quantized table the head reads too
    if emb is not None and getattr(model.lm_head, "weight", None) is not emb:  # the head no longer reads the embedding: one row
        total -= emb.numel() * emb.element_size() - emb.size(1) * emb.element_size()
    return total
