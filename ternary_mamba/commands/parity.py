"""`ternary-mamba parity`: our Mamba-2 against transformers' Mamba2ForCausalLM on the same weights."""
from __future__ import annotations

from ..eval.parity import parity_report
from ..log import say


def parity(cfg) -> None:
    """cfg: commands.tool_configs.ParityConfig; prints the max abs logit differences."""
    parity_report(say, seqlen=cfg.seq_len, device=cfg.device, dtype=cfg.dtype)
