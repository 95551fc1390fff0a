"""The QAT + knowledge-distillation objective: a frozen full-precision teacher, a ternary student.

    loss = τ² · KL(p_teacher^τ ‖ p_student^τ) + α · CE(student, data) + β · mean_l ‖h_s^l − h_t^l‖² / ‖h_t^l‖²
           + γ · mean_{l,k} ‖S_s^l(t_k) − S_t^l(t_k)‖² / ‖S_t^l(t_k)‖²

State distillation (γ > 0): both models run the window in `state_segments` pieces, passing their states on
(the same computation, and the same gradient: the state passing is differentiable), and every layer's SSM
state at each boundary t_k is matched to the teacher's — the error the recurrence carries, penalised where it
is carried.  No anchor of the paper has it.

The teacher runs under no_grad in eval mode, stored in the run's dtype (16-bit for bf16 / fp16 runs: the
paper's FP16 teacher); the student keeps fp32 master weights and runs under autocast.
Logits are compared over the real vocabulary only (the padded rows never receive probability mass).
"""
from __future__ import annotations


import torch

from ..ops.device import scalar
from ..ops.losses import cross_entropy, kl_div
from ..quant.qat import set_lambda
from ..runtime.metrics import heldout_metrics
from .objectives import param_groups, with_scale_group


def frozen_teacher(teacher, device, dtype):
    """The distillation teacher on `device`, frozen.  Under a 16-bit dtype only its projections (in_proj, out_proj:
    nearly all of its bytes) are stored in it; the SSM parameters (A_log, dt_bias ~ -4..-7 would round to steps of
    1/32 in bf16, D), the conv, the norms and the embedding with its tied head stay fp32, so the residual stream
    stays fp32 too (mamba_ssm's residual_in_fp32) and the logits keep their precision."""
    teacher = teacher.to(device)
    if dtype != torch.float32:
        head = getattr(teacher, "lm_head", None)
        for m in teacher.modules():
            if isinstance(m, torch.nn.Linear) and m is not head:
                m.to(dtype)
    return teacher.eval().requires_grad_(False)


class DistillObjective:
    def __init__(self, teacher, *, tau: float = 1.0, alpha_ce: float = 0.0, beta_hidden: float = 0.0,
                 weight_decay: float = 0.0, scale_lr_mult: float = 1.0, scale_weight_decay: float = 0.0,
                 monitor=None, lam_warmup_steps: int = 0, gamma_state: float = 0.0, state_segments: int = 4):
        self.teacher = teacher.eval().requires_grad_(False)
        self.vocab = teacher.config.vocab_size
        self.tau, self.alpha, self.beta = tau, alpha_ce, beta_hidden
        self.wd, self.scale_lr_mult, self.scale_wd = weight_decay, scale_lr_mult, scale_weight_decay
        self._mon, self.lam_warmup = monitor, lam_warmup_steps
        self.gamma, self.segments = gamma_state, state_segments

    def param_groups(self, model):
        return with_scale_group(model, param_groups(model, self.wd), self.scale_lr_mult, self.scale_wd)

    def loss(self, student, batch):
        x, y = batch[:, :-1], batch[:, 1:]
        if self.gamma > 0:
            if self.beta > 0:
                raise ValueError("state and hidden-state distillation together are not supported")
            with torch.no_grad():
                t_logits, t_states = segmented_forward(self.teacher, x, self.segments)
            s_logits, s_states = segmented_forward(student, x, self.segments)
            state_mse = sum(((s - t).pow(2).flatten(1).sum(-1) / t.pow(2).flatten(1).sum(-1).clamp_min(1e-12)).mean()
                            for s, t in zip(s_states, t_states)) / len(s_states)
            t_out = s_out = None
        else:
            with torch.no_grad():
                t_out = self.teacher(x, return_hidden=self.beta > 0)
            s_out = student(x, return_hidden=self.beta > 0)
            t_logits, s_logits = (t_out[0], s_out[0]) if self.beta > 0 else (t_out, s_out)
        # the losses sum in fp32 whatever the forward's precision; on CUDA the fused KL reads 16-bit logits as they
        # are (no fp32 copies of (tokens x vocab)), elsewhere they are cast (a no-op for fp32 logits)
        t_logits, s_logits = t_logits[..., :self.vocab], s_logits[..., :self.vocab]
        if s_logits.device.type != "cuda":
            t_logits, s_logits = t_logits.float(), s_logits.float()
        kl = kl_div(t_logits, s_logits, self.tau)
        loss = self.tau ** 2 * kl
        metrics = {"kl": scalar(kl)}
        if self.alpha > 0:
            ce = cross_entropy(s_logits.float(), y)
            loss = loss + self.alpha * ce
            metrics["ce"] = scalar(ce)
        if self.beta > 0:
            hid = sum(((hs.float() - ht.float()).pow(2).mean() / ht.float().pow(2).mean())
                      for hs, ht in zip(s_out[1], t_out[1])) / len(s_out[1])
            loss = loss + self.beta * hid
            metrics["hidden_mse"] = scalar(hid)
        if self.gamma > 0:
            loss = loss + self.gamma * state_mse
            metrics["state_mse"] = scalar(state_mse)
        metrics["loss"] = scalar(loss)
        return loss, metrics

    @torch.no_grad()
    def evaluate(self, student, heldout, n_batches: int, batch_size: int) -> dict:
        return evaluate_vs_teacher(student, self.teacher, heldout, n_batches, batch_size)

    def monitor(self, model, step):
        return self._mon.record(model, step) if self._mon else {}

    def check(self, rec):
        if self._mon:
            self._mon.check(rec)

    def after_step(self, model, step):
        if self.lam_warmup:
            set_lambda(model, min(1.0, (step + 1) / self.lam_warmup))

    def progress(self, rec):
        s = f"loss {rec['loss']:.3f} | kl {rec['kl']:.3f}"
        if "eval_ppl" in rec:
            s += f" | held-out ppl {rec['eval_ppl']:.2f} kl {rec['eval_kl']:.3f}"
        if "zero_ratio" in rec:
            s += f" | zero {rec['zero_ratio']:.3f}"
        return s


def segmented_forward(model, x, segments: int):
    """logits of x (b, l) computed in `segments` pieces with the state passed on, and the SSM state of every
    layer at every boundary but the last: (logits, [state (b, H, P, N)] over boundaries × layers)."""
    seg = -(-x.size(1) // segments)
    state, logits, states = None, [], []
    for i in range(0, x.size(1), seg):
        out, state = model(x[:, i:i + seg], state, return_state=True)
        logits.append(out)
        if i + seg < x.size(1):
            states += [s.ssm for s in state]
    return torch.cat(logits, 1), states


def evaluate_vs_teacher(student, teacher, heldout, n_batches: int, batch_size: int,
                        progress: str | None = None) -> dict:
    """Held-out CE / perplexity of the student, KL(teacher ‖ student) and top-1 agreement (runtime.metrics);
    `progress`: a label for a progress bar on stderr."""
    return heldout_metrics(student, heldout, n_batches * batch_size, batch_size, teacher=teacher,
                           progress=progress)
