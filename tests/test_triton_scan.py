"""The SSD scan's Triton forward (ops/triton_scan.py) against the PyTorch reference on CPU tensors under Triton's
interpreter (TRITON_INTERPRET=1): odd lengths, shorter than a chunk, exact chunk multiples, groups, initial
states, widths that are not powers of two; and the dispatcher's choice of it for tensors that need no gradient."""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton decorates the kernels  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
ts = pytest.importorskip("ternary_mamba.ops.triton_scan")

from ternary_mamba.ops.scan import ScanDims, ssd_scan, ssd_scan_ref  # noqa: E402


def _inputs(b, l, h, p, g, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xBC = torch.randn(b, l, h * p + 2 * g * n, generator=gen)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=gen) - 1)
    A = -(torch.rand(h, generator=gen) * 6 + 0.2)          # decays from mild to strong
    D = torch.randn(h, generator=gen)
    init = torch.randn(b, h, p, n, generator=gen)
    return xBC, dt, A, D, init


@pytest.mark.parametrize("l", [1, 13, 37, 64])
@pytest.mark.parametrize("shape", [(4, 16, 1, 16), (4, 16, 2, 32), (6, 24, 3, 20)])
@pytest.mark.parametrize("with_init", [False, True])
def test_the_triton_forward_equals_the_reference(l, shape, with_init):
    h, p, g, n = shape
    xBC, dt, A, D, init = _inputs(2, l, h, p, g, n, seed=l)
    dims = ScanDims(h, p, g, n, 16)
    from ternary_mamba.ops.scan import split_xbc
    x, B, C = split_xbc(xBC, dims)
    y1, s1 = ts.ssd_scan_fwd(x, dt, A, B, C, D, 16, init if with_init else None)
    y2, s2 = ssd_scan_ref(xBC, dt, A, D, dims, init if with_init else None)
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s1, s2, rtol=1e-4, atol=1e-4)


def test_other_chunk_sizes_are_refused_not_miscomputed():
    xBC, dt, A, D, _ = _inputs(1, 8, 2, 16, 1, 16)
    x, B, C = xBC[..., :32].view(1, 8, 2, 16), xBC[..., 32:48].view(1, 8, 1, 16), xBC[..., 48:].view(1, 8, 1, 16)
    with pytest.raises(ValueError, match="powers of two"):
        ts.ssd_scan_fwd(x, dt, A, B, C, D, 24)


def test_the_dispatcher_takes_it_when_no_gradient_is_wanted(monkeypatch):
    """On CUDA tensors (here: CPU tensors presented as CUDA's) that need no gradient, `ssd_scan` runs the Triton
    forward; with gradients it does not."""
    from ternary_mamba.ops import dispatch, scan
    monkeypatch.setattr(scan, "kernels_for", lambda *t: False)
    monkeypatch.setattr(scan, "mamba_ssm_scan", lambda x: None)
    monkeypatch.setattr(scan, "triton_for", lambda *t: True)
    xBC, dt, A, D, init = _inputs(1, 40, 4, 16, 2, 16)
    dims = ScanDims(4, 16, 2, 16, 16)
    with torch.no_grad():
        y, s = ssd_scan(xBC, dt, A, D, dims, init)
    assert dispatch.last_impl("ssd_scan") == "triton-fwd"
    y2, s2 = ssd_scan_ref(xBC, dt, A, D, dims, init)
    torch.testing.assert_close(y, y2, rtol=1e-4, atol=1e-4)
    ssd_scan(xBC.requires_grad_(), dt, A, D, dims, init)
    assert dispatch.last_impl("ssd_scan") != "triton-fwd"


def _value_and_grads(fn, ins, dims, final_grad: bool):
    xs = [t.clone().requires_grad_() if t is not None else None for t in ins]
    y, s = fn(xs[0], xs[1], xs[2], xs[3], dims, xs[4])
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    loss = (y * gy).sum()
    if final_grad:
        loss = loss + (s * torch.randn(s.shape, generator=torch.Generator().manual_seed(2))).sum()
    loss.backward()
    return y.detach(), s.detach(), [t.grad if t is not None else None for t in xs]


@pytest.mark.parametrize("l", [5, 37, 64])
@pytest.mark.parametrize("shape", [(4, 16, 2, 16), (6, 24, 3, 20)])
@pytest.mark.parametrize("with_init,final_grad", [(False, False), (True, True)])
def test_the_triton_training_scan_equals_the_reference_in_values_and_every_gradient(l, shape, with_init, final_grad):
    h, p, g, n = shape
    xBC, dt, A, D, init = _inputs(2, l, h, p, g, n, seed=100 + l)
    dims = ScanDims(h, p, g, n, 16)
    ins = [xBC, dt, A, D, init if with_init else None]
    y1, s1, g1 = _value_and_grads(ts.ssd_scan_train, ins, dims, final_grad)
    y2, s2, g2 = _value_and_grads(ssd_scan_ref, ins, dims, final_grad)
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s1, s2, rtol=1e-4, atol=1e-4)
    for name, a, b in zip(["xBC", "dt", "A", "D", "init"], g1, g2):
        if b is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, float(b.abs().max()))), name


def test_the_dispatcher_trains_through_the_triton_kernels(monkeypatch):
    from ternary_mamba.ops import dispatch, scan
    monkeypatch.setattr(scan, "kernels_for", lambda *t: False)
    monkeypatch.setattr(scan, "mamba_ssm_scan", lambda x: None)
    monkeypatch.setattr(scan, "triton_for", lambda *t: True)
    xBC, dt, A, D, _ = _inputs(1, 20, 2, 16, 1, 16)
    dims = ScanDims(2, 16, 1, 16, 16)
    y, _ = ssd_scan(xBC.requires_grad_(), dt, A, D, dims)
    assert dispatch.last_impl("ssd_scan") == "triton"
    y.sum().backward()
    assert xBC.grad is not None and torch.isfinite(xBC.grad).all()
