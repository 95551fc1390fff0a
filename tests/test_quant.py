"""Ternary QAT modules: exactness against the export, gradients, no fused-kernel bypass, guards,
and the zero-ratio collapse detector."""
import math

import pytest
import torch

from conftest import random_model, tiny_config
from ternary_mamba.errors import UserError
from ternary_mamba.quant.monitor import ZeroRatioMonitor, zero_ratio_stats
from ternary_mamba.quant.qat import (TernaryConfig, TernaryLinear, quantize_, set_quant_enabled,
                                     ternary_modules)
from ternary_mamba.quant.ternary import absmean_scale, dequantize, round_scale, ternary_codes


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("mode", ["absmean", "learned", "frozen", "guarded"])
def test_fake_quant_equals_dequantized_export_exactly(seed, mode):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(256, 48, bias=False)
    q = TernaryLinear(lin, TernaryConfig(group_size=64, scale_mode=mode))
    if mode in ("learned", "guarded"):
        with torch.no_grad():
            q.log_scale.add_(torch.empty_like(q.log_scale).uniform_(-1.2, 1.1))  # exercise the guard band
    codes, s16 = q.export()
    assert set(codes.unique().tolist()) <= {-1, 0, 1} and s16.dtype == torch.float16
    x = torch.randn(5, 256)
    assert torch.equal(q(x), torch.nn.functional.linear(x, dequantize(codes, s16.float(), 64)))


def test_codes_and_scales_by_hand():
    w = torch.tensor([[0.9, -0.1, 0.3, -2.0]])
    s = absmean_scale(w, 4)  # mean |w| = 0.825
    assert torch.allclose(s, torch.tensor([[0.825]]))
    codes = ternary_codes(w, round_scale(s), 4)
    assert codes.tolist() == [[1, 0, 0, -1]]  # 0.3 / 0.825 = 0.36 -> 0 ; -2.0 clipped to -1


def test_packing_inputs_are_not_mutated():
    w = torch.randn(8, 64)
    w0 = w.clone()
    ternary_codes(w, round_scale(absmean_scale(w, 32)), 32)
    assert torch.equal(w, w0)


def test_learned_scale_gets_lsq_gradient_and_weight_ste():
    """The gradients against LSQ's formula written out here (Esser et al. 2020, ternary levels, grad scale
    1/sqrt(G)), element by element in plain Python: not the implementation's own tensor expressions."""
    torch.manual_seed(0)
    G = 32
    q = TernaryLinear(torch.nn.Linear(64, 16, bias=False), TernaryConfig(group_size=G, scale_mode="learned"))
    with torch.no_grad():
        q.log_scale.add_(torch.randn_like(q.log_scale) * 0.3)     # some weights clip, some round to 0
    x = torch.randn(4, 64)
    q(x).pow(2).sum().backward()
    y = q(x).detach()
    grad_q = 2 * y.T @ x                                          # dL/dQ of sum((x Q^T)^2), (16, 64)
    s = q.log_scale.detach().exp().half().float()                 # the fp16 value the forward used
    want_s, want_w = torch.zeros_like(s), torch.zeros(16, 64)
    for o in range(16):
        for i in range(64):
            sg = float(s[o, i // G])
            v = float(q.weight.detach()[o, i]) / sg
            if abs(v) <= 1:
                want_w[o, i] = grad_q[o, i]
                dq_ds = max(-1.0, min(1.0, float(round(v)))) - v   # round(v) - v inside the range
            else:
                dq_ds = 1.0 if v > 0 else -1.0                      # the clipped level, outside it
            want_s[o, i // G] += float(grad_q[o, i]) * dq_ds / G ** 0.5
    torch.testing.assert_close(q.weight.grad, want_w, rtol=1e-5, atol=1e-5)
    # the parameter is log s: d/d(log s) = s d/ds, with s the unrounded exp(log s)
    torch.testing.assert_close(q.log_scale.grad, want_s * q.log_scale.detach().exp(), rtol=1e-4, atol=1e-5)


def test_absmean_gives_pure_ste_gradient():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 16, bias=False)
    q = TernaryLinear(lin, TernaryConfig(group_size=32))
    x = torch.randn(4, 64)
    q(x).sum().backward()
    assert torch.allclose(q.weight.grad, torch.ones(4, 16).T @ x)  # d/dW of sum(x W^T) = 1^T x


def test_toggling_quantization_changes_every_swapped_module():
    """Guards against a fused path bypassing a swapped module: each module must affect the output."""
    model = random_model(tiny_config())
    quantize_(model, TernaryConfig(group_size=32))
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    mods = ternary_modules(model)
    assert len(mods) == 2 * model.config.n_layer
    with torch.no_grad():
        base = model(ids)
        for name, m in mods:
            m.enabled = False
            assert not torch.equal(model(ids), base), f"{name} does not change the output"
            m.enabled = True
        set_quant_enabled(model, False)
        fp = model(ids)
    ref = random_model(tiny_config())
    with torch.no_grad():
        assert torch.equal(fp, ref(ids))  # disabled quantization = the original model, weights shared


def test_group_size_must_divide_in_features():
    model = random_model(tiny_config())
    with pytest.raises(UserError, match="does not divide"):
        quantize_(model, TernaryConfig(group_size=48))
    with pytest.raises(UserError, match="scale mode"):
        TernaryConfig(scale_mode="foo")


def test_guarded_scale_stays_in_band():
    torch.manual_seed(0)
    q = TernaryLinear(torch.nn.Linear(128, 8, bias=False), TernaryConfig(group_size=64, scale_mode="guarded"))
    with torch.no_grad():
        q.log_scale.add_(math.log(100.0))  # a runaway learned scale
    ratio = q.effective_scale() / absmean_scale(q.weight.detach(), 64)
    assert torch.allclose(ratio, torch.full_like(ratio, 1.5))
    assert q.stats()["zero_ratio"] < 0.7


def _blow_up_scales(model, factor: float) -> None:
    with torch.no_grad():
        for _, m in ternary_modules(model):
            m.log_scale.add_(math.log(factor))   # the collapse: scales drift up, more weights round to 0


def test_collapse_is_flagged_only_when_zeros_exceed_the_optimum_and_cost_rises():
    model = random_model(tiny_config())
    quantize_(model, TernaryConfig(group_size=32, scale_mode="learned"))
    mon = ZeroRatioMonitor(every=1, margin=0.05, tolerance=0.05, action="stop")
    mon.check({"step": 1, **mon.record(model, 1), "eval_kl": 0.10})
    # the cost rises while the zero ratio sits at the absmean level (below the optimum): not collapse
    mon.check({"step": 2, **mon.record(model, 2), "eval_kl": 0.20})
    # zeros far above the optimum while the cost improves: not collapse either
    _blow_up_scales(model, 4.0)
    rec = {"step": 3, **mon.record(model, 3), "eval_kl": 0.09}
    assert rec["zero_excess"] > 0.2
    mon.check(rec)
    # both: collapse
    with pytest.raises(UserError, match="collapse"):
        mon.check({"step": 4, **mon.record(model, 4), "eval_kl": 0.12})


def test_optimal_zero_ratio_matches_the_gaussian_and_laplace_values():
    from ternary_mamba.quant.ternary import mse_optimal_zeros
    gen = torch.Generator().manual_seed(0)
    _, z = mse_optimal_zeros(torch.randn(256, 1024, generator=gen), 1024)
    assert abs(z.mean().item() - 0.46) < 0.02
    lap = torch.distributions.Laplace(0.0, 1.0).sample((256, 1024))
    _, z = mse_optimal_zeros(lap, 1024)
    assert abs(z.mean().item() - 0.63) < 0.02


def test_log_and_linear_scales_export_the_same_codes_and_frozen_scales_do_not_train():
    lin = torch.nn.Linear(64, 8, bias=False)
    a = TernaryLinear(lin, TernaryConfig(group_size=32, scale_mode="learned", scale_param="log"))
    b = TernaryLinear(lin, TernaryConfig(group_size=32, scale_mode="learned", scale_param="linear"))
    assert torch.equal(a.export()[0], b.export()[0]) and torch.allclose(a.export()[1].float(), b.export()[1].float())
    a(torch.randn(4, 64)).pow(2).sum().backward()
    assert a.log_scale.grad is not None and a.log_scale.grad.abs().sum() > 0
    f = TernaryLinear(torch.nn.Linear(64, 8, bias=False), TernaryConfig(group_size=32, scale_mode="frozen"))
    assert "scale" in dict(f.named_buffers()) and not any("scale" in n for n, _ in f.named_parameters())
    s0 = f.stored_scale().clone()
    with torch.no_grad():
        f.weight.mul_(3)
    assert torch.equal(f.stored_scale(), s0)


def test_collapse_guard_action_switches_to_guarded():
    model = random_model(tiny_config())
    quantize_(model, TernaryConfig(group_size=32, scale_mode="learned"))
    mon = ZeroRatioMonitor(every=1, action="guard")
    mon.check({"step": 1, **mon.record(model, 1), "eval_kl": 0.1})
    _blow_up_scales(model, 10.0)
    mon.check({"step": 2, **mon.record(model, 2), "eval_kl": 0.5})
    assert model.ternary_config.scale_mode == "guarded"
    assert zero_ratio_stats(model)["zero_ratio"] < 0.6


def test_quantized_model_roundtrips_through_checkpoint(tmp_path):
    from ternary_mamba.formats.folders import save_model
    from ternary_mamba.runtime.load import load_model
    model = random_model(tiny_config())
    quantize_(model, TernaryConfig(group_size=32, scale_mode="learned"))
    save_model(model, tmp_path / "s")
    loaded = load_model(tmp_path / "s")
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))


@pytest.mark.parametrize("G", [32, 128, 1024])
def test_the_sorted_optimum_search_equals_the_direct_one(G):
    from ternary_mamba.quant.ternary import mse_optimal_zeros, mse_optimal_zeros_ref
    g = torch.Generator().manual_seed(G)
    w = torch.randn(32, 2048, generator=g) * torch.rand(32, 1, generator=g)
    w[0, :G] = 0.0                                       # an all-zero group
    w[1, :G] = torch.linspace(-1, 1, G)                  # evenly spaced magnitudes (many near-ties)
    r1, z1 = mse_optimal_zeros(w, G)
    r2, z2 = mse_optimal_zeros_ref(w, G)
    assert torch.equal(r1, r2) and torch.equal(z1, z2)


def test_the_guard_reports_how_much_of_the_band_binds():
    """guard_bound: the share of weights whose learned group scale the guard band clamps (0 when none is)."""
    import torch.nn as nn
    from ternary_mamba.quant.monitor import zero_ratio_stats
    from ternary_mamba.quant.qat import TernaryConfig, quantize_
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32, bias=False))
    quantize_(m, TernaryConfig(group_size=32, scale_mode="guarded", scale_param="linear"),
              lambda mod, fqn: isinstance(mod, nn.Linear))
    assert zero_ratio_stats(m)["guard_bound"] == 0.0
    with torch.no_grad():
        m[0].scale[:16] *= 10                      # half of the rows' scales far above the band
    assert zero_ratio_stats(m)["guard_bound"] == pytest.approx(0.5)
