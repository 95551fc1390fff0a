"""The C decode engine's ABI, mirrored once in ctypes and checked against the built library.

`TmLinear`, `TmLayer` and `TmModel` mirror csrc/lm_step.c's `tm_linear`, `tm_layer`, `tm_model`; the kinds and the
batch limit are `spec.KernelKind` and `spec.DECODE_MAX_BATCH`.  `check_abi(lib)` compares all of it with what the
library reports (`tm_abi`: enum values, sizes and field offsets) and raises on any difference, so a struct edited
on one side only fails at load instead of reading the wrong field."""
from __future__ import annotations

import ctypes

from ..spec import DECODE_MAX_BATCH, KernelKind

_i64, _p = ctypes.c_int64, ctypes.c_void_p


class TmLinear(ctypes.Structure):
    _fields_ = [("kind", _i64), ("out", _i64), ("in_", _i64), ("G", _i64), ("w", _p), ("scales", _p), ("bias", _p)]


class TmLayer(ctypes.Structure):
    _fields_ = [("norm_w", _p), ("in_proj", TmLinear), ("out_proj", TmLinear), ("conv_w", _p), ("conv_b", _p),
                ("dt_bias", _p), ("A_log", _p), ("D", _p), ("gnorm_w", _p)]


class TmModel(ctypes.Structure):
    _fields_ = [(k, _i64) for k in ("n_layer", "d_model", "d_inner", "ngroups", "d_state", "nheads", "headdim",
                                    "d_conv", "max_in")] + \
               [("eps", ctypes.c_double), ("gnorm_eps", ctypes.c_double), ("embedding", _p), ("norm_f", _p),
                ("head", TmLinear), ("layers", ctypes.POINTER(TmLayer)), ("emb_kind", _i64), ("emb_scales", _p),
                ("state_bf16", _i64)]


def expected_abi() -> list[tuple[str, int]]:
    """(what, value) in the order tm_abi() writes them."""
    rows = [(f"TM_{k.name}", int(k)) for k in KernelKind] + [("TM_MAX_BATCH", DECODE_MAX_BATCH)]
    for s in (TmLinear, TmLayer, TmModel):
        rows.append((f"sizeof({s.__name__})", ctypes.sizeof(s)))
        rows += [(f"{s.__name__}.{f}", getattr(s, f).offset) for f, _ in s._fields_]
    return rows


def check_abi(lib) -> None:
    """Raise RuntimeError naming every value where the library and this mirror disagree."""
    want = expected_abi()
    buf = (ctypes.c_int64 * (len(want) + 8))()
    n = int(lib.tm_abi(buf, len(buf)))
    got = list(buf[:min(n, len(buf))])
    bad = [f"{what}: C {g} vs Python {w}" for (what, w), g in zip(want, got) if g != w]
    if n != len(want):
        bad.append(f"tm_abi reports {n} values, the Python mirror expects {len(want)}")
    if bad:
        raise RuntimeError("the kernel library's ABI does not match ops/abi.py (rebuild, or fix both sides): "
                           + "; ".join(bad))
