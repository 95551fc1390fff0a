"""Ternary QAT modules: exactness against the export, gradients, no fused-kernel bypass, guards,
and the zero-ratio collapse detector."""
import pytest
import torch

from conftest import random_model, tiny_config
from ternary_mamba.errors import UserError
from ternary_mamba.quant.monitor import ZeroRatioMonitor, zero_ratio_stats
from ternary_mamba.quant.qat import (TernaryConfig, TernaryLinear, quantize_, set_quant_enabled,
                                     ternary_modules)
from ternary_mamba.quant.ternary import absmean_scale, dequantize, round_scale, ternary_codes


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("mode", ["absmean", "learned", "guarded"])
def test_fake_quant_equals_dequantized_export_exactly(seed, mode):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(256, 48, bias=False)
    q = TernaryLinear(lin, TernaryConfig(group_size=64, scale_mode=mode))
    if mode != "absmean":
        with torch.no_grad():
            q.scale.mul_(torch.empty_like(q.scale).uniform_(0.3, 3.0))  # exercise the guard band
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
    torch.manual_seed(0)
    q = TernaryLinear(torch.nn.Linear(64, 16, bias=False), TernaryConfig(group_size=32, scale_mode="learned"))
    q(torch.randn(4, 64)).pow(2).sum().backward()
    assert q.scale.grad is not None and torch.isfinite(q.scale.grad).all() and q.scale.grad.abs().sum() > 0
    assert q.weight.grad is not None and q.weight.grad.abs().sum() > 0


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
        q.scale.mul_(100.0)  # a runaway learned scale
    ratio = q.effective_scale() / absmean_scale(q.weight.detach(), 64)
    assert torch.allclose(ratio, torch.full_like(ratio, 1.5))
    assert q.stats()["zero_ratio"] < 0.7


def test_collapse_detector_fires_on_runaway_scales():
    model = random_model(tiny_config())
    quantize_(model, TernaryConfig(group_size=32, scale_mode="learned"))
    mon = ZeroRatioMonitor(every=1, threshold=0.6, window=4, rise=0.08, action="stop")
    fired = None
    for step in range(1, 12):
        with torch.no_grad():
            for _, m in ternary_modules(model):
                m.scale.mul_(1.3)  # the collapse: scales drift up, more weights round to 0
        rec = {"step": step, **mon.record(model, step)}
        try:
            mon.check(rec)
        except UserError as e:
            fired = (step, str(e))
            break
    assert fired is not None and "collapse" in fired[1]
    assert zero_ratio_stats(model)["zero_ratio"] > 0.4


def test_collapse_guard_action_switches_to_guarded():
    model = random_model(tiny_config())
    quantize_(model, TernaryConfig(group_size=32, scale_mode="learned"))
    with torch.no_grad():
        for _, m in ternary_modules(model):
            m.scale.mul_(10)
    mon = ZeroRatioMonitor(every=1, threshold=0.6, action="guard")
    mon.check({"step": 1, **mon.record(model, 1)})
    assert model.ternary_config.scale_mode == "guarded"
    assert zero_ratio_stats(model)["zero_ratio"] < 0.6


def test_quantized_model_roundtrips_through_checkpoint(tmp_path):
    from ternary_mamba.formats.folders import save_model
    from ternary_mamba.formats.load import load_model
    model = random_model(tiny_config())
    quantize_(model, TernaryConfig(group_size=32, scale_mode="learned"))
    save_model(model, tmp_path / "s")
    loaded = load_model(tmp_path / "s")
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
