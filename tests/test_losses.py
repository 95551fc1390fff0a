"""The fused cross-entropy and distillation KL (losses.py) against PyTorch's formulas: values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from ternary_mamba.ops.build import get_kernel
from ternary_mamba.ops.losses import cross_entropy, kl_div, kl_div_ref

pytestmark = pytest.mark.skipif(get_kernel() is None, reason="no C compiler")


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


@pytest.mark.parametrize("V,pad", [(1000, 0), (990, 10), (7, 0)])
def test_cross_entropy_matches_pytorch(V, pad):
    gen = torch.Generator().manual_seed(V)
    base = (torch.randn(3, 50, V + pad, generator=gen) * 6).requires_grad_()
    logits = base[..., :V]                                       # the padded-vocab view the models produce
    target = torch.randint(0, V, (3, 50), generator=gen)
    target[0, :5] = -100                                          # ignored positions
    ref = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    out = cross_entropy(logits, target)
    assert torch.allclose(out, ref, rtol=1e-5)
    assert torch.allclose(_grad(out, base), _grad(F.cross_entropy(logits.flatten(0, 1), target.flatten()), base),
                          atol=1e-7, rtol=1e-4)


def test_cross_entropy_rejects_out_of_range_targets():
    with pytest.raises(IndexError):
        cross_entropy(torch.randn(4, 10), torch.tensor([0, 1, 2, 10]))


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kl_matches_the_reference(tau):
    gen = torch.Generator().manual_seed(1)
    s = (torch.randn(2, 30, 517, generator=gen) * 4).requires_grad_()
    t = torch.randn(2, 30, 517, generator=gen) * 4
    ref = kl_div_ref(t, s, tau)
    out = kl_div(t, s, tau)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-7)
    assert torch.allclose(_grad(out, s), _grad(kl_div_ref(t, s, tau), s), atol=1e-8, rtol=1e-4)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_kl_equals_pytorchs_kl_div(tau):
    """Independent of our reference: torch's own F.kl_div, averaged over tokens (batchmean of the flattened rows)."""
    gen = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 17, 300, generator=gen) * 3, torch.randn(3, 17, 300, generator=gen) * 3
    want = F.kl_div(F.log_softmax(s.view(-1, 300) / tau, -1), F.log_softmax(t.view(-1, 300) / tau, -1),
                    reduction="batchmean", log_target=True)
    torch.testing.assert_close(kl_div(t, s, tau), want, rtol=1e-5, atol=1e-6)


def test_kl_gives_the_teacher_side_a_gradient_through_the_reference():
    t = torch.randn(5, 40, requires_grad=True)
    s = torch.randn(5, 40)
    assert _grad(kl_div(t, s), t).abs().sum() > 0


def test_identical_distributions_have_zero_kl():
    x = torch.randn(4, 64) * 3
    assert abs(kl_div(x, x.clone()).item()) < 1e-6
