"""The chunked SSD scan against the sequential recurrence (the slow reference)."""
import pytest
import contextlib

import torch

from ternary_mamba.ops.dispatch import reference_path

from ternary_mamba.ops.ssd_torch import ssd_chunked, ssd_sequential


def _inputs(b, l, h, p, g, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=gen) - 1)
    A = -torch.rand(h, generator=gen) * 4 - 0.5
    B = torch.randn(b, l, g, n, generator=gen)
    C = torch.randn(b, l, g, n, generator=gen)
    return x, dt, A, B, C


@pytest.mark.parametrize("l,chunk", [(1, 8), (7, 8), (16, 8), (37, 16), (64, 64), (100, 32)])
@pytest.mark.parametrize("g", [1, 2])
def test_chunked_matches_sequential(l, chunk, g):
    x, dt, A, B, C = _inputs(2, l, 4, 8, g, 6)
    y_ref, s_ref = ssd_sequential(x, dt, A, B, C)
    y, s = ssd_chunked(x, dt, A, B, C, chunk)
    assert (y - y_ref).abs().max() < 1e-4 * (1 + y_ref.abs().max())
    assert (s - s_ref).abs().max() < 1e-4 * (1 + s_ref.abs().max())


def test_initial_state_continues_the_scan():
    x, dt, A, B, C = _inputs(1, 40, 4, 8, 2, 6, seed=1)
    y_full, s_full = ssd_chunked(x, dt, A, B, C, 16)
    y1, s1 = ssd_chunked(x[:, :23], dt[:, :23], A, B[:, :23], C[:, :23], 16)
    y2, s2 = ssd_chunked(x[:, 23:], dt[:, 23:], A, B[:, 23:], C[:, 23:], 16, initial_state=s1)
    assert torch.allclose(torch.cat([y1, y2], 1), y_full, atol=1e-4)
    assert torch.allclose(s2, s_full, atol=1e-4)


def test_chunk_size_does_not_change_the_math():
    x, dt, A, B, C = _inputs(2, 50, 4, 8, 1, 6, seed=2)
    y8, _ = ssd_chunked(x, dt, A, B, C, 8)
    y64, _ = ssd_chunked(x, dt, A, B, C, 64)
    assert torch.allclose(y8, y64, atol=1e-4)


@pytest.mark.parametrize("b,l,h,p,g,n,k", [(2, 37, 4, 16, 2, 16, 8), (1, 100, 6, 32, 1, 64, 16),
                                            (3, 5, 2, 16, 1, 8, 64), (1, 64, 4, 48, 4, 32, 32)])
def test_fused_c_scan_matches_the_torch_chunked_scan(b, l, h, p, g, n, k):
    from ternary_mamba.ops.kernels import get_kernel, ssd_prefill
    if get_kernel() is None:
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(l)
    x = torch.randn(b, l, h, p, generator=gen)
    dt = torch.rand(b, l, h, generator=gen) * 0.5
    A = -torch.rand(h, generator=gen) * 4
    B, C = torch.randn(b, l, g, n, generator=gen), torch.randn(b, l, g, n, generator=gen)
    for init in (None, torch.randn(b, h, p, n, generator=gen)):
        y_ref, s_ref = ssd_chunked(x, dt, A, B, C, k, init)
        y, s = ssd_prefill(x, dt, A, B, C, k, init)
        assert torch.allclose(y, y_ref, atol=1e-4, rtol=1e-4) and torch.allclose(s, s_ref, atol=1e-4, rtol=1e-4)
    assert ssd_prefill(x[..., :8], dt, A, B, C, k) is None       # headdim not a multiple of 16: declined


def test_model_forward_uses_the_same_result_with_and_without_autograd():
    from conftest import random_model, tiny_config
    m = random_model(tiny_config(ngroups=2))
    ids = torch.randint(0, 512, (2, 45), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused = m(ids)
        with reference_path():
            ref = m(ids)
    assert (fused - ref).abs().max() < 1e-4


@pytest.mark.parametrize("b,l", [(3, 1), (1, 1), (2, 2), (2, 9), (1, 70)])
def test_fused_forward_with_prefill_states_matches_torch(b, l):
    from conftest import random_model, tiny_config
    m = random_model(tiny_config(ngroups=2, d_conv=4))
    ids = torch.randint(0, 512, (b, l + 5), generator=torch.Generator().manual_seed(l))
    with torch.no_grad():
        outs = []
        for impl in ("chunked", "torch"):
            with reference_path() if impl == "torch" else contextlib.nullcontext():
                _, st = m(ids[:, :l], return_state=True)             # short prefixes: conv state shorter than K-1
                logits, st2 = m(ids[:, l:], st, return_state=True)
            outs.append((logits, st2))
    (a, sa), (r, sr) = outs
    assert (a - r).abs().max() < 1e-4
    for x, y in zip(sa, sr):
        assert torch.allclose(x.conv, y.conv, atol=1e-6) and torch.allclose(x.ssm, y.ssm, atol=1e-4)


def test_fused_forward_steps_aside_for_hooks_on_the_modules_it_skips():
    from conftest import random_model, tiny_config
    m = random_model(tiny_config())
    seen = []
    m.backbone.layers[0].mixer.norm.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    with torch.no_grad():
        m(torch.randint(0, 512, (1, 20)))
    assert seen == [torch.Size([1, 20, 64 * 2])]


def test_decay_matrix_backward_matches_autograd_of_the_formula():
    from ternary_mamba.ops.ssd_torch import decay_matrix
    g = torch.Generator().manual_seed(0)
    a = (-torch.rand(2, 3, 16, generator=g, dtype=torch.float64)).cumsum(-1).requires_grad_(True)
    k = a.size(-1)
    mask = torch.ones(k, k, dtype=torch.bool).tril()
    ref = torch.exp((a[..., :, None] - a[..., None, :]).masked_fill(~mask, float("-inf")))
    got = decay_matrix(a)
    assert torch.allclose(got, ref)
    gL = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad(ref, a, gL)
    (g_got,) = torch.autograd.grad(got, a, gL)
    assert torch.allclose(g_got, g_ref, atol=1e-12)
    assert torch.autograd.gradcheck(decay_matrix, (a.detach().requires_grad_(True),))


def test_chunk_states_are_passed_without_a_slice_per_chunk_in_the_graph():
    """The state passing between chunks takes its slices with unbind (one node whose backward is one stack). A
    slice per chunk (states[:, i]) made the backward write one zero-filled full-size gradient per chunk: O(chunks^2)
    memory traffic, 21 % of a 1.3B GPU training step (docs/GPU.md)."""
    x, dt, A, B, C = (t.requires_grad_() for t in _inputs(1, 64, 2, 4, 1, 8))
    y, s = ssd_chunked(x, dt, A, B, C, 8)                      # 8 chunks
    seen, stack, kinds = set(), [y.grad_fn, s.grad_fn], []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        kinds.append(type(fn).__name__)
        stack.extend(f for f, _ in fn.next_functions)
    assert kinds.count("UnbindBackward0") == 2
    assert kinds.count("SelectBackward0") <= 1              # a_cum[..., -1] once, not once per chunk
