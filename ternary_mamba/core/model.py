"""Mamba-2 language model in pure PyTorch (fp32 on CPU), numerically the published architecture.

Module names follow mamba_ssm so that its checkpoints load key-for-key:
    backbone.embedding, backbone.layers.{i}.norm, backbone.layers.{i}.mixer.{in_proj, conv1d, dt_bias,
    A_log, D, norm, out_proj}, backbone.norm_f, lm_head (weight tied to the embedding).
Every projection is called as a module (`self.in_proj(u)`), never by reaching into its `.weight`, so a
swapped-in quantized module is always the one that runs.  The model knows nothing of quantization, file
formats or training.  The mixer is one straight path of ops (`ops.conv.conv_silu`, `ops.scan.ssd_scan`,
`ops.norms.gated_norm`); each op chooses its implementation (C, mamba_ssm, PyTorch) and has a `*_ref` beside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..ops.conv import conv_silu
from ..ops.device import full_precision
from ..ops.mixer_step import fused_mixer_step
from ..ops.norms import gated_norm, rms_norm
from ..ops.scan import ScanDims, ssd_scan, ssd_step
from .config import Mamba2Config


def has_forward_hooks(*mods: nn.Module) -> bool:
    """A forward hook must see its module run, so fused paths that skip these modules step aside."""
    from torch.nn.modules import module as M
    return bool(M._global_forward_hooks or M._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in mods))


@dataclass
class LayerState:
    conv: Tensor  # (b, conv_dim, d_conv - 1): the last inputs of the causal conv
    ssm: Tensor   # (b, nheads, headdim, d_state)


def check_state(state: LayerState, batch: int, c: Mamba2Config) -> None:
    """A layer state of the shapes this model writes (fused kernels read and write through it)."""
    conv, ssm = (batch, c.conv_dim, c.d_conv - 1), (batch, c.nheads, c.headdim, c.d_state)
    if tuple(state.conv.shape) != conv or tuple(state.ssm.shape) != ssm:
        raise ValueError(f"state shapes conv {tuple(state.conv.shape)} / ssm {tuple(state.ssm.shape)} do not match "
                         f"the model's {conv} / {ssm}")


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class GatedRMSNorm(nn.Module):
    """norm(y * silu(z)) with one RMS statistic per group of d_inner/ngroups channels (norm_before_gate=False)."""

    def __init__(self, d: int, ngroups: int, eps: float):
        super().__init__()
        self.eps, self.ngroups = eps, ngroups
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        return gated_norm(y, z, self.weight, self.ngroups, self.eps)


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.d_model, cfg.d_in_proj, bias=cfg.bias)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(cfg.nheads))
        self.A_log = nn.Parameter(torch.empty(cfg.nheads))
        self.D = nn.Parameter(torch.ones(cfg.nheads))
        self.norm = GatedRMSNorm(cfg.d_inner, cfg.ngroups, cfg.norm_eps)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.bias)
        self.dims = ScanDims(cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state, cfg.chunk_size)

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.cfg
        return zxbcdt.split([c.d_inner, c.conv_dim, c.nheads], dim=-1)

    def _ssm_inputs(self, xBC: Tensor, dt: Tensor):
        c = self.cfg
        x, B, C = F.silu(xBC).split([c.d_inner, c.ngroups * c.d_state, c.ngroups * c.d_state], dim=-1)
        dt = F.softplus(dt + self.dt_bias.float())
        A = -torch.exp(self.A_log.float())
        return x, B, C, dt, A

    def forward(self, u: Tensor, state: LayerState | None = None) -> tuple[Tensor, LayerState]:
        """u (b, l, d_model) -> (b, l, d_model) and the state after the last token.  Between in_proj and
        out_proj everything (conv, scan, gated norm) computes in fp32 whatever the model's dtype or autocast,
        as mamba_ssm's kernels do: a 16-bit scan loses the long-range state."""
        c = self.cfg
        b = u.size(0)
        if state is not None:
            check_state(state, b, c)
        z, xBC, dt = self._split(self.in_proj(u))
        with full_precision(u.device.type):
            y, new_state = self._mix(z.float(), xBC.float(), dt.float(), state)
        return self.out_proj(y.to(u.dtype)), new_state

    def _mix(self, z: Tensor, xBC: Tensor, dt: Tensor, state: LayerState | None) -> tuple[Tensor, LayerState]:
        """fp32 z, xBC, dt (b, l, ·) -> y (b, l, d_inner) before out_proj, and the new state: conv + SiLU, the
        scan (D skip included), the gated norm."""
        b, l, _ = xBC.shape
        xBC, conv_state = conv_silu(xBC, self.conv1d.weight, self.conv1d.bias,
                                    state.conv.float() if state is not None else None)
        dt = F.softplus(dt + self.dt_bias.float())
        A = -torch.exp(self.A_log.float())
        y, ssm_state = ssd_scan(xBC, dt, A, self.D.float(), self.dims,
                                state.ssm.float() if state is not None else None)
        return self.norm(y.reshape(b, l, self.cfg.d_inner), z), LayerState(conv_state, ssm_state)

    def step(self, u: Tensor, state: LayerState, inplace: bool = False) -> tuple[Tensor, LayerState]:
        """One token: u (b, d_model) -> (b, d_model); O(1) in the sequence length.
        inplace=True updates state.ssm in place with the fused C kernel when it is available."""
        c = self.cfg
        check_state(state, u.size(0), c)
        zxbcdt = self.in_proj(u)
        if inplace and type(self.norm) is GatedRMSNorm:     # the whole step in one call (it reads norm.weight)
            fused = fused_mixer_step(self, zxbcdt, state.conv, state.ssm)
            if fused is not None:
                return self.out_proj(fused[0]), LayerState(fused[1], state.ssm)
        with full_precision(u.device.type):     # fp32 between the projections, as in forward
            z, xBC, dt = (t.float() for t in self._split(zxbcdt))
            window = torch.cat([state.conv.float(), xBC[:, :, None]], dim=2)    # (b, conv_dim, d_conv)
            xBC = (window * self.conv1d.weight[:, 0].float()).sum(-1)
            if self.conv1d.bias is not None:
                xBC = xBC + self.conv1d.bias.float()
            x, B, C, dt, A = self._ssm_inputs(xBC, dt)
            x = x.view(-1, c.nheads, c.headdim)
            B, C = B.view(-1, c.ngroups, c.d_state), C.view(-1, c.ngroups, c.d_state)
            y, ssm = ssd_step(state.ssm, x, dt, A, B, C, inplace=inplace)
            y = self.norm((y + x * self.D.float()[:, None]).reshape(-1, c.d_inner), z)
        return self.out_proj(y.to(u.dtype)), LayerState(window[:, :, 1:], ssm)


class Mamba2Block(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Mamba2Mixer(cfg)

    def forward(self, h: Tensor, state: LayerState | None = None) -> tuple[Tensor, LayerState]:
        out, state = self.mixer(self.norm(h), state)
        return h + out, state

    def step(self, h: Tensor, state: LayerState, inplace: bool = False) -> tuple[Tensor, LayerState]:
        out, state = self.mixer.step(self.norm(h), state, inplace)
        return h + out, state


class Backbone(nn.Module):
    def __init__(self, cfg: Mamba2Config, init: bool = True):
        super().__init__()
        shape = (cfg.padded_vocab_size, cfg.d_model)
        # init=False (a model about to be loaded): no default init of the table.  On the meta device that init runs
        # through torch's Python refs and imports torch._dynamo (~1.7 s of every load); elsewhere it is thrown away.
        self.embedding = nn.Embedding(*shape) if init else nn.Embedding(*shape, _weight=torch.empty(shape))
        self.layers = nn.ModuleList(Mamba2Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)


class Mamba2LM(nn.Module):
    def __init__(self, cfg: Mamba2Config, init: bool = True):
        super().__init__()
        self.config = cfg
        self.backbone = Backbone(cfg, init)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight
        if init:
            self.reset_parameters()

    # ---- initialisation (mamba_ssm's recipe) ----
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        cfg = self.config
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        nn.init.normal_(self.backbone.embedding.weight, std=cfg.initializer_range, generator=gen)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=cfg.initializer_range, generator=gen)
        for layer in self.backbone.layers:
            m = layer.mixer
            for lin in (m.in_proj, m.out_proj):
                bound = 1 / math.sqrt(lin.in_features)
                nn.init.uniform_(lin.weight, -bound, bound, generator=gen)
                if lin.bias is not None:
                    lin.bias.zero_()
            m.out_proj.weight /= math.sqrt(cfg.n_layer)  # prenorm residual rescale
            bound = 1 / math.sqrt(cfg.d_conv)
            nn.init.uniform_(m.conv1d.weight, -bound, bound, generator=gen)
            if m.conv1d.bias is not None:
                nn.init.uniform_(m.conv1d.bias, -bound, bound, generator=gen)
            u = torch.rand(cfg.nheads, generator=gen)
            dt = torch.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
            dt = dt.clamp(min=cfg.dt_init_floor)
            m.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            A = torch.empty(cfg.nheads).uniform_(cfg.A_init_min, cfg.A_init_max, generator=gen)
            m.A_log.copy_(torch.log(A))
            m.D.fill_(1.0)
            m.norm.weight.fill_(1.0)
            layer.norm.weight.fill_(1.0)
        self.backbone.norm_f.weight.fill_(1.0)

    # ---- inference ----
    def forward(self, input_ids: Tensor, state: list[LayerState] | None = None, *,
                return_state: bool = False, return_hidden: bool = False, last_only: bool = False):
        """input_ids (b, l) -> logits (b, l, padded_vocab).

        return_state: also return the per-layer states after the last token (continue with `step`).
        return_hidden: also return the residual stream after every block (for hidden-state distillation).
        last_only: logits of the last position only, (b, 1, padded_vocab) — prefill before generation."""
        h = self.backbone.embedding(input_ids)
        new_state, hidden = [], []
        for i, layer in enumerate(self.backbone.layers):
            h, s = layer(h, state[i] if state is not None else None)
            new_state.append(s)
            if return_hidden:
                hidden.append(h)
        logits = self.lm_head(self.backbone.norm_f(h[:, -1:] if last_only else h))
        if not (return_state or return_hidden):
            return logits
        out = (logits,)
        if return_state:
            out += (new_state,)
        if return_hidden:
            out += (hidden,)
        return out

    def step(self, token_ids: Tensor, state: list[LayerState], inplace: bool = False
             ) -> tuple[Tensor, list[LayerState]]:
        """token_ids (b,) -> logits (b, padded_vocab) and the next state: the plain recurrent step, module by
        module.  inplace=True lets the fused mixer kernels overwrite the given state instead of copying it.
        (The whole step in one C call is the runtime's: `runtime.decode_engine`, used by generation.)"""
        if len(state) != self.config.n_layer:
            raise ValueError(f"state has {len(state)} layers, the model {self.config.n_layer}")
        h = self.backbone.embedding(token_ids)
        new_state = []
        for layer, s in zip(self.backbone.layers, state):
            h, s = layer.step(h, s, inplace)
            new_state.append(s)
        return self.lm_head(self.backbone.norm_f(h)), new_state

    def empty_state(self, batch_size: int) -> list[LayerState]:
        c = self.config
        p = next(self.parameters())   # states are fp32 whatever the weights' dtype (the scan runs in fp32)
        return [LayerState(p.new_zeros(batch_size, c.conv_dim, c.d_conv - 1, dtype=torch.float32),
                           p.new_zeros(batch_size, c.nheads, c.headdim, c.d_state, dtype=torch.float32))
                for _ in range(c.n_layer)]
