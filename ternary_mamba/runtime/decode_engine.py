"""Whole-model decode step in one C call (csrc/lm_step.c).

Generation (`runtime.generate`) and `fast_step` come here; `Mamba2LM.step` itself stays the plain
module-by-module step, which is the reference this engine is tested against.  The engine describes the model once
(pointers to every weight, the kind of each projection) and then decodes a token with a single ctypes call,
instead of ~10 PyTorch ops per layer: at 130m that interpreter and dispatch overhead was larger than the
arithmetic of a packed ternary model.  Supported projections: fp32 `nn.Linear`, `PackedTernaryLinear`
(exact fp32 products, or int8 activations when opted in with `use_a8_activations`), `Fp16Head` and
`Int8Head`, and a quantized embedding with its tied head (`runtime.tables`, int8 or q4).
Where the build has the kernels (AVX-512; for int8 activations also AVX2), the engine re-lays each packed
projection's codes once, for the kernel that runs it: exact products through triple-sum tables
(csrc/decode_lut.c), int8 activations through row-interleaved codes (csrc/decode_r32.c), both with the file's
fp16 scales (USE_LUT / USE_R32 switch them off; the module keeps its own tq2 codes for prefill, so resident memory
grows by one copy of the codes: 310 MB at 1.3B).
Anything else (fake-quant QAT modules, fp16 weights, forward hooks on any module, no C compiler, a
`reference_path()` in force) returns None and the module-by-module step runs instead.

Greedy decoding (`DecodeSession.step_greedy`) skips most of the head's bytes without changing a token: an
int8 copy of the fp32/fp16 head gives every vocabulary row an approximate logit with a proven error bound,
and only the rows whose interval reaches the best one are rescored with the head's own arithmetic (a handful
per token).  The token is exactly argmax of the full logits; the head is 38.6 MB instead of 154 MB per token at
130m (csrc/lm_step.c, tm_step_greedy).
"""
from __future__ import annotations

import ctypes
import weakref

import torch
import torch.nn as nn
from torch import Tensor

from ..core.model import LayerState, has_forward_hooks
from ..ops.build import check_rc, get_kernel
from ..ops.abi import TmLayer as _Layer, TmLinear as _Linear, TmModel as _Model
from ..ops.dispatch import kernels_available
from ..ops import decode_layouts
from ..spec import DECODE_MAX_BATCH, KernelKind
from .heads import Fp16Head, Int8Head, head_weight
from .packed_linear import PackedTernaryLinear
from .tables import QuantizedEmbedding, QuantizedHead

_ENGINES: "weakref.WeakKeyDictionary[nn.Module, DecodeEngine]" = weakref.WeakKeyDictionary()
_BF16_STATE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()   # models whose engine keeps the SSM state in bf16


def use_bf16_state(model, enabled: bool = True) -> None:
    """Opt-in, decode only: the engine stores every layer's SSM state in bf16 (fp32 arithmetic in registers, each
    updated value rounded to nearest even once per step) — half of the state's bytes, which at 1.3B are 201 MB of
    the ~660 MB a token reads.  Not exact: `ternary-mamba bench decode` prints its KL and greedy agreement to the
    fp32-state path over long generations (Mamba models are known to degenerate with a bf16 state written back
    every step; measure before relying on it).  The module-by-module step keeps its fp32 state."""
    if enabled:
        _BF16_STATE.add(model)
    else:
        _BF16_STATE.discard(model)

_p = ctypes.c_void_p
TM_F32, TM_TQ2, TM_TQ2_A8, TM_I8, TM_F16, TM_Q4, TM_TQ2_BF16, TM_Q4_A8, TM_TQ2_R32, TM_TQ2_LUT = (
    KernelKind.F32, KernelKind.TQ2, KernelKind.TQ2_A8, KernelKind.I8, KernelKind.F16, KernelKind.Q4,
    KernelKind.TQ2_BF16, KernelKind.Q4_A8, KernelKind.TQ2_R32, KernelKind.TQ2_LUT)
# int8-activation projections run through the row-interleaved kernel (csrc/decode_r32.c) where the build has it;
# False: the plane-layout kernel (csrc/decode_a8.c) — the same integer sums (tests compare the two).  Both switches
# are read when an engine is built (engines are cached per model: clear `_ENGINES` after changing them)
USE_R32 = True
# exact projections run through the triple-sum table kernel (csrc/decode_lut.c) where the build has it; False: the
# FMA kernel (csrc/tq2_gemv.c) — equal up to fp32 summation order (tests compare the two)
USE_LUT = True


class Unsupported(Exception):
    pass


def _f32(t: Tensor | None) -> Tensor | None:
    if t is None:
        return None
    if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
        raise Unsupported(f"tensor {tuple(t.shape)} is {t.dtype}, contiguous={t.is_contiguous()}")
    return t


def _ptr(t: Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _linear(m: nn.Module, keep: list) -> _Linear:
    if type(m) is nn.Linear:
        w, b = _f32(m.weight.detach()), _f32(m.bias.detach() if m.bias is not None else None)
        keep += [w, b]
        return _Linear(TM_F32, m.out_features, m.in_features, 0, _ptr(w), None, _ptr(b))
    if isinstance(m, PackedTernaryLinear) and m.paths.gemv:
        kind = TM_TQ2_BF16 if m.bf16 and m.paths.gemv_bf16 else TM_TQ2_A8 if m.a8 and m.paths.gemv_a8 else TM_TQ2
        # re-laid for fewer instructions per weight, fp16 scales: int8 activations -> r32 (the same integer sums),
        # exact -> triple-sum tables (lut); where the build or the shape has no such kernel, the tq2 one
        layout, on, relaid = {TM_TQ2_A8: ("r32", USE_R32, TM_TQ2_R32), TM_TQ2: ("lut", USE_LUT, TM_TQ2_LUT)}.get(
            kind, (None, False, None))
        packed = (decode_layouts.pack(layout, m.codes, _f32(m.scales), m.group_size)
                  if on and decode_layouts.available(layout) else None)
        if packed is not None:
            b = _f32(m.bias)
            keep += [*packed, b]
            return _Linear(relaid, m.out_features, m.in_features, m.group_size, packed[0].data_ptr(),
                           packed[1].data_ptr(), _ptr(b))
        codes, sc, b = m.codes.contiguous(), _f32(m.scales), _f32(m.bias)
        keep += [codes, sc, b]
        return _Linear(kind, m.out_features, m.in_features, m.group_size, codes.data_ptr(), sc.data_ptr(), _ptr(b))
    if isinstance(m, Int8Head):
        w8, sc = m.w8.contiguous(), _f32(m.scale)
        keep += [w8, sc]
        return _Linear(TM_I8, m.out_features, m.in_features, 0, w8.data_ptr(), sc.data_ptr(), None)
    if isinstance(m, QuantizedHead):
        codes, sc = m.codes.contiguous(), _f32(m.scale)
        keep += [codes, sc]
        return _Linear((TM_Q4_A8 if m.a8 else TM_Q4) if m.fmt == "q4" else TM_I8, m.out_features, m.in_features, 0, codes.data_ptr(),
                       sc.data_ptr(), None)
    if isinstance(m, Fp16Head):
        keep.append(m.w16)
        return _Linear(TM_F16, m.out_features, m.in_features, 0, m.w16.data_ptr(), None, None)
    raise Unsupported(f"{type(m).__name__} projection")


def _table(emb: nn.Module) -> tuple[int, Tensor, Tensor | None]:
    """(kind, rows, scales) of the embedding for tm_step's lookup."""
    if isinstance(emb, QuantizedEmbedding):
        return (TM_Q4 if emb.fmt == "q4" else TM_I8), emb.codes.contiguous(), _f32(emb.scale)
    if type(emb) is nn.Embedding:
        return TM_F32, _f32(emb.weight.detach()), None
    raise Unsupported(f"{type(emb).__name__} embedding")


def state_dtype(model) -> torch.dtype:
    """The dtype the engine keeps this model's SSM state in (`use_bf16_state`)."""
    return torch.bfloat16 if model in _BF16_STATE else torch.float32


def _signature(model) -> tuple:
    """What the engine's pointers depend on: module identities, opt-in flags and tensor storage."""
    sig = [model in _BF16_STATE, id(model.lm_head), getattr(model.lm_head, "a8", None), getattr(model.lm_head, "bf16", None), _ptr(getattr(model.lm_head, "weight", None)),
           id(model.backbone.embedding), _ptr(getattr(model.backbone.embedding, "weight", None)),
           model.backbone.norm_f.weight.data_ptr()]
    for layer in model.backbone.layers:
        mx = layer.mixer
        for lin in (mx.in_proj, mx.out_proj):
            sig += [id(lin), getattr(lin, "a8", None), getattr(lin, "bf16", None),
                    _ptr(getattr(lin, "weight", getattr(lin, "codes", None)))]
        sig += [layer.norm.weight.data_ptr(), mx.conv1d.weight.data_ptr(), mx.A_log.data_ptr(),
                mx.dt_bias.data_ptr(), mx.D.data_ptr(), mx.norm.weight.data_ptr()]
    return tuple(sig)


class DecodeEngine:
    def __init__(self, model, signature: tuple):
        self.lib = get_kernel()
        if self.lib is None:
            raise Unsupported("no compiled kernel")
        c = model.config
        keep: list = []
        layers = (_Layer * c.n_layer)()
        max_in = c.d_inner
        described: list[list[Tensor]] = []   # each projection's tensors as described, in the order a step reads them

        def linear(m: nn.Module) -> _Linear:
            n0 = len(keep)
            lin = _linear(m, keep)
            described.append([t for t in keep[n0:] if t is not None])
            return lin

        for i, layer in enumerate(model.backbone.layers):
            mx = layer.mixer
            t = [_f32(x.detach() if x is not None else None) for x in
                 (layer.norm.weight, mx.conv1d.weight, mx.conv1d.bias, mx.dt_bias, mx.A_log, mx.D, mx.norm.weight)]
            keep += t
            layers[i] = _Layer(_ptr(t[0]), linear(mx.in_proj), linear(mx.out_proj), *map(_ptr, t[1:]))
            max_in = max(max_in, mx.in_proj.in_features, mx.out_proj.in_features)
        emb_kind, emb, emb_scales = _table(model.backbone.embedding)
        norm_f = _f32(model.backbone.norm_f.weight.detach())
        keep += [emb, emb_scales, norm_f]
        head = linear(model.lm_head)
        self._described = described
        self.state_dtype = torch.bfloat16 if model in _BF16_STATE else torch.float32
        self.model_struct = _Model(c.n_layer, c.d_model, c.d_inner, c.ngroups, c.d_state, c.nheads, c.headdim,
                                   c.d_conv, max(max_in, c.d_model), float(model.backbone.layers[0].norm.eps),
                                   float(model.backbone.layers[0].mixer.norm.eps), emb.data_ptr(),
                                   norm_f.data_ptr(), head, layers, emb_kind, _ptr(emb_scales),
                                   int(self.state_dtype == torch.bfloat16))
        self.layers, self.keep = layers, keep       # keep the described memory alive
        self.n_layer, self.vocab, self.n_out = c.n_layer, emb.size(0), head.out
        self.conv_shape, self.ssm_shape = (c.conv_dim, c.d_conv - 1), (c.nheads, c.headdim, c.d_state)
        self.signature = signature
        self.head_kind = head.kind
        # the head's weights for greedy decoding's int8 pre-pass (a tensor, not the model: the engine is cached
        # per model in a WeakKeyDictionary and must not keep it alive)
        self._head_src = None
        if head.kind in (TM_F32, TM_F16):
            self._head_src = model.lm_head.w16 if head.kind == TM_F16 else head_weight(model).detach()
        self._pre = None   # the int8 pre-pass of greedy decoding, built on first use
        self.rescored = 0  # rows rescored exactly by step_greedy, summed over tokens (statistics)
        self._scratch: dict[int, tuple[Tensor, Tensor]] = {}
        self.profile: Tensor | None = None   # set to torch.zeros(5, dtype=torch.float64) to time the phases

    def kernel_kinds(self) -> list[str]:
        """Which kernel each projection runs, in_proj and out_proj per layer then the head (KernelKind names,
        lower case), e.g. for run records and the benchmarks' byte counts."""
        lins = [lin for layer in self.layers for lin in (layer.in_proj, layer.out_proj)] + [self.model_struct.head]
        return [KernelKind(lin.kind).name.lower() for lin in lins]

    def byte_ranges(self, state: list) -> list[list[tuple[Tensor, bool]]]:
        """The large buffers a step reads, in the order it reads them, one list per kernel call (parallel region)
        of the step, each buffer with whether the step writes it back: per layer in_proj's weights (as the engine
        holds them: re-laid codes, fp16 scales), the conv state, the SSM state (`state`: `prepare_state`'s),
        out_proj's weights; then the head's.  Left out: the per-layer norms, conv weights, A, D and dt bias and
        the embedding row (KBs)."""
        out: list[list[tuple[Tensor, bool]]] = []
        for i, s in enumerate(state):
            out += [[(t, False) for t in self._described[2 * i]], [(s.conv, True)], [(s.ssm, True)],
                    [(t, False) for t in self._described[2 * i + 1]]]
        return out + [[(t, False) for t in self._described[-1]]]

    PHASES = ("embedding, norms, residual", "in_proj", "conv + SSM step + gated norm", "out_proj", "lm_head")

    def _work(self, nb: int) -> tuple[Tensor, Tensor]:
        if nb not in self._scratch:
            ref = ctypes.byref(self.model_struct)
            self._scratch[nb] = (torch.empty(self.lib.tm_work_floats(ref, nb)),
                                 torch.empty(self.lib.tm_qwork_bytes(ref, nb), dtype=torch.int8))
        return self._scratch[nb]

    def prepare_state(self, state: list, nb: int) -> list | None:
        """The state as tm_step needs it (contiguous, conv fp32, ssm in `state_dtype`, the right shapes: an fp32
        SSM state, e.g. after prefill, is rounded to a bf16 copy for a bf16-state engine), or None if it cannot
        be."""
        if not 1 <= nb <= DECODE_MAX_BATCH or len(state) != self.n_layer:
            return None
        out = []
        for s in state:
            if s.conv.dtype != torch.float32 or s.ssm.dtype not in (torch.float32, self.state_dtype) \
                    or tuple(s.conv.shape) != (nb, *self.conv_shape) or tuple(s.ssm.shape) != (nb, *self.ssm_shape):
                return None
            ssm = s.ssm.to(self.state_dtype)
            out.append(s if s.conv.is_contiguous() and ssm is s.ssm and ssm.is_contiguous()
                       else LayerState(s.conv.contiguous(), ssm.contiguous()))
        return out

    def _call(self, tok_ptr: int, nb: int, conv_ptrs, ssm_ptrs) -> Tensor:
        logits = torch.empty(nb, self.n_out)
        work, qwork = self._work(nb)
        rc = self.lib.tm_step(ctypes.byref(self.model_struct), tok_ptr, nb, conv_ptrs, ssm_ptrs,
                              logits.data_ptr(), work.data_ptr(), qwork.data_ptr(),
                              self.profile.data_ptr() if self.profile is not None else None)
        check_rc(rc, "tm_step")
        return logits

    @property
    def supports_greedy(self) -> bool:
        return self.head_kind in (TM_F32, TM_F16)

    def _call_greedy(self, tok_ptr: int, nb: int, conv_ptrs, ssm_ptrs, n_valid: int) -> list[int]:
        if self._pre is None:
            pre = Int8Head(self._head_src)
            w8, sc = pre.w8.contiguous(), pre.scale.contiguous()
            self._pre = (_Linear(TM_I8, self.n_out, w8.size(1), 0, w8.data_ptr(), sc.data_ptr(), None), w8, sc)
        work, qwork = self._work(nb)
        approx = torch.empty(nb, self.n_out)
        nxt, cnt = (ctypes.c_int64 * nb)(), (ctypes.c_int64 * nb)()
        rc = self.lib.tm_step_greedy(ctypes.byref(self.model_struct), ctypes.byref(self._pre[0]), tok_ptr, nb,
                                     conv_ptrs, ssm_ptrs, n_valid, nxt, cnt, approx.data_ptr(), work.data_ptr(),
                                     qwork.data_ptr(), self.profile.data_ptr() if self.profile is not None else None)
        check_rc(rc, "tm_step")
        self.rescored += sum(cnt)
        return list(nxt)

    def step(self, token_ids: Tensor, state: list) -> tuple[Tensor, list] | None:
        if token_ids.dim() != 1:
            return None
        nb = token_ids.size(0)
        new_state = self.prepare_state(state, nb)
        if new_state is None:
            return None
        tok = token_ids.to(torch.int64).contiguous()
        if int(tok.min()) < 0 or int(tok.max()) >= self.vocab:
            raise IndexError(f"token id out of range [0, {self.vocab})")
        conv_ptrs = (_p * self.n_layer)(*[s.conv.data_ptr() for s in new_state])
        ssm_ptrs = (_p * self.n_layer)(*[s.ssm.data_ptr() for s in new_state])
        return self._call(tok.data_ptr(), nb, conv_ptrs, ssm_ptrs), new_state


class DecodeSession:
    """Token-by-token generation with one engine and one state: everything is checked once here, so a step is
    just the C call (what `generate` uses; `Mamba2LM.step` re-checks the model and state on every call)."""

    def __init__(self, engine: DecodeEngine, state: list, nb: int):
        self.engine, self.state, self.nb = engine, state, nb
        self.tokens = (ctypes.c_int64 * nb)()
        self._conv = (_p * engine.n_layer)(*[s.conv.data_ptr() for s in state])
        self._ssm = (_p * engine.n_layer)(*[s.ssm.data_ptr() for s in state])

    def step(self, token_ids: list[int]) -> Tensor:
        """token_ids: nb ints -> logits (nb, padded_vocab); the session's state advances in place."""
        for i, t in enumerate(token_ids):
            if not 0 <= t < self.engine.vocab:
                raise IndexError(f"token id {t} out of range [0, {self.engine.vocab})")
            self.tokens[i] = t
        return self.engine._call(ctypes.addressof(self.tokens), self.nb, self._conv, self._ssm)

    def step_greedy(self, token_ids: list[int], n_valid: int) -> list[int]:
        """Like argmax(step(token_ids)[:, :n_valid], -1), token for token, reading an int8 copy of the head plus
        the few rows that could be the maximum (see the module docstring)."""
        if not self.engine.supports_greedy:
            return self.step(token_ids)[:, :n_valid].argmax(-1).tolist()
        for i, t in enumerate(token_ids):
            if not 0 <= t < self.engine.vocab:
                raise IndexError(f"token id {t} out of range [0, {self.engine.vocab})")
            self.tokens[i] = t
        return self.engine._call_greedy(ctypes.addressof(self.tokens), self.nb, self._conv, self._ssm, n_valid)


def session(model, state: list, nb: int = 1) -> DecodeSession | None:
    """A DecodeSession continuing from `state` (e.g. after prefill), or None when the engine cannot run it."""
    if not kernels_available() or _has_hooks(model):
        return None
    eng = engine_for(model)
    prepared = eng.prepare_state(state, nb) if eng is not None else None
    return DecodeSession(eng, prepared, nb) if prepared is not None else None


class _Failed:
    """Remembers that a model (as of this signature) cannot use the engine, so it is not re-tried per token."""

    def __init__(self, signature: tuple):
        self.signature = signature


def engine_for(model) -> "DecodeEngine | None":
    """The model's engine (built if needed), or None when the model cannot use it."""
    sig = _signature(model)
    eng = _ENGINES.get(model)
    if eng is None or eng.signature != sig:
        try:
            eng = DecodeEngine(model, sig)
        except Unsupported:
            eng = _Failed(sig)
        _ENGINES[model] = eng
    return None if isinstance(eng, _Failed) else eng


def fast_step(model, token_ids: Tensor, state: list) -> tuple[Tensor, list] | None:
    """One decode step through the engine, or None when this model/state cannot use it."""
    if not kernels_available() or _has_hooks(model):
        return None
    eng = engine_for(model)
    return eng.step(token_ids, state) if eng is not None else None


def step(model, token_ids: Tensor, state: list) -> tuple[Tensor, list]:
    """One decode step the fastest way the model allows: the whole-model C call, else the module path with the
    fused mixer kernels.  The given state may be updated in place (use the returned one)."""
    out = fast_step(model, token_ids, state)
    return out if out is not None else model.step(token_ids, state, inplace=True)


def _has_hooks(model) -> bool:
    """Forward hooks (capture, analysis) must see every module run: then the module path is used."""
    return has_forward_hooks(*model.modules())
