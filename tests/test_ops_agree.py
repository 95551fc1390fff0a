"""One op, one dispatcher, one `*_ref`: every op's dispatcher agrees with its reference (values, and gradients of
every input when autograd is on), and it did take a fast path where one exists (else the test proves nothing)."""
import pytest
import torch

from ternary_mamba.ops import conv, losses, norms, scan, ternary_linear
from ternary_mamba.ops.packing import pack
from ternary_mamba.ops.dispatch import kernels_available, last_impl, reference_path

DIMS = scan.ScanDims(nheads=4, headdim=16, ngroups=2, d_state=16, chunk_size=16)


def _inputs(op: str, g: torch.Generator, b=2, l=37):
    r = lambda *s: torch.randn(*s, generator=g)   # noqa: E731
    h, p, ng, n = DIMS.nheads, DIMS.headdim, DIMS.ngroups, DIMS.d_state
    if op == "ssd_scan":
        return (r(b, l, h * p + 2 * ng * n), torch.rand(b, l, h, generator=g) * 0.5 + 0.01, -torch.rand(h, generator=g) - 0.1,
                r(h), DIMS, r(b, h, p, n) * 0.1)
    if op == "conv_silu":
        cd = 48
        return r(b, l, cd), r(cd, 1, 4) * 0.5, r(cd), r(b, cd, 3)
    if op == "gated_norm":
        return r(b, l, 64), r(b, l, 64), r(64).abs() + 0.5, 2, 1e-5
    if op == "rms_norm":
        return r(b, l, 64), r(64).abs() + 0.5, 1e-5
    if op == "kl_div":
        return r(b, l, 300) * 3, r(b, l, 300) * 3, 2.0
    if op == "cross_entropy":
        return r(b, l, 300) * 3, torch.randint(0, 300, (b, l), generator=g)
    if op == "ternary_linear":
        t = torch.randint(-1, 2, (48, 128), generator=g, dtype=torch.int8)
        return r(b, l, 128), pack(t, "tq2").view(48, 32), torch.rand(48, 2, generator=g) + 0.1, 64, r(48)
    if op == "ssd_step":
        return r(b, h, p, n), r(b, h, p), torch.rand(b, h, generator=g) * 0.5, -torch.rand(h, generator=g), r(b, ng, n), r(b, ng, n)
    raise KeyError(op)


OPS = {"ssd_scan": (scan.ssd_scan, scan.ssd_scan_ref), "conv_silu": (conv.conv_silu, conv.conv_silu_ref),
       "gated_norm": (norms.gated_norm, norms.gated_norm_ref), "rms_norm": (norms.rms_norm, norms.rms_norm_ref),
       "ssd_step": (scan.ssd_step, scan.ssd_step_ref),
       "ternary_linear": (ternary_linear.ternary_linear, ternary_linear.ternary_linear_ref),
       "kl_div": (losses.kl_div, losses.kl_div_ref), "cross_entropy": (losses.cross_entropy, losses.cross_entropy_ref)}
# the implementation each op's dispatcher must pick for these CPU fp32 inputs: (no autograd, autograd)
FAST = {"ssd_scan": ("c-prefill", "c-train"), "conv_silu": ("c-prefill", "c-train"), "gated_norm": ("c", "c"),
        "rms_norm": ("torch", "c-train"), "kl_div": ("c", "c"), "cross_entropy": ("c", "c"),
        "ssd_step": ("torch", None)}   # the step is fused only when asked to update in place (below)
TRAINED = {"ternary_linear": (0, 3), "kl_div": (1,)}   # the teacher's logits (kl_div's first) get none either
TRAINED_NOTE = None   # tensors (x, bias) that get gradients (packed codes and scales are not trained)


def _outputs(out):
    return [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("op", sorted(OPS))
def test_dispatcher_agrees_with_its_reference(op, grad):
    if op == "ssd_step" and grad:
        pytest.skip("the step runs at inference only (its fast path is the in-place kernel)")
    fast, ref = OPS[op]
    args = _inputs(op, torch.Generator().manual_seed(sorted(OPS).index(op)))
    tensors = [a for a in args if isinstance(a, torch.Tensor)]

    def run(fn):
        xs = [t.clone().requires_grad_(grad and t.is_floating_point() and (op not in TRAINED or i in TRAINED[op]))
              for i, t in enumerate(tensors)]
        it = iter(xs)
        call = [next(it) if isinstance(a, torch.Tensor) else a for a in args]
        with torch.set_grad_enabled(grad):
            outs = _outputs(fn(*call))
            if not grad:
                return outs, []
            loss = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
            want = [x for x in xs if x.requires_grad]
            grads = torch.autograd.grad(loss, want, allow_unused=True)
            return [o.detach() for o in outs], list(grads)

    got, got_g = run(fast)
    want, want_g = run(ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(got_g, want_g):
        if b is None:
            assert a is None or not a.abs().any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    if kernels_available() and op in FAST:
        assert last_impl(op) == FAST[op][grad]   # the fast path really ran (else the agreement proves nothing)


def test_inside_reference_path_the_dispatchers_are_their_references():
    args = _inputs("ssd_scan", torch.Generator().manual_seed(0))
    with reference_path(), torch.no_grad():
        y, s = scan.ssd_scan(*args)
        assert last_impl("ssd_scan") == "torch"
        y2, s2 = scan.ssd_scan_ref(*args)
    assert torch.equal(y, y2) and torch.equal(s, s2)
    with reference_path("sequential"), torch.no_grad():
        y3, _ = scan.ssd_scan(*args)
        assert last_impl("ssd_scan") == "sequential"
    torch.testing.assert_close(y3, y, rtol=1e-4, atol=1e-4)


def test_the_step_updates_in_place_only_when_asked():
    state, x, dt, A, B, C = _inputs("ssd_step", torch.Generator().manual_seed(1))
    keep = state.clone()
    with torch.no_grad():
        y, new = scan.ssd_step(state, x, dt, A, B, C)
        assert torch.equal(state, keep) and new is not state
        y2, new2 = scan.ssd_step(state, x, dt, A, B, C, inplace=True)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)
    if kernels_available():
        assert new2 is state and last_impl("ssd_step") == "c-inplace"
