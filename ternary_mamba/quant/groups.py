"""Group sizes of grouped ternary quantization: the default, the check of a user's value and its resolution
against a matrix (-1 -> one group per row).  Pure Python, so configs can use it without importing torch."""
from __future__ import annotations

from ..errors import UserError

DEFAULT_GROUP_SIZE = 128   # weights per scale along in_features (the paper's setting)
GGUF_TQ_BLOCK = 256        # llama.cpp's TQ1_0 / TQ2_0: one scale per 256 weights (ops.dispatch.group_paths)


def check_group_size(group_size: int) -> int:
    """A group size as a user gives it: G > 0, or -1 for one scale per row.  Returns it unchanged."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size == 0 or group_size < -1:
        raise UserError(f"group size {group_size!r}: use a positive size (64, 128, 256) or -1 for one per row")
    return group_size


def resolve_group_size(group_size: int, in_features: int, name: str = "") -> int:
    """The group size a matrix with `in_features` columns actually uses (-1 -> in_features), checked to divide
    it.  Every module stores the resolved value; nothing downstream re-derives it."""
    G = in_features if check_group_size(group_size) == -1 else group_size
    if in_features % G:
        ok = [g for g in (32, 64, 128, 256) if in_features % g == 0]
        raise UserError(f"group size {G} does not divide in_features={in_features} of {name or 'a linear'}; "
                        f"use one of {ok or [-1]} (or -1 for one scale per row)")
    return G

# Quantized lookup tables (quant/tables.py; kept here, import-light, for the CLI's choices)
TABLE_FORMATS = ("fp16", "int8", "q4")   # the embedding + tied head of a packed model (`export --embedding`)
Q4_GROUP = 32                            # values per fp16 scale in a q4 table
