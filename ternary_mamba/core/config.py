"""Mamba-2 configuration: a typed dataclass with mamba_ssm's field names, named presets, and parameter counts
by component (from a config alone, no weights needed)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import UserError
from ..spec import check_chunk_size

MB = 1e6  # sizes are reported in decimal megabytes, as the paper does (2,687.5 MB for Mamba-2 1.3B)


MAX_PARAMS = 20_000_000_000     # a config beyond these is refused unless TERNARY_MAMBA_ALLOW_LARGE=1: a typo
MAX_TENSOR = 1 << 31            # (d_model 65536) would otherwise try to allocate tens of GB before anything checks


def _allow_large() -> bool:
    import os
    v = os.environ.get("TERNARY_MAMBA_ALLOW_LARGE", "0")
    if v not in ("0", "1"):
        raise UserError(f"TERNARY_MAMBA_ALLOW_LARGE={v!r:.20}: expected 0 or 1")
    return v == "1"


@dataclass
class Mamba2Config:
    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    # chunk length of the SSD scan; a compute knob, not part of the math (64 is ~2x faster than 256 on CPU)
    chunk_size: int = 64
    pad_vocab_size_multiple: int = 16
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    conv_bias: bool = True
    bias: bool = False  # bias of in_proj / out_proj (released checkpoints: False)
    # initialisation (mamba_ssm defaults); only used when building a fresh model
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_min: float = 1.0
    A_init_max: float = 16.0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "headdim",
                     "ngroups", "chunk_size", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"config: {name} must be a positive integer, got {value!r}")
        check_chunk_size(self.chunk_size, "config: chunk_size")
        if self.d_conv > 16:
            raise UserError(f"config: d_conv {self.d_conv} is larger than 16 (released models use 4)")
        for name in ("norm_eps", "dt_min", "dt_max", "dt_init_floor", "A_init_min", "A_init_max", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value == value \
                    or value <= 0 or value == float("inf"):
                raise UserError(f"config: {name} must be a positive number, got {value!r}")
        for name in ("tie_embeddings", "conv_bias", "bias"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"config: {name} must be true or false, got {getattr(self, name)!r}")
        if self.d_inner % self.headdim:
            raise UserError(f"config: d_inner={self.d_inner} (expand*d_model) is not a multiple of headdim={self.headdim}")
        if self.nheads % self.ngroups:
            raise UserError(f"config: nheads={self.nheads} is not a multiple of ngroups={self.ngroups}")
        big = max(self.d_in_proj * self.d_model, self.padded_vocab_size * self.d_model)
        if (self.n_params > MAX_PARAMS or big > MAX_TENSOR) and not _allow_large():
            raise UserError(f"config: {self.n_params / 1e9:.1f} B parameters, largest tensor {big / 1e9:.2f} B values: "
                            f"beyond this toolkit's limits ({MAX_PARAMS / 1e9:.0f} B, {MAX_TENSOR / 1e9:.2f} B; the "
                            f"largest Mamba-2 is 2.7 B); set TERNARY_MAMBA_ALLOW_LARGE=1 if you mean it")

    # ---- derived sizes (names as in mamba_ssm) ----
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:  # channels of xBC
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def d_in_proj(self) -> int:  # [z | x | B | C | dt]
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def n_params(self) -> int:
        return sum(count_params_by_component(self).values())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Mamba2Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"config: unknown fields {unknown}")
        return cls(**d)

    def replace(self, **kw) -> "Mamba2Config":
        return dataclasses.replace(self, **kw)


# Shapes of the released state-spaces checkpoints, and the project's small ones.
PRESETS: dict[str, dict] = {
    "mamba2-130m": dict(d_model=768, n_layer=24),
    "mamba2-370m": dict(d_model=1024, n_layer=48),
    "mamba2-780m": dict(d_model=1536, n_layer=48),
    "mamba2-1.3b": dict(d_model=2048, n_layer=48),
    "mamba2-2.7b": dict(d_model=2560, n_layer=64),
    # ~5 M parameters: the shape `bench model` trains
    "bench-5m": dict(d_model=256, n_layer=6, d_state=64, headdim=32, vocab_size=8192),
    # the bundled teacher's shape (see assets/teacher/README.md)
    "teacher-8k": dict(d_model=256, n_layer=8, d_state=64, headdim=32, vocab_size=8192),
    # tests
    "tiny": dict(d_model=64, n_layer=2, d_state=16, headdim=16, vocab_size=512, chunk_size=16),
}


def count_params_by_component(cfg: Mamba2Config) -> dict[str, int]:
    L = cfg.n_layer
    emb = cfg.padded_vocab_size * cfg.d_model
    counts = {
        "embedding": emb,
        "lm_head": 0 if cfg.tie_embeddings else emb,
        "in_proj": L * (cfg.d_model * cfg.d_in_proj + (cfg.d_in_proj if cfg.bias else 0)),
        "out_proj": L * (cfg.d_inner * cfg.d_model + (cfg.d_model if cfg.bias else 0)),
        "conv1d": L * (cfg.conv_dim * cfg.d_conv + (cfg.conv_dim if cfg.conv_bias else 0)),
        "A_log/D/dt_bias": L * 3 * cfg.nheads,
        "norms": L * (cfg.d_model + cfg.d_inner) + cfg.d_model,
    }
    return counts


def train_flops_per_token(cfg: Mamba2Config) -> float:
    """FLOPs of one training token (forward + backward) of a plain next-token step: 6 x matmul parameters
    (in/out_proj, lm_head) + the SSD's matmuls (forward 2x, backward 4x)."""
    mm = cfg.n_layer * (cfg.d_model * cfg.d_in_proj + cfg.d_inner * cfg.d_model) + cfg.d_model * cfg.padded_vocab_size
    k, n, p = cfg.chunk_size, cfg.d_state, cfg.headdim
    ssd = cfg.n_layer * cfg.nheads * (2 * k * n / cfg.headdim + 2 * k * p + 2 * p * n * 2 + 2 * p * n)
    return 6 * mm + 3 * ssd
