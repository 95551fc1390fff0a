"""The training path's C kernels (fused_train.py) against the PyTorch references: values and every gradient."""
import contextlib
import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, tiny_config
from ternary_mamba.ops import autograd as fused
from ternary_mamba.ops.build import get_kernel
from ternary_mamba.ops.dispatch import reference_path
from ternary_mamba.ops.ssd_torch import ssd_chunked

pytestmark = pytest.mark.skipif(get_kernel() is None, reason="no C compiler")


def _close(a, b, rtol=2e-5):
    """max |a - b| relative to the largest magnitude of the reference"""
    return (a - b).abs().max().item() <= rtol * (1 + b.abs().max().item())


def _ssd_reference(xbc, dt, A, D, h, p, g, n, k, init):
    b, l, _ = xbc.shape
    x = xbc[..., :h * p].view(b, l, h, p)
    B = xbc[..., h * p:h * p + g * n].view(b, l, g, n)
    C = xbc[..., h * p + g * n:].view(b, l, g, n)
    y, s = ssd_chunked(x, dt, A, B, C, k, init)
    return y + x * D[:, None], s


@pytest.mark.parametrize("b,l,h,p,g,n,k,with_init", [
    (2, 64, 4, 16, 1, 16, 16, False),     # whole chunks
    (2, 100, 4, 32, 2, 32, 32, True),     # a ragged last chunk, two groups, a differentiable initial state
    (3, 37, 6, 16, 3, 16, 16, True),      # three groups of two heads
    (1, 5, 2, 16, 1, 16, 64, False),      # shorter than one chunk
])
def test_ssd_train_matches_autograd_of_the_chunked_scan(b, l, h, p, g, n, k, with_init):
    gen = torch.Generator().manual_seed(l)
    xbc = torch.randn(b, l, h * p + 2 * g * n, generator=gen).requires_grad_()
    dt = (torch.rand(b, l, h, generator=gen) * 0.5 + 0.01).requires_grad_()
    A = (-torch.rand(h, generator=gen) * 2).requires_grad_()
    D = torch.randn(h, generator=gen).requires_grad_()
    init = torch.randn(b, h, p, n, generator=gen).requires_grad_() if with_init else None
    gy, gs = torch.randn(b, l, h, p, generator=gen), torch.randn(b, h, p, n, generator=gen)
    leaves = [t for t in (xbc, dt, A, D, init) if t is not None]
    results = []
    for fn in (_ssd_reference, lambda *a: fused.ssd_train(*a)):
        y, s = fn(xbc, dt, A, D, h, p, g, n, k, init)
        grads = torch.autograd.grad((y * gy).sum() + (s * gs).sum(), leaves)
        results.append((y.detach(), s.detach(), grads))
    (y_ref, s_ref, g_ref), (y, s, g_fused) = results
    assert _close(y, y_ref) and _close(s, s_ref)
    for name, a, r in zip(["xbc", "dt", "A", "D", "init"], g_fused, g_ref):
        assert _close(a, r), name


def test_ssd_train_without_a_gradient_for_the_final_state():
    h, p, g, n, k = 2, 16, 1, 16, 16
    xbc = torch.randn(2, 40, h * p + 2 * g * n, requires_grad=True)
    dt, A, D = torch.rand(2, 40, h) * 0.3, -torch.rand(h), torch.randn(h)
    y_ref, _ = _ssd_reference(xbc, dt, A, D, h, p, g, n, k, None)
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), xbc)
    y, _ = fused.ssd_train(xbc, dt, A, D, h, p, g, n, k)
    (g_fused,) = torch.autograd.grad(y.square().sum(), xbc)
    assert _close(g_fused, g_ref)


def _conv_reference(xbc, weight, bias, prev):
    b, l, cd = xbc.shape
    K = weight.size(-1)
    hist = prev.transpose(1, 2) if prev is not None else xbc.new_zeros(b, K - 1, cd)
    xp = torch.cat([hist, xbc], 1)
    out = sum(xp[:, q:q + l] * weight[:, 0, q] for q in range(K))
    if bias is not None:
        out = out + bias
    return F.silu(out), xp[:, xp.size(1) - (K - 1):].transpose(1, 2)


@pytest.mark.parametrize("l,with_prev,with_bias,cd", [(33, False, True, 48), (2, True, True, 40), (17, True, False, 21)])
def test_conv_silu_train_matches_autograd(l, with_prev, with_bias, cd):
    gen = torch.Generator().manual_seed(l)
    b, K = 2, 4
    base = torch.randn(b, l, cd + 5, generator=gen).requires_grad_()
    xbc = base[..., 2:2 + cd]                                          # a strided view, like the split of in_proj
    weight = torch.randn(cd, 1, K, generator=gen).requires_grad_()
    bias = torch.randn(cd, generator=gen).requires_grad_() if with_bias else None
    prev = torch.randn(b, cd, K - 1, generator=gen).requires_grad_() if with_prev else None
    go, gst = torch.randn(b, l, cd, generator=gen), torch.randn(b, cd, K - 1, generator=gen)
    leaves = [t for t in (base, weight, bias, prev) if t is not None]
    results = []
    for fn in (_conv_reference, fused.conv_silu_train):
        out, st = fn(xbc, weight, bias, prev)
        grads = torch.autograd.grad((out * go).sum() + (st * gst).sum(), leaves)
        results.append((out.detach(), st.detach(), grads))
    (o_ref, s_ref, g_ref), (o, s, g_fused) = results
    assert _close(o, o_ref) and torch.equal(s, s_ref)
    for a, r in zip(g_fused, g_ref):
        assert _close(a, r)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_training_step_gradients_match_the_pytorch_path(ngroups):
    """The whole model: loss and every parameter gradient with the fused kernels vs the PyTorch reference."""
    cfg = tiny_config(ngroups=ngroups, chunk_size=16)
    model = random_model(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 45))
    grads = {}
    for impl in ("torch", "chunked"):
        model.zero_grad()
        with reference_path() if impl == "torch" else contextlib.nullcontext():
            loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
        grads[impl] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (l_ref, g_ref), (l_fused, g_fused) = grads["torch"], grads["chunked"]
    assert abs(l_ref - l_fused) < 1e-5
    for name in g_ref:
        assert _close(g_fused[name], g_ref[name], rtol=1e-4), name


def test_the_fused_path_is_the_one_training_takes():
    cfg = tiny_config()
    model = random_model(cfg).train()
    seen = []
    orig = fused._SSDTrain.forward

    def spy(*a, **k):
        seen.append(True)
        return orig(*a, **k)
    fused._SSDTrain.forward = staticmethod(spy)
    try:
        model(torch.randint(0, cfg.vocab_size, (1, 20))).sum().backward()
    finally:
        fused._SSDTrain.forward = staticmethod(orig)
    assert len(seen) == cfg.n_layer


@pytest.mark.parametrize("ngroups,d", [(1, 64), (2, 48), (4, 20)])
def test_gated_norm_train_matches_the_module(ngroups, d):
    from ternary_mamba.core.model import GatedRMSNorm
    gen = torch.Generator().manual_seed(d)
    norm = GatedRMSNorm(d, ngroups, 1e-5)
    with torch.no_grad():
        norm.weight.add_(torch.randn(d, generator=gen) * 0.3)
    y = torch.randn(2, 9, d, generator=gen).requires_grad_()
    zbase = torch.randn(2, 9, d + 7, generator=gen).requires_grad_()
    z = zbase[..., 3:3 + d]                                            # a strided view, like the split of in_proj
    go = torch.randn(2, 9, d, generator=gen)
    results = []
    for fn in (lambda: norm(y, z), lambda: fused.gated_norm_train(y, z, norm.weight, ngroups, norm.eps)):
        out = fn()
        results.append((out.detach(), torch.autograd.grad((out * go).sum(), (y, zbase, norm.weight))))
    (o_ref, g_ref), (o, g) = results
    assert _close(o, o_ref)
    for a, r in zip(g, g_ref):
        assert _close(a, r, rtol=1e-5)


def test_rms_norm_train_matches_the_formula():
    from ternary_mamba.core.model import RMSNorm
    gen = torch.Generator().manual_seed(3)
    norm = RMSNorm(40, 1e-5)
    with torch.no_grad():
        norm.weight.add_(torch.randn(40, generator=gen) * 0.3)
    x = (torch.randn(3, 7, 40, generator=gen) * 2).requires_grad_()
    go = torch.randn(3, 7, 40, generator=gen)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    g_ref = torch.autograd.grad((ref * go).sum(), (x, norm.weight))
    out = norm(x)                                  # the module takes the fused path under autograd
    assert out.grad_fn is not None and "RMSNorm" in type(out.grad_fn).__name__
    g = torch.autograd.grad((out * go).sum(), (x, norm.weight))
    assert _close(out.detach(), ref.detach())
    for a, r in zip(g, g_ref):
        assert _close(a, r, rtol=1e-5)


def test_double_backward_through_a_c_kernel_raises_instead_of_returning_zeros():
    x = torch.randn(2, 5, 16, requires_grad=True)
    w = torch.ones(16, requires_grad=True)
    (g,) = torch.autograd.grad(fused.rms_norm_train(x, w, 1e-5).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
