"""Bit packing of ternary codes (pure functions; inputs are never modified).

tq2: 4 codes per byte, code+1 in 2 bits, little end first:  byte = Σ_j (t_j + 1) << 2j
tq1: 5 codes per byte, base 3:                               byte = Σ_j (t_j + 1) · 3^j   (≤ 242)
Both pack the row-major flattened matrix, padding the tail with code 0 (t = 0)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..spec import PER_BYTE, TQ1_MAX_BYTE, TQ2_INVALID_FIELD


def pack(codes: Tensor, packing: str) -> Tensor:
    """int8 codes in {-1, 0, 1} (any shape) -> uint8 (ceil(n / per_byte),)."""
    k = PER_BYTE[packing]
    flat = codes.reshape(-1).to(torch.int32) + 1
    if flat.numel() and (flat.min() < 0 or flat.max() > 2):
        raise ValueError("codes must be in {-1, 0, 1}")
    pad = (-flat.numel()) % k
    flat = torch.cat([flat, torch.ones(pad, dtype=torch.int32, device=flat.device)]).view(-1, k)
    if packing == "tq2":
        weights = torch.tensor([1, 4, 16, 64], dtype=torch.int32, device=flat.device)
    else:
        weights = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=flat.device)
    return (flat * weights).sum(1).to(torch.uint8)


def unpack(packed: Tensor, packing: str, shape: tuple[int, ...]) -> Tensor:
    """uint8 packed bytes -> int8 codes of `shape`."""
    k = PER_BYTE[packing]
    n = 1
    for s in shape:
        n *= s
    if packed.numel() != -(-n // k):
        raise ValueError(f"{packed.numel()} bytes cannot hold {n} codes packed {k} per byte")
    b = packed.to(torch.int32)[:, None]
    if packing == "tq2":
        digits = (b >> torch.tensor([0, 2, 4, 6], dtype=torch.int32, device=b.device)) & 3
    else:
        digits = (b // torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=b.device)) % 3
    if packing == "tq2" and (digits == TQ2_INVALID_FIELD).any():
        raise ValueError(f"invalid tq2 byte (a 2-bit field equal to {TQ2_INVALID_FIELD})")
    if packing == "tq1" and (packed > TQ1_MAX_BYTE).any():
        raise ValueError(f"invalid tq1 byte (> {TQ1_MAX_BYTE})")
    return (digits.reshape(-1)[:n] - 1).to(torch.int8).reshape(shape)
