"""A quantized embedding and the tied output head that reads the same codes (formats in quant/tables.py).

`QuantizedEmbedding` replaces `backbone.embedding` and `QuantizedHead` the tied `lm_head` of a packed model
whose table was exported with `--embedding int8|q4`: both hold the file's codes as loaded (no fp16 or fp32 copy
of the table), the lookup dequantizes only the rows it returns, and the head multiplies straight from the codes
(csrc/tables.c: `q4_gemv`, `i8_gemv` in csrc/tq2_gemv.c) for decode-sized inputs.  Longer inputs (perplexity,
prefill of all positions) dequantize blocks of rows and use the fp32 GEMM."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.dispatch import kernels_for
from ..spec import GEMV_MAX_ROWS
from ..ops.kernels import i8_gemv, q4_gemv, table_rows
from ..quant.tables import dequantize_table

HEAD_BLOCK_ROWS = 8192   # rows dequantized at a time by the head's GEMM path (32 MB of fp32 at d = 1024)


class QuantizedEmbedding(nn.Module):
    def __init__(self, codes: Tensor, scale: Tensor, fmt: str):
        super().__init__()
        self.fmt = fmt
        self.register_buffer("codes", codes, persistent=False)            # int8 (V, d) | uint8 (V, d/2)
        self.register_buffer("scale", scale.float().contiguous(), persistent=False)  # (V,) | (V, d/32)
        self.num_embeddings = codes.size(0)
        self.embedding_dim = codes.size(1) * (2 if fmt == "q4" else 1)

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        if kernels_for(self.scale) and self.codes.device.type == "cpu" and flat.device.type == "cpu":
            rows = table_rows(self.codes, self.scale, flat.long())
        else:
            rows = dequantize_table(self.codes, self.scale, self.fmt, flat)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.fmt}"


class QuantizedHead(nn.Module):
    """logits = x . W^T with W the embedding's quantized table (the tied head), or a table of the head's own
    (tied=False: `runtime.heads.use_q4_head`, the embedding keeps its weights)."""

    def __init__(self, emb: QuantizedEmbedding, tied: bool = True):
        super().__init__()
        self.fmt, self.tied = emb.fmt, tied
        self.in_features, self.out_features = emb.embedding_dim, emb.num_embeddings
        self.a8 = False   # opt-in (use_a8_activations): int8 activations and VNNI products; not exact
        if tied:          # the embedding's buffers, shared, not copied
            self.codes, self.scale = emb.codes, emb.scale
        else:             # the head's own table: buffers, so that size and bytes-per-token counts see it
            self.register_buffer("codes", emb.codes, persistent=False)
            self.register_buffer("scale", emb.scale, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.size(0) <= GEMV_MAX_ROWS and self.codes.device.type == "cpu" and kernels_for(x2, self.scale, dtype=None):
            x2 = x2.float()
            y = q4_gemv(self.codes, self.scale, x2, self.a8) if self.fmt == "q4" else i8_gemv(self.codes, self.scale, x2)
        else:
            y = torch.cat([F.linear(x2.float(), dequantize_table(self.codes[i:i + HEAD_BLOCK_ROWS],
                                                                 self.scale[i:i + HEAD_BLOCK_ROWS], self.fmt))
                           for i in range(0, self.out_features, HEAD_BLOCK_ROWS)], dim=-1)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, format={self.fmt}" + (" (tied to the embedding)" if self.tied else "")


def use_quantized_embedding(model, fmt: str) -> None:
    """Quantize a model's tied embedding + head in place to `fmt` ("int8" / "q4"), exactly as a packed folder
    exported with `--embedding fmt` stores them (to measure what that costs on any model, e.g. `ppl
    --quantized-embedding`)."""
    from ..quant.tables import quantize_table
    emb = getattr(model.backbone.embedding, "weight", None)
    if not model.config.tie_embeddings or emb is None:
        raise ValueError("a quantized embedding needs a model whose tied embedding is still dense")
    install_quantized_table(model, *quantize_table(emb, fmt), fmt)


def install_quantized_table(model, codes: Tensor, scale: Tensor, fmt: str) -> None:
    """Make (codes, scale) in `fmt` the model's embedding and its tied head: one table, shared, not copied."""
    emb = QuantizedEmbedding(codes, scale, fmt)
    model.backbone.embedding = emb
    model.lm_head = QuantizedHead(emb)
