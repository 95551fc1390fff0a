"""Post-training ternarization and the post-hoc corrections that work for Transformers.

`posthoc_quantize(teacher, calib, ...)` returns an absmean-ternary student (no training), optionally with:

  qep      error-propagation compensation in the spirit of QEP: layers are processed in order; before a
           linear is ternarized, its latent weight is re-fitted so that, fed the inputs X̂ produced by the
           already-quantized layers before it, it reproduces the teacher's outputs X Wᵀ:
               W* = argmin ‖X Wᵀ − X̂ W*ᵀ‖² + λ‖W* − W‖²  =  W + α · W (X − X̂)ᵀ X̂ (X̂ᵀX̂ + λI)⁻¹
           and W* is ternarized (absmean).  The result is still a plain ternary student (packable).
  lowrank  a rank-r term U V beside the ternary weight, fitted to the error E = W − Q (W* − Q after QEP)
           by a truncated SVD,
           or activation-weighted (minimising ‖X̂ (E − UV)ᵀ‖ via the Cholesky factor of X̂ᵀX̂).
           Its parameters are extra (fp16 in the size accounting).
  gptq     GPTQ-style second-order ternarization (Frantar et al. 2022): columns are quantized one at a time
           and each one's error is spread over the not-yet-quantized columns through the inverse Hessian
           H = X̂ᵀX̂ of the calibration inputs; each group's scale is the MSE-optimal one of its (updated)
           weights, chosen when the group is reached.  Scales are then stored (scale mode "frozen").
  bias     per-output-channel mean correction: b = mean(X Wᵀ) − mean(X̂ Q̃ᵀ) on calibration data, where
           Q̃ is everything the student's linear computes; corrects the systematic output shift.

All are computed sequentially, layer by layer, with the student's *own* inputs X̂ (those of the
already-corrected layers before), which is the most favourable setting for them.  The inputs come from
`BlockInputs`: each model's residual stream is kept at the current block and advanced one block at a time.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError
from .qat import TernaryConfig, quantize_, ternary_modules

METHODS = ("bias", "lowrank", "qep", "gptq")


@dataclass
class PosthocConfig:
    methods: tuple[str, ...] = ()
    rank: int = 8
    act_weighted: bool = True
    qep_alpha: float = 1.0
    damp: float = 0.01          # λ = damp · mean(diag(X̂ᵀX̂))

    def __post_init__(self):
        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise UserError(f"unknown correction {bad[0]!r}; choose from {', '.join(METHODS)}")
        if "lowrank" in self.methods and self.rank <= 0:
            raise UserError(f"--rank {self.rank}: the low-rank correction needs rank >= 1")
        if not 0 <= self.qep_alpha <= 1:
            raise UserError(f"--qep-alpha {self.qep_alpha} must lie in [0, 1]")

    @property
    def label(self) -> str:
        if not self.methods:
            return "PTQ"
        if self.methods[0] == "gptq":
            rest = PosthocConfig(self.methods[1:], self.rank, self.act_weighted).label
            return "GPTQ" + rest[3:]
        parts = [("low-rank r%d%s" % (self.rank, " (act.-weighted)" if self.act_weighted else ""))
                 if m == "lowrank" else {"bias": "bias corr.", "qep": "QEP", "gptq": "GPTQ"}[m] for m in self.methods]
        return "PTQ + " + " + ".join(parts)


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_inputs(model, module, batches: list[Tensor]) -> Tensor:
    """The inputs (tokens, in_features) that `module` of `model` sees on the calibration batches.
    The forward is cut short right after the module (the rest of the network is not needed)."""
    seen: list[Tensor] = []

    def hook(_m, args):
        seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        raise _Stop

    h = module.register_forward_pre_hook(hook)
    try:
        for b in batches:
            try:
                model(b)
            except _Stop:
                pass
    finally:
        h.remove()
    return torch.cat(seen)


class BlockInputs:
    """The residual stream entering block l of `model` on the calibration batches, advanced one block at a time:
    capturing a module's inputs then costs one block's forward, not the whole prefix's (O(L), not O(L²)).
    Advance only once every module of the current block is final (the student's are corrected in place)."""

    def __init__(self, model, batches: list[Tensor]):
        self.model, self.layer = model, 0
        self.h = [model.backbone.embedding(b) for b in batches]

    def capture(self, module, layer: int) -> Tensor:
        while self.layer < layer:
            block = self.model.backbone.layers[self.layer]
            self.h = [_residual(block(h)) for h in self.h]
            self.layer += 1
        return capture_inputs(self.model.backbone.layers[layer], module, self.h)


def _residual(out):
    return out[0] if isinstance(out, tuple) else out      # a Mamba-2 block also returns its state


def _damped(H: Tensor, damp: float) -> Tensor:
    lam = damp * H.diagonal().mean().clamp_min(1e-8)
    return H + lam * torch.eye(H.shape[0], dtype=H.dtype)


def qep_weight(W: Tensor, X: Tensor, Xq: Tensor, alpha: float, damp: float) -> Tensor:
    """W + α · W (X − X̂)ᵀ X̂ (X̂ᵀX̂ + λI)⁻¹  (float64 solve)."""
    W64, X64, Xq64 = W.double(), X.double(), Xq.double()
    H = _damped(Xq64.T @ Xq64, damp)
    delta = torch.linalg.solve(H, ((X64 - Xq64).T @ Xq64).T @ W64.T).T   # W (X−X̂)ᵀ X̂ H⁻¹
    return (W64 + alpha * delta).to(W.dtype)


def lowrank_fit(E: Tensor, rank: int, Xq: Tensor | None, damp: float) -> tuple[Tensor, Tensor]:
    """(U (out, r), V (r, in)) with U V ≈ E; activation-weighted when Xq is given."""
    E64 = E.double()
    if Xq is None:
        U, S, Vh = torch.linalg.svd(E64, full_matrices=False)
        return (U[:, :rank] * S[:rank]).to(E.dtype), Vh[:rank].to(E.dtype)
    C = _damped(Xq.double().T @ Xq.double() / Xq.shape[0], damp)
    L = torch.linalg.cholesky(C)                                   # C = L Lᵀ;  ‖X̂ Eᵀ‖² ∝ ‖E L‖²
    U, S, Vh = torch.linalg.svd(E64 @ L, full_matrices=False)
    V = torch.linalg.solve_triangular(L, Vh[:rank], upper=False, left=False)   # Vh L⁻¹
    return (U[:, :rank] * S[:rank]).to(E.dtype), V.to(E.dtype)


@torch.no_grad()
def gptq_ternary(W: Tensor, H: Tensor, group_size: int, damp: float = 0.01, block: int = 128,
                 fmt: str = "fp16") -> tuple[Tensor, Tensor]:
    """W (out, in) and H = XᵀX (in, in) -> (dequantized ternary weight Q, fp16-valued scales (out, in // G)).
    Columns in order; the error of each is compensated on the later columns by the Cholesky factor of H⁻¹."""
    from .ternary import absmean_scale, mse_optimal_zeros, round_scale
    W = W.double().clone()
    n = W.shape[1]
    G = group_size
    H = H.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H = _damped(H, damp)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    block = max(G, block // G * G)
    Q = torch.zeros_like(W)
    scales = W.new_zeros(W.shape[0], n // G)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, Hi = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % G == 0:   # the group's scale, from its weights as updated so far
                g = W1[:, i:i + G].float()
                r, _ = mse_optimal_zeros(g, G)
                scales[:, col // G] = round_scale(absmean_scale(g, G) * r, fmt)[:, 0].double()
            s = scales[:, col // G]
            w = W1[:, i]
            q = s * (w / s).clamp(-1, 1).round()
            err = (w - q) / Hi[i, i]
            W1[:, i:] -= err[:, None] * Hi[i, i:][None, :]
            Err[:, i] = err
            Q[:, col] = q
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return Q.float(), scales.float()


@torch.no_grad()
def posthoc_quantize(teacher, calib: list[Tensor], group_size: int = 128, cfg: PosthocConfig | None = None,
                     progress=None):
    """A ternary student of `teacher` made without training (absmean scales), with the corrections in
    `cfg` fitted on the calibration batches.  Returns (student, per-module fit statistics)."""
    cfg = cfg or PosthocConfig()
    teacher = teacher.eval()
    student = copy.deepcopy(teacher)
    tcfg = TernaryConfig(group_size=group_size, scale_mode="frozen" if "gptq" in cfg.methods else "absmean",
                         corr_bias="bias" in cfg.methods,
                         corr_rank=cfg.rank if "lowrank" in cfg.methods else 0)
    quantize_(student, tcfg)
    student.eval().requires_grad_(False)
    t_mods = dict(teacher.named_modules())
    stats = {}
    mods = ternary_modules(student)
    streams = (BlockInputs(teacher, calib), BlockInputs(student, calib)) if cfg.methods else None
    for i, (name, m) in enumerate(mods):
        if progress:
            progress(i, len(mods), name)
        if not cfg.methods:
            break
        W = t_mods[name].weight.detach().float()
        layer = re.match(r"backbone\.layers\.(\d+)\.", name)
        if layer is not None and int(layer.group(1)) >= streams[0].layer:   # blocks in order: one block's forward
            X = streams[0].capture(t_mods[name], int(layer.group(1)))
            Xq = streams[1].capture(m, int(layer.group(1)))
        else:
            X = capture_inputs(teacher, t_mods[name], calib)
            Xq = capture_inputs(student, m, calib)
        st = {"input_rel_err": ((Xq - X).norm() / X.norm().clamp_min(1e-12)).item()}
        target = W                                  # what the ternary weight (+ low rank) should reproduce
        if "qep" in cfg.methods:
            target = qep_weight(W, X, Xq, cfg.qep_alpha, cfg.damp)
            m.weight.copy_(target)
        if "gptq" in cfg.methods:
            Q, s = gptq_ternary(target, Xq.T @ Xq, m.group_size, cfg.damp, fmt=m.scale_format)
            m.weight.copy_(Q)                       # latent = Q exactly: its codes under the stored scales
            m.scale.copy_(s)
        if "lowrank" in cfg.methods:
            E = target.float() - m.quantized_weight()   # W (or QEP's re-fitted W*, its LS optimum) minus Q
            U, V = lowrank_fit(E, cfg.rank, Xq if cfg.act_weighted else None, cfg.damp)
            m.corr_u.copy_(U)
            m.corr_v.copy_(V)
        if "bias" in cfg.methods:
            m.corr_bias.zero_()
            m.corr_bias.copy_((X @ W.T).mean(0) - m(Xq).mean(0))
        ref = X @ W.T
        st["output_rel_err"] = ((m(Xq) - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        stats[name] = st
    return student, stats


def correction_params(student) -> int:
    """Number of extra (non-ternary) parameters the corrections add."""
    n = 0
    for _, m in ternary_modules(student):
        for t in (m.corr_bias, m.corr_u, m.corr_v):
            n += t.numel() if t is not None else 0
    return n
