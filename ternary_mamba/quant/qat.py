"""`quantize_(model, TernaryConfig(...))`: swap the target linears of a Mamba-2 for `TernaryLinear`
QAT modules that keep the latent full-precision weight (the same Parameter, not a copy) and per-group
scales.  Scale modes:

  absmean  s_g = mean|w_g| recomputed from the latent weights at every forward (BitNet b1.58), not trained.
  learned  s_g is a parameter initialised from absmean and trained with an LSQ gradient.  From a
           pretrained checkpoint this drifts upward and more and more weights round to 0: the paper's
           zero-ratio collapse.
  frozen   absmean of the weights at initialisation, kept fixed (a buffer, not trained): the control that
           separates "the scale moves" from "the scale is learned".
  guarded  learned, but the effective scale is clamped into [lo, hi] × the group's *current* absmean
           (detached).  The zero threshold of a group is s/2, so tying s to mean|w| bounds the group's
           zero ratio (≈ 1 − exp(−hi/2) for Laplace-like weights: 53 % at hi = 1.5) while still letting the
           scale adapt inside the band.  The band is the guard; the LSQ gradient still trains s inside it.

Learned and guarded scales are parameterised in log space by default (`scale_param="log"`, the Parameter
`log_scale`): AdamW moves every parameter by about lr per step whatever its gradient's size, so a linear
scale moves by ~lr in absolute terms — a relative step of lr/s that is 3.6 % of a 0.055 scale at lr 2e-3 and
larger for the smaller groups — while a log scale moves by ~lr *relatively*, the same for every group and
every model size.  `scale_param="linear"` (the Parameter `scale`) keeps the LSQ original for comparison.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from ..ops.device import scalar
from .config import SCALE_MODES, TernaryConfig  # noqa: F401  (re-exported: the QAT API in one import)
from ..spec import PER_ROW, SCALE_MIN, TRAINED_SCALE_MODES, resolve_group_size
from ..ops.packing import pack
from .ternary import absmean_scale, fake_quant, mse_optimal_zeros, round_scale, ternary_codes

class TernaryLinear(nn.Module):
    """A linear layer whose forward uses s16 · ternary(w) instead of w (fake quantization)."""

    def __init__(self, linear: nn.Linear, cfg: TernaryConfig, name: str = ""):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        G = cfg.group_for(name.rsplit(".", 1)[-1])   # resolved by quantize_ (TernaryConfig.resolved)
        if G == PER_ROW or self.in_features % G:      # a module built on its own: resolve (and check) here
            G = resolve_group_size(G, self.in_features, name)
        self.group_size, self.mode, self.scale_format = G, cfg.scale_mode, cfg.scale_format
        self.guard = (cfg.guard_low, cfg.guard_high)
        self.weight = linear.weight  # the same Parameter: the latent full-precision weight
        self.bias = linear.bias
        self.enabled = True          # False: behave exactly like the original nn.Linear (for tests/ablations)
        self.lam = 1.0               # quantization warm-up: w + lam * (q - w); 1.0 = fully ternary
        self.scale_param = cfg.scale_param
        if self.mode != "absmean":
            with torch.no_grad():
                s0 = absmean_scale(self.weight.detach().float(), G).clamp_min(SCALE_MIN)
            if self.mode == "frozen":
                self.register_buffer("scale", s0)
            elif self.scale_param == "log":
                self.log_scale = nn.Parameter(s0.log())
            else:
                self.scale = nn.Parameter(s0)
        w = self.weight
        self.corr_bias = nn.Parameter(w.new_zeros(self.out_features)) if cfg.corr_bias else None
        self.corr_u = nn.Parameter(w.new_zeros(self.out_features, cfg.corr_rank)) if cfg.corr_rank else None
        self.corr_v = nn.Parameter(w.new_zeros(cfg.corr_rank, self.in_features)) if cfg.corr_rank else None

    def stored_scale(self, full: bool = False) -> Tensor | None:
        """The scale held by the module (frozen / learned / guarded), in linear space; None for absmean.
        full: gathered from an FSDP shard."""
        if self.mode == "absmean":
            return None
        if hasattr(self, "log_scale"):
            return (_full(self.log_scale) if full else self.log_scale).exp()
        return _full(self.scale) if full else self.scale

    def effective_scale(self, w: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
        """The scale the forward uses, (out, in // G), before fp16 rounding."""
        w = self.weight if w is None else w
        if self.mode == "absmean":
            return absmean_scale(w.detach(), self.group_size)
        scale = self.stored_scale() if scale is None else scale
        if self.mode == "guarded":
            a = absmean_scale(w.detach(), self.group_size)
            return torch.maximum(torch.minimum(scale, self.guard[1] * a), self.guard[0] * a)
        return scale

    def quantized_weight(self) -> Tensor:
        # the scale from torch's absmean on every device, as the export computes it: the codes a file holds
        q = fake_quant(self.weight, self.effective_scale(), self.group_size, self.trains_scale, self.scale_format)
        if self.lam >= 1.0:
            return q  # exact: identical to the packed export
        return self.weight + self.lam * (q - self.weight)

    def forward(self, x: Tensor) -> Tensor:
        w = self.quantized_weight() if self.enabled else self.weight
        y = F.linear(x, w, self.bias)
        if self.enabled and self.corr_u is not None:
            y = y + F.linear(F.linear(x, self.corr_v), self.corr_u)
        if self.enabled and self.corr_bias is not None:
            y = y + self.corr_bias
        return y

    @property
    def trains_scale(self) -> bool:
        return self.mode in TRAINED_SCALE_MODES

    @property
    def has_corrections(self) -> bool:
        return self.corr_u is not None or self.corr_bias is not None

    @torch.no_grad()
    def export(self) -> tuple[Tensor, Tensor]:
        """(codes int8 (out, in), fp16 scales (out, in // G)): exactly what the forward uses."""
        w = _full(self.weight)
        s16 = round_scale(self.effective_scale(w, self.stored_scale(full=True)).float(), self.scale_format)
        return ternary_codes(w.float(), s16, self.group_size), s16.half()

    @torch.no_grad()
    def stats(self, optimum: bool = False) -> dict[str, float]:
        """zero ratio and mean scale / absmean; optimum: also the zero ratio of the per-group MSE-optimal scales
        of the current latent weights (what a zero ratio is measured against)."""
        return {k: scalar(v) for k, v in self.stat_tensors(optimum).items()}

    @torch.no_grad()
    def stat_tensors(self, optimum: bool = False) -> dict[str, Tensor]:
        """`stats` as 0-dim tensors on the weight's device (no host sync: a caller reads many modules at once)."""
        codes, s16 = self.export()
        st = {"zero_ratio": (codes == 0).float().mean(),
              "scale_over_absmean": s16.float().mean() / _full(self.weight).abs().mean().clamp_min(1e-12)}
        if self.mode == "guarded":   # the share of groups whose learned scale the band clamps: the guard binding
            a = absmean_scale(_full(self.weight).detach(), self.group_size)
            s = self.stored_scale(full=True).detach()
            st["guard_bound"] = ((s < self.guard[0] * a) | (s > self.guard[1] * a)).float().mean()
        if optimum:
            st["zero_ratio_opt"] = mse_optimal_zeros(_full(self.weight).float(), self.group_size)[1].mean()
        return st

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, group_size={self.group_size}, scale={self.mode}"


def _full(t: Tensor | None) -> Tensor | None:
    """A DTensor (FSDP2-sharded parameter) gathered to a plain tensor; anything else unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def default_filter(cfg: TernaryConfig) -> Callable[[nn.Module, str], bool]:
    return lambda module, fqn: isinstance(module, nn.Linear) and fqn.rsplit(".", 1)[-1] in cfg.targets


def quantize_(model: nn.Module, cfg: TernaryConfig,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Swap, in place, every nn.Linear accepted by filter_fn(module, fqn) for a TernaryLinear sharing
    its weight.  Records the config on the model (`model.ternary_config`) so checkpoints rebuild it."""
    if getattr(model, "ternary_config", None) is not None:
        raise UserError("model is already quantized")
    filter_fn = filter_fn or default_filter(cfg)
    swaps = [(fqn, m) for fqn, m in model.named_modules() if fqn and filter_fn(m, fqn)]
    if not swaps:
        raise UserError("quantize_: no module matched the filter")
    cfg = cfg.resolved({fqn.rsplit(".", 1)[-1]: m.in_features for fqn, m in swaps})   # the one resolution
    for fqn, m in swaps:
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, TernaryLinear(m, cfg, fqn))
    model.ternary_config = cfg
    return model


def ternary_modules(model: nn.Module) -> list[tuple[str, TernaryLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TernaryLinear)]


def set_quant_enabled(model: nn.Module, enabled: bool) -> None:
    for _, m in ternary_modules(model):
        m.enabled = enabled


def set_lambda(model: nn.Module, lam: float) -> None:
    for _, m in ternary_modules(model):
        m.lam = lam


def set_scale_mode(model: nn.Module, mode: str) -> None:
    """Switch learned <-> guarded in place (the --on-collapse guard action)."""
    for _, m in ternary_modules(model):
        if {m.mode, mode} - set(TRAINED_SCALE_MODES):
            raise UserError("only learned and guarded scales can be switched during training")
        m.mode = mode
    model.ternary_config.scale_mode = mode


@torch.no_grad()
def packed_codes(m: TernaryLinear, packing: str = "tq2") -> tuple[Tensor, Tensor]:
    """(packed uint8 codes (flattened), fp16 scales (out, in // G)): exactly the weights m's forward uses."""
    if m.has_corrections:
        raise UserError("this model carries post-hoc corrections (bias / low-rank), which packed ternary "
                        "weights do not hold; convert a plain PTQ, QEP or QAT student")
    codes, s16 = m.export()
    return pack(codes, packing), s16.contiguous()
