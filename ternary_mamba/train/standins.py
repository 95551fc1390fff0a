"""Stand-ins for the fused CUDA kernels when a step is traced on the `meta` device (the planner's memory and time):
there the PyTorch references would run, which keep per-weight temporaries for their backward (the fake-quant's
masks and ratios: ~5 GB at 1.3B) that the Triton kernels never make.  A stand-in passes its input through,
saves nothing, and (given a tracer) costs the bytes the real kernel moves."""
from __future__ import annotations

import contextlib

import torch


def _nbytes(x) -> int:
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


class FusedOp(torch.autograd.Function):
    """Stands for one fused Triton kernel in the trace: forward and backward each cost the bytes given."""

    @staticmethod
    def forward(ctx, tracer, fwd_bytes, bwd_bytes, x, *others):
        ctx.tracer, ctx.bwd_bytes, ctx.n = tracer, bwd_bytes, len(others)
        if tracer is None:
            return x.clone()
        tracer.add("stream", 0.0, fwd_bytes)
        with quiet(tracer):
            return x.clone()

    @staticmethod
    def backward(ctx, g):
        if ctx.tracer is not None:
            ctx.tracer.add("stream", 0.0, ctx.bwd_bytes)
        return (None, None, None, g) + (None,) * ctx.n


class LossStandIn(torch.autograd.Function):
    """A fused loss kernel: logits in, a scalar out; its backward writes the logits' gradient."""

    @staticmethod
    def forward(ctx, tracer, fwd_bytes, bwd_bytes, logits):
        ctx.tracer, ctx.bwd_bytes = tracer, bwd_bytes
        ctx.shape, ctx.dtype, ctx.device = logits.shape, logits.dtype, logits.device
        if tracer is not None:
            tracer.add("stream", 0.0, fwd_bytes)
        with quiet(tracer):
            return logits.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, g):
        if ctx.tracer is not None:
            ctx.tracer.add("stream", 0.0, ctx.bwd_bytes)
        with quiet(ctx.tracer):
            return None, None, None, torch.zeros(ctx.shape, dtype=ctx.dtype, device=ctx.device)


class _SavesLikeTritonScan(torch.autograd.Function):
    """Keeps, for the backward, tensors of the shapes `ops.triton_scan.TritonSSD` keeps (for the memory trace)."""

    @staticmethod
    def forward(ctx, xBC, dt, A, D, dims):
        h, p, g, n, k = dims
        b, l, _ = xBC.shape
        c = -(-l // k)
        f32 = dict(device=xBC.device, dtype=torch.float32)
        ctx.save_for_backward(torch.empty(b, l, h, p, **f32), torch.empty(b, l, h, **f32),
                              torch.empty(b, l, g, n, **f32), torch.empty(b, l, g, n, **f32),
                              torch.empty(b, h, c, k, **f32), torch.empty(b, c, h, p, n, **f32))
        ctx.shapes = (xBC.shape, dt.shape, A.shape, D.shape)
        return xBC.new_empty(b, l, h, p, dtype=torch.float32), xBC.new_empty(b, h, p, n, dtype=torch.float32)

    @staticmethod
    def backward(ctx, dy, ds):
        return tuple(torch.zeros(s, device=dy.device) for s in ctx.shapes) + (None,)


@contextlib.contextmanager
def quiet(tracer):
    """Ops inside are part of a stand-in: the tracer does not count them."""
    if tracer is None:
        yield
        return
    tracer.fused += 1
    try:
        yield
    finally:
        tracer.fused -= 1


# the fused CUDA kernels the code runs today, each costed as one op each way: the ternary fake-quant, the KD loss,
# the scan (our Triton forward for the frozen teacher, forward + backward in training), causal conv + SiLU, norms
FUSED = ("fake_quant", "kd_loss", "teacher_scan", "train_scan", "conv", "norms")
# the outlook: the scan's products on tensor cores (16-bit inputs, fp32 sums, as mamba_ssm runs them for 16-bit
# activations) instead of fp32 CUDA cores
FUSED_TC = FUSED + ("scan_tensor_cores",)


class Fused(torch.autograd.Function):
    """One fused kernel each way, with given costs: forward returns `compute()` (run uncounted), backward
    returns zero gradients of the inputs' shapes (written by the kernel, uncounted beyond its bytes)."""

    @staticmethod
    def forward(ctx, tracer, fwd, bwd, compute, *inputs):
        ctx.tracer, ctx.bwd = tracer, bwd
        ctx.shapes = [(t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else None for t in inputs]
        tracer.add(*fwd)
        with quiet(tracer):
            return compute()

    @staticmethod
    def backward(ctx, *grads):
        ctx.tracer.add(*ctx.bwd)
        with quiet(ctx.tracer):
            return (None, None, None, None) + tuple(None if s is None else torch.zeros(s[0], dtype=s[1], device=s[2])
                                                    for s in ctx.shapes)


@contextlib.contextmanager
def fused_kernels(tracer=None, kernels: tuple[str, ...] = FUSED):
    """The CUDA step's fused kernels in place of their PyTorch chains: the fake-quant (reads the fp32 weight and
    its scales, writes the 16-bit weight; backward reads the 16-bit gradient and the weight, writes the fp32
    gradient), the KD loss (reads both 16-bit logits; backward writes the 16-bit gradient) and, where no gradient
    is wanted (the frozen teacher), the Triton scan forward.  Without a tracer (the memory trace) the scan is
    left as it is: the teacher keeps nothing for a backward either way."""
    from ..quant import qat
    from . import distill
    real_fq, real_kl = qat.fake_quant, distill.kl_div

    def fake_quant(w, scale, group_size, learned, fmt="fp16"):
        n = w.numel()
        return FusedOp.apply(tracer, 6 * n + _nbytes(scale), 10 * n + 2 * _nbytes(scale), w, scale)

    def kl_div(t_logits, s_logits, tau=1.0):
        n = s_logits.numel()
        return LossStandIn.apply(tracer, 4 * n, 6 * n, s_logits)

    from ..core import model as core_model
    from ..ops.scan import needs_grad, split_xbc
    real_scan = core_model.ssd_scan

    def ssd_scan(xBC, dt, A, D, dims, initial_state=None):
        """No gradient wanted (the frozen teacher): the Triton forward (ops/triton_scan.py), three kernels that
        read x, dt, B, C once and write y, plus the chunk states written, read and carried."""
        if needs_grad(xBC, dt, A, D, initial_state) or tracer is None or "teacher_scan" not in kernels:
            return real_scan(xBC, dt, A, D, dims, initial_state)
        b, l, _ = xBC.shape
        h, p, g, n, k = dims
        c = -(-l // k)
        with quiet(tracer):
            x, B, C = split_xbc(xBC, dims)
            out = (x * D[:, None]).float(), x.new_zeros(b, h, p, n, dtype=torch.float32)
        states = 4 * b * c * h * p * n
        io = _nbytes(xBC) * 2 + _nbytes(dt) + 4 * b * l * h * p * 2 + 4 * b * h * c * k * 2
        flops = 2.0 * b * c * h * (k * k * n + k * k * p + 2 * k * p * n)
        tracer.add(scan_kind, flops, io + 4 * states)
        return out

    def train_scan(xBC, dt, A, D, dims, initial_state=None):
        """The fused training scan: forward as the teacher's; backward ~5 kernels reading the inputs, the output
        gradient and the chunk states, writing the input gradients, at twice the forward's FLOPs."""
        if not needs_grad(xBC, dt, A, D, initial_state):
            return ssd_scan(xBC, dt, A, D, dims, initial_state)
        b, l, _ = xBC.shape
        h, p, g, n, k = dims
        c = -(-l // k)
        flops = 2.0 * b * c * h * (k * k * n + k * k * p + 2 * k * p * n)
        ys = 4 * b * l * h * p
        io = 2 * _nbytes(xBC) + _nbytes(dt) + ys + 4 * 4 * b * c * h * p * n

        def compute():
            x, B, C = split_xbc(xBC, dims)
            return (x * D[:, None]).float(), x.new_zeros(b, h, p, n, dtype=torch.float32)
        y, st = Fused.apply(tracer, (scan_kind, flops, io), (scan_kind, 2 * flops, 2 * io + ys), compute, xBC, dt, A, D)
        return y, st.detach()

    def conv_silu(xBC, weight, bias, conv_state=None):
        n = _nbytes(xBC)
        if not torch.is_grad_enabled() or not xBC.requires_grad and not weight.requires_grad:
            tracer.add("stream", 0.0, 2 * n)
            with quiet(tracer):
                return real_conv(xBC, weight, bias, conv_state)

        def compute():
            return real_conv(xBC, weight, bias, conv_state)
        return Fused.apply(tracer, ("stream", 0.0, 2 * n), ("stream", 0.0, 3 * n), compute, xBC, weight, bias)

    def norm_standin(real, *args):
        x = args[0]
        ins = [a for a in args if isinstance(a, torch.Tensor)]
        n = sum(_nbytes(a) for a in ins if a.dim() > 1)
        if not torch.is_grad_enabled() or not any(a.requires_grad for a in ins):
            tracer.add("stream", 0.0, n + _nbytes(x))
            with quiet(tracer):
                return real(*args)
        return Fused.apply(tracer, ("stream", 0.0, n + _nbytes(x)), ("stream", 0.0, 2 * n + _nbytes(x)),
                           lambda: real(*args), *args)

    real_conv, real_rms, real_gated = core_model.conv_silu, core_model.rms_norm, core_model.gated_norm
    scan_kind = "tensor" if "scan_tensor_cores" in kernels else "fp32"
    if "fake_quant" in kernels:
        qat.fake_quant = fake_quant
    if "kd_loss" in kernels:
        distill.kl_div = kl_div
    def train_scan_memory(xBC, dt, A, D, dims, initial_state=None):
        """The memory trace: what our Triton training scan keeps for its backward (fp32 x, B, C, dt, the chunks'
        cumulative decays and entering states), no more."""
        if not needs_grad(xBC, dt, A, D, initial_state):
            return real_scan(xBC, dt, A, D, dims, initial_state)
        return _SavesLikeTritonScan.apply(xBC, dt, A, D, dims)

    if "train_scan" in kernels:
        core_model.ssd_scan = train_scan if tracer is not None else train_scan_memory
    else:
        core_model.ssd_scan = ssd_scan
    if tracer is not None and "conv" in kernels:
        core_model.conv_silu = conv_silu
    if tracer is not None and "norms" in kernels:
        core_model.rms_norm = lambda x, w, eps: norm_standin(real_rms, x, w, eps)
        core_model.gated_norm = lambda y, z, w, g, eps: norm_standin(real_gated, y, z, w, g, eps)
    try:
        yield
    finally:
        qat.fake_quant, distill.kl_div, core_model.ssd_scan = real_fq, real_kl, real_scan
        core_model.conv_silu, core_model.rms_norm, core_model.gated_norm = real_conv, real_rms, real_gated
