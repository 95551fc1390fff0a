"""The Triton causal conv + SiLU (ops/triton_conv.py) against `conv_silu_ref`, values and every gradient (input,
weight, bias, conv state), on CPU tensors under Triton's interpreter: lengths shorter than the kernel, odd widths,
with and without a state and a bias, a strided view as input."""
import os

os.environ["TRITON_INTERPRET"] = "1"   # before triton decorates the kernels  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
tc = pytest.importorskip("ternary_mamba.ops.triton_conv")

from ternary_mamba.ops.conv import conv_silu_ref  # noqa: E402


@pytest.mark.parametrize("L", [1, 2, 19, 40])
@pytest.mark.parametrize("state,bias", [(True, True), (False, True), (True, False)])
def test_conv_silu_matches_the_reference(L, state, bias):
    g = torch.Generator().manual_seed(L)
    C, K, b = 70, 4, 2
    wide = torch.randn(b, L, C + 9, generator=g)
    x = wide[..., 3:3 + C]                                   # a strided view, as the in_proj output's slice
    w = torch.randn(C, 1, K, generator=g) * 0.5
    bb = torch.randn(C, generator=g) if bias else None
    prev = torch.randn(b, C, K - 1, generator=g) if state else None
    ins = [t for t in (x, w, bb, prev)]
    a = [t.clone().requires_grad_() if t is not None else None for t in ins]
    r = [t.clone().requires_grad_() if t is not None else None for t in ins]
    o1, s1 = tc.conv_silu(*a)
    o2, s2 = conv_silu_ref(*r)
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s2)
    gout, gst = torch.randn(o1.shape, generator=g), torch.randn(s1.shape, generator=g)
    ((o1 * gout).sum() + (s1 * gst).sum()).backward()
    ((o2 * gout).sum() + (s2 * gst).sum()).backward()
    for p, q in zip(a, r):
        if p is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)
