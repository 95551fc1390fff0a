"""A small GPT-style Transformer in plain PyTorch: the claims experiment's control architecture.

Pre-norm blocks of causal self-attention (rotary positions, `scaled_dot_product_attention`) and a GELU MLP,
RMSNorm, tied embedding / head.  Module names follow the Mamba-2 model where they can (`backbone.embedding`,
`backbone.layers[i]`, `backbone.norm_f`, `lm_head`) and every projection is an `in_proj` / `out_proj` (attention:
qkv and output; MLP: up and down), so the same trainer, distillation objective and ternary quantizer apply to
it unchanged.  It knows nothing of quantization or training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .model import RMSNorm


@dataclass
class GPTConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 8
    d_ff: int = 1152          # 4 layers x (4 d² + 2 d d_ff) + the 8192 x 256 embedding ≈ the teacher's 5.57 M
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_embeddings: bool = True
    architecture: str = "gpt"

    @classmethod
    def matching(cls, n_params: int, vocab_size: int, d_model: int) -> "GPTConfig":
        """The GPT of width d_model whose parameter count is nearest n_params (d_ff = 4.5 d_model, heads of 32)."""
        d, d_ff = d_model, d_model * 9 // 2
        per_layer = 4 * d * d + 2 * d * d_ff + 2 * d
        n_layer = max(1, round((n_params - vocab_size * d) / per_layer))
        return cls(vocab_size=vocab_size, d_model=d, n_layer=n_layer, n_head=max(1, d // 32), d_ff=d_ff)

    @property
    def n_params(self) -> int:
        d = self.d_model
        return self.vocab_size * d + self.n_layer * (4 * d * d + 2 * d * self.d_ff + 2 * d) + d


def rotary(x: Tensor, base: float) -> Tensor:
    """x (b, h, l, hd) with rotary position embedding applied (pairs of the first and second half)."""
    l, hd = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    ang = torch.arange(l, device=x.device, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c = c
        self.in_proj = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
        self.out_proj = nn.Linear(c.d_model, c.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, l, d = x.shape
        h = self.c.n_head
        q, k, v = self.in_proj(x).view(b, l, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k = rotary(q, self.c.rope_base), rotary(k, self.c.rope_base)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(b, l, d))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.in_proj = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.out_proj = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(F.gelu(self.in_proj(x)))


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.norm, self.mixer = RMSNorm(c.d_model, c.norm_eps), Attention(c)
        self.norm2, self.mlp = RMSNorm(c.d_model, c.norm_eps), MLP(c)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.mixer(self.norm(h))
        return h + self.mlp(self.norm2(h))


class Backbone(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.embedding = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm_f = RMSNorm(c.d_model, c.norm_eps)


class GPTLM(nn.Module):
    def __init__(self, c: GPTConfig, seed: int | None = None):
        super().__init__()
        self.config = c
        self.backbone = Backbone(c)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.lm_head.weight = self.backbone.embedding.weight
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = c.initializer_range / (math.sqrt(2 * c.n_layer) if name.endswith("out_proj.weight") else 1)
                    nn.init.normal_(p, std=std, generator=gen)

    def forward(self, input_ids: Tensor, *, return_hidden: bool = False):
        """input_ids (b, l) -> logits (b, l, vocab); return_hidden: also the residual stream after each block."""
        h = self.backbone.embedding(input_ids)
        hidden = []
        for layer in self.backbone.layers:
            h = layer(h)
            hidden.append(h)
        logits = self.lm_head(self.backbone.norm_f(h))
        return (logits, hidden) if return_hidden else logits
