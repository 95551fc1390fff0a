"""A model from a packed folder: built on the meta device, its ternary projections swapped for
`PackedTernaryLinear` (the codes stay packed), the quantized embedding table installed, and every other tensor
loaded in place of its meta parameter (`assign=True`): no dense projection is ever materialized."""
from __future__ import annotations

from pathlib import Path

import torch

from ..core.model import Mamba2LM
from ..errors import UserError
from ..formats.folders import load_state_dict_strict
from ..formats.packed import read_packed
from .heads import Fp16Head
from .packed_linear import PackedTernaryLinear
from .tables import install_quantized_table


def load_packed(folder: Path) -> Mamba2LM:
    r = read_packed(folder)
    with torch.device("meta"):
        model = Mamba2LM(r.config, init=False)
    for name, t in r.ternary.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{folder}: header names ternary module {name!r} that the model does not have") from None
        if not isinstance(lin, torch.nn.Linear) or (lin.out_features, lin.in_features) != t.shape:
            raise UserError(f"{folder}: {name} header shape {list(t.shape)} does not match the config")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, PackedTernaryLinear(t.codes, t.scales, t.shape[1], t.group_size,
                                                                        t.bias))
    if r.table is not None:
        install_quantized_table(model, r.table[1], r.table[2], r.table[0])
    load_state_dict_strict(model, r.rest, str(Path(folder) / "model.safetensors"), assign=True)
    h = r.header
    if h.get("other_dtype") == "fp16" and r.config.tie_embeddings and h.get("embedding", "fp16") == "fp16":
        # the stored fp16 head, read at half the bytes of fp32, same values
        model.lm_head = Fp16Head(model.backbone.embedding.weight)
    meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if meta:
        raise UserError(f"{folder}: no tensor for {meta[:3]} in the packed file")
    model.packed_header = h
    return model.eval()
