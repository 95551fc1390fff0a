"""The Triton norms (ops/triton_norms.py) against their PyTorch references, values and every gradient, on CPU
tensors under Triton's interpreter (TRITON_INTERPRET=1): odd widths, several groups, bf16 inputs."""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton decorates the kernels  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
tn = pytest.importorskip("ternary_mamba.ops.triton_norms")

from ternary_mamba.ops.norms import gated_norm_ref, rms_norm_ref  # noqa: E402


def _grads(fn, *xs):
    xs = [x.clone().requires_grad_() for x in xs]
    out = fn(*xs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    (out.float() * g).sum().backward()
    return out.detach(), [x.grad for x in xs]


@pytest.mark.parametrize("shape", [(3, 5, 64), (7, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_the_reference(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    w = torch.rand(shape[-1], generator=gen) + 0.5
    o1, g1 = _grads(lambda a, b: tn.rms_norm(a, b, 1e-5), x, w)
    o2, g2 = _grads(lambda a, b: rms_norm_ref(a, b, 1e-5), x, w)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(o1.float(), o2.float(), rtol=tol, atol=tol)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("d,ngroups", [(64, 1), (96, 3), (96, 2), (128, 8)])
def test_gated_norm_matches_the_reference(d, ngroups):
    gen = torch.Generator().manual_seed(d)
    y, z = torch.randn(2, 9, d, generator=gen) * 2, torch.randn(2, 9, d, generator=gen) * 2
    w = torch.rand(d, generator=gen) + 0.5
    o1, g1 = _grads(lambda a, b, c: tn.gated_norm(a, b, c, ngroups, 1e-5), y, z, w)
    o2, g2 = _grads(lambda a, b, c: gated_norm_ref(a, b, c, ngroups, 1e-5), y, z, w)
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
