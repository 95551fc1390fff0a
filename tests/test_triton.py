"""The Triton kernels against their PyTorch references, run on CPU tensors by Triton's interpreter
(TRITON_INTERPRET=1).  Skipped where triton is not installed (the test extra installs it)."""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton decorates the kernels  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
tk = pytest.importorskip("ternary_mamba.ops.triton_kernels")

from ternary_mamba.ops.losses import kl_div_ref  # noqa: E402
from ternary_mamba.quant.ternary import TernarySTE, absmean_scale  # noqa: E402
from conftest import fake_quant_weights  # noqa: E402


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
@pytest.mark.parametrize("learned", [False, True])
def test_fake_quant_forward_is_bit_exact_and_backward_agrees(fmt, learned):
    G = 64
    w, s = fake_quant_weights(G=G)
    w1, s1 = w.clone().requires_grad_(), s.clone().requires_grad_()
    w2, s2 = w.clone().requires_grad_(), s.clone().requires_grad_()
    ref = TernarySTE.apply(w1, s1, G, learned, fmt)
    got = tk.ternary_fake_quant(w2, s2, G, learned, fmt)
    assert torch.equal(got, ref)
    dq = torch.randn_like(ref)
    (ref * dq).sum().backward()
    (got * dq).sum().backward()
    assert torch.equal(w2.grad, w1.grad)
    if learned:
        assert torch.allclose(s2.grad, s1.grad, rtol=1e-5, atol=1e-7)
    else:
        assert s2.grad is None and s1.grad is None


def test_fake_quant_with_the_absmean_computed_in_the_kernel():
    G = 128
    w, _ = fake_quant_weights(out_f=16, in_f=512, G=G, seed=3)
    ref = TernarySTE.apply(w, absmean_scale(w, G), G, False, "fp16")
    got = tk.ternary_fake_quant(w, None, G, False, "fp16")
    # the kernel sums |w| in another order: the fp16-rounded scales agree unless a sum sits on a rounding edge
    assert (got == ref).float().mean() > 0.999


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_fused_kl_matches_the_reference_and_its_gradient(tau):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(6, 1000, generator=g) * 3
    s = (torch.randn(6, 1000, generator=g) * 3).requires_grad_()
    s_ref = s.detach().clone().requires_grad_()
    got = tk.kl_div(t, s, tau)
    ref = kl_div_ref(t, s_ref, tau)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    got.backward()
    ref.backward()
    assert torch.allclose(s.grad, s_ref.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("learned", [False, True])
def test_fake_quant_can_write_the_bf16_the_gemm_reads(learned):
    """Under bf16 autocast with bf16 scales the kernel writes bf16: the same values as the fp32 reference (s·t is
    exact in bf16), and the same gradients."""
    G = 64
    w, s = fake_quant_weights(G=G)
    w1, s1 = w.clone().requires_grad_(), s.clone().requires_grad_()
    w2, s2 = w.clone().requires_grad_(), s.clone().requires_grad_()
    ref = TernarySTE.apply(w1, s1, G, learned, "bf16")
    got = tk.ternary_fake_quant(w2, s2, G, learned, "bf16", torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got.float(), ref)
    dq = torch.randn_like(ref).bfloat16()
    (ref * dq.float()).sum().backward()
    (got.float() * dq.float()).sum().backward()
    assert w2.grad.dtype == torch.float32 and torch.allclose(w2.grad, w1.grad)
    if learned:
        assert torch.allclose(s2.grad, s1.grad, rtol=1e-5, atol=1e-7)


def test_kl_reads_16_bit_logits_as_they_are():
    """The fused KL on bf16 logits (what the heads give under autocast) equals the reference on the same values in
    fp32; its gradient comes back in bf16, the logits' dtype."""
    g = torch.Generator().manual_seed(4)
    t = (torch.randn(6, 1000, generator=g) * 3).bfloat16()
    s = (torch.randn(6, 1000, generator=g) * 3).bfloat16().requires_grad_()
    s_ref = s.detach().float().requires_grad_()
    got, ref = tk.kl_div(t, s, 1.0), kl_div_ref(t.float(), s_ref, 1.0)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    got.backward()
    ref.backward()
    assert s.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s.grad.float(), s_ref.grad, rtol=1e-2, atol=1e-4)
