"""The numeric spec: every fact about the ternary formats and kernels that more than one module needs, once.

Everything above reads these names; a test (tests/test_spec.py) fails when one of them is re-declared or its
value written as a literal elsewhere.  Pure Python (no torch), so configs and the CLI can import it cheaply.

Groups       one scale per `G` consecutive weights along in_features; -1 (user input only) = one per row.
             `check_group_size` checks what a user gives, `resolve_group_size` turns it into the value a matrix
             uses; only resolved values are stored (modules, run records, packed headers) and passed on.
Scales       rounded to fp16 (or bf16 inside fp16's range) and clamped to [SCALE_MIN, max].
Codes        tq2: 4 codes per byte (code + 1 in 2 bits; the field value 3 never occurs); tq1: 5 per byte, base 3.
Tables       the embedding + tied head as fp16, int8 (one scale per row) or q4 (one scale per Q4_GROUP values).
Kernels      the kinds of projections and tables the C decode engine understands (`KernelKind`, mirrored by
             csrc/lm_step.c's enum and checked against the library at load), and the limits of the kernels.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

from .errors import UserError

# ---- groups ----
DEFAULT_GROUP_SIZE = 128     # weights per scale along in_features (the paper's setting)
PER_ROW = -1                 # a user's "one scale per row": resolved to in_features of each matrix
GGUF_TQ_BLOCK = 256          # llama.cpp's TQ1_0 / TQ2_0: one scale per 256 weights
GEMV_GROUP_MULTIPLE = 8      # the exact ternary GEMV and the decode engine (csrc/tq2_gemv.c, lm_step.c)
A8_GROUP_MULTIPLE = 128      # the int8-activation GEMV: integer sums per 128 weights
BF16_GROUP_MULTIPLE = 64     # the bf16-activation GEMV: chunks of 64 weights per group
SUGGESTED_GROUP_SIZES = (32, 64, 128, 256)

# ---- scales ----
SCALE_MIN = 1e-4             # keeps fp16 scales normal-ish and all-zero groups harmless
FP16_MAX = 65504.0           # largest fp16: the largest fp16 scale
BF16_MAX = 65280.0           # largest bf16 value that fp16 holds too: the largest bf16 scale
SCALE_FORMATS = ("fp16", "bf16")
SCALE_MODES = ("absmean", "learned", "frozen", "guarded")
SCALE_PARAMS = ("log", "linear")
TRAINED_SCALE_MODES = ("learned", "guarded")   # scales that are parameters (and can be switched in place)
TARGETS = ("in_proj", "out_proj")

# ---- codes ----
PER_BYTE = {"tq2": 4, "tq1": 5}      # codes per byte of each packing
PACKINGS = tuple(PER_BYTE)
TQ2_INVALID_FIELD = 3                # a 2-bit tq2 field holds code + 1 in {0, 1, 2}
TQ1_MAX_BYTE = 242                   # 3^5 - 1: the largest valid tq1 byte

# ---- tables (embedding + tied head) ----
TABLE_FORMATS = ("fp16", "int8", "q4")
Q4_GROUP = 32                        # values per fp16 scale in a q4 table

# ---- packed folders ----
PACKED_FORMAT_NAME = "ternary-mamba-packed"
PACKED_VERSION_DENSE = 1             # a packed folder with an fp16 embedding
PACKED_VERSION_TABLES = 2            # the embedding may be quantized (header "embedding": "int8" | "q4")
PACKED_VERSIONS = (PACKED_VERSION_DENSE, PACKED_VERSION_TABLES)

# ---- limits ----
GEMV_MAX_ROWS = 16           # up to this many rows (tokens) per call use the GEMV kernels; more use a GEMM
DECODE_MAX_BATCH = 64        # sequences one decode-engine step takes (csrc/lm_step.c)
# The fast default of `generate` / `serve` (runtime/modes.py): the fastest decode mode whose quality cost, measured at
# export on held-out text against the exact path, is at most this mean KL (nats per token) and at least this top-1
# agreement.  Fixed before any mode was measured (2026-12-02); changing them changes which mode runs, not a record.
DECODE_MODES = ("fast", "a8", "i8head", "exact")   # runtime/modes.py, fastest first
DECODE_MODE_MAX_KL = 0.02
DECODE_MODE_MIN_TOP1 = 0.95
MAX_CHUNK_SIZE = 1024        # the SSD scan's chunk: a compute knob (64 on CPUs, 256 in mamba_ssm)
SCAN_KERNEL_MULTIPLE = 16    # the C scan/prefill kernels need headdim, d_state and chunk a multiple of this


class KernelKind(enum.IntEnum):
    """What the C decode engine finds behind a weight pointer (csrc/lm_step.c `TM_*`; table_rows uses the table
    kinds F32, I8, F16 and Q4)."""
    F32 = 0
    TQ2 = 1
    TQ2_A8 = 2
    I8 = 3
    F16 = 4
    Q4 = 5
    TQ2_BF16 = 6
    Q4_A8 = 7
    TQ2_R32 = 8   # int8 activations, 32-row-interleaved codes + fp16 scales (csrc/decode_r32.c), built by the engine
    TQ2_LUT = 9   # exact (fp32 activations) by triple-sum tables, 64-row blocks + fp16 scales (csrc/decode_lut.c)


def check_group_size(group_size: int) -> int:
    """A group size as a user gives it: G > 0, or -1 for one scale per row.  Returns it unchanged."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size == 0 or group_size < PER_ROW:
        raise UserError(f"group size {group_size!r}: use a positive size (64, 128, 256) or -1 for one per row")
    return group_size


def resolve_group_size(group_size: int, in_features: int, name: str = "") -> int:
    """The group size a matrix with `in_features` columns uses (-1 -> in_features), checked to divide it.  The
    only place a user's value is resolved; everything downstream stores and passes the result."""
    G = in_features if check_group_size(group_size) == PER_ROW else group_size
    if in_features % G:
        ok = [g for g in SUGGESTED_GROUP_SIZES if in_features % g == 0]
        raise UserError(f"group size {G} does not divide in_features={in_features} of {name or 'a linear'}; "
                        f"use one of {ok or [PER_ROW]} (or -1 for one scale per row)")
    return G


def bits_per_weight(group_size: int, packing: str = "tq2") -> float:
    """Bits per ternary weight of codes + one fp16 scale per resolved group."""
    if group_size < 1:
        raise ValueError(f"bits_per_weight needs a resolved group size, got {group_size}")
    return 8 / PER_BYTE[packing] + 16 / group_size


@dataclass(frozen=True)
class GroupPaths:
    """Kernel paths open to ternary weights with one scale per `group_size` weights along a row."""
    group_size: int
    gemv: bool       # exact ternary GEMV and the whole-model decode engine
    gemv_a8: bool    # the int8-activation GEMV (opt-in, not bit-exact)
    gguf_tq: bool    # llama.cpp's TQ1_0 / TQ2_0 hold it exactly
    gemv_bf16: bool  # the bf16-activation GEMV (opt-in, the paper's A16)


@functools.lru_cache(maxsize=None)
def group_paths(group_size: int) -> GroupPaths:
    """Which kernel paths a resolved group size can take; every caller asks here instead of testing `G % n`.
    Cached: `ops.ternary_linear` asks on every call of a packed projection."""
    G = int(group_size)
    if G < 1:
        raise ValueError(f"group size {G} must be resolved (>= 1) before asking for kernel paths")
    return GroupPaths(G, gemv=G % GEMV_GROUP_MULTIPLE == 0, gemv_a8=G % A8_GROUP_MULTIPLE == 0,
                      gguf_tq=G % GGUF_TQ_BLOCK == 0, gemv_bf16=G % BF16_GROUP_MULTIPLE == 0)


def check_chunk_size(chunk_size: int, what: str = "chunk_size") -> int:
    """The SSD scan's chunk length: a positive int no larger than MAX_CHUNK_SIZE."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise UserError(f"{what} {chunk_size!r}: must be a positive integer")
    if chunk_size > MAX_CHUNK_SIZE:
        raise UserError(f"{what} {chunk_size}: at most {MAX_CHUNK_SIZE} (64 is fastest on CPUs, 256 on GPUs)")
    return chunk_size


# ---- GPUs the planner knows (data-sheet figures: dense 16-bit tensor-core peak, fp32 CUDA-core peak, HBM) ----

@dataclass(frozen=True)
class GPU:
    name: str
    tensor_tflops: float      # dense 16-bit tensor-core peak
    fp32_tflops: float        # fp32 on CUDA cores (no TF32: the scan's matmuls run in full fp32)
    hbm_tbps: float           # memory bandwidth, TB/s
    memory_gb: int


GPUS = {"h100": GPU("H100 SXM", 989.0, 67.0, 3.35, 80), "h200": GPU("H200", 989.0, 67.0, 4.8, 141),
        "a100": GPU("A100 SXM", 312.0, 19.5, 2.04, 80), "l40s": GPU("L40S", 362.0, 91.6, 0.864, 48),
        "a10g": GPU("A10G", 70.0, 31.2, 0.6, 24), "rtx4090": GPU("RTX 4090", 165.0, 82.6, 1.01, 24)}
