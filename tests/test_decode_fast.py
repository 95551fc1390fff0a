"""The opt-in fast decode modes (issue: decode at the memory roofline) against their references: the bf16 SSM
state, the 4-bit head, the direct tq1 GEMV, and the quality cost a packed folder records for each mode."""
import pytest
import torch

from conftest import random_model, tiny_config
from ternary_mamba.core.model import LayerState
from ternary_mamba.ops.build import get_kernel
from ternary_mamba.runtime import decode_engine

pytestmark = pytest.mark.skipif(get_kernel() is None, reason="no C compiler")


def bf16_round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16)


# 24: the scalar tail after the 16-wide loop; 32 and 64: the even/odd rows four at a time (AVX512-BF16 builds), and
# with headdim 6 two rows after them one at a time
@pytest.mark.parametrize("d_state,d_model,headdim", [(16, 64, 16), (24, 64, 16), (32, 64, 16), (64, 48, 6)])
@torch.no_grad()
def test_bf16_state_mixer_step_is_the_fp32_step_rounded_once(d_state, d_model, headdim):
    from ternary_mamba.ops.kernels import mixer_step_inplace
    m = random_model(tiny_config(d_state=d_state, ngroups=2, d_model=d_model, headdim=headdim))
    mx = m.backbone.layers[0].mixer
    g = torch.Generator().manual_seed(0)
    nb = 3
    zx = torch.randn(nb, mx.in_proj.out_features, generator=g)
    conv = torch.randn(nb, mx.cfg.conv_dim, mx.cfg.d_conv - 1, generator=g)
    ssm16 = torch.randn(nb, mx.cfg.nheads, mx.cfg.headdim, d_state, generator=g).to(torch.bfloat16)
    ssm32 = ssm16.float()                                       # the reference: the fp32 step from the same state
    y_ref = mixer_step_inplace(mx, zx, conv.clone(), ssm32)
    y = mixer_step_inplace(mx, zx, conv.clone(), ssm16)
    assert ssm16.dtype == torch.bfloat16
    assert (y - y_ref).abs().max() < 1e-4                       # y reads the fp32 values before rounding
    want = bf16_round(ssm32)
    diff = (ssm16.float() - want.float()).abs()
    ulp = want.float().abs() * 2.0 ** -7
    assert bool((diff <= ulp + 1e-30).all())                    # at most one bf16 ulp (fp32 summation order)
    assert (ssm16 == want).float().mean() > 0.99                # and nearly always the same value


@torch.no_grad()
def test_engine_with_a_bf16_state_follows_the_fp32_state_path():
    m = random_model(tiny_config(d_model=128, headdim=32))
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    _, st = m(ids, return_state=True, last_only=True)
    ref = decode_engine.session(m, [LayerState(s.conv.clone(), s.ssm.clone()) for s in st], 2)
    decode_engine.use_bf16_state(m)
    try:
        fast = decode_engine.session(m, st, 2)
        assert fast.state[0].ssm.dtype == torch.bfloat16 and ref.state[0].ssm.dtype == torch.float32
        tok = [5, 9]
        for _ in range(24):
            a, b = ref.step(tok), fast.step(tok)
            la, lb = a.log_softmax(-1), b.log_softmax(-1)
            assert float((la.exp() * (la - lb)).sum(-1).max()) < 1e-3
            tok = a.argmax(-1).tolist()
    finally:
        decode_engine.use_bf16_state(m, False)
    assert decode_engine.engine_for(m).state_dtype == torch.float32     # switched off: a new engine, fp32 again


def test_q4_head_with_int8_activations_matches_its_reference():
    from ternary_mamba.ops.dispatch import q4_a8_kernel
    from ternary_mamba.ops.kernels import q4_gemv
    from ternary_mamba.quant.tables import quantize_table
    from ternary_mamba.runtime.heads import q4_head_a8_ref
    g = torch.Generator().manual_seed(0)
    w = torch.randn(77, 384, generator=g)
    codes, scale = quantize_table(w, "q4")
    scale = scale.float().contiguous()
    x = torch.randn(3, 384, generator=g)
    x[1, 128:256] = 0                                   # a zero chunk: scale 0, no NaN
    got, ref = q4_gemv(codes, scale, x, a8=True), q4_head_a8_ref(codes, scale, x)
    if q4_a8_kernel():                                  # VNNI-512 or AVX2: the integer sums are exact
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    exact = q4_gemv(codes, scale, x)
    assert (got - exact).norm() / exact.norm() < 0.02      # int8 activations: close to the fp32-activation head


@pytest.mark.parametrize("out_f,in_f,G", [(37, 512, 128), (8, 768, 256), (5, 256, 128)])
def test_a8_gemv_512_bit_kernel_matches_the_integer_reference(out_f, in_f, G):
    from conftest import random_tq2
    from ternary_mamba.ops.kernels import tq2_gemv_a8
    from ternary_mamba.ops.ternary_linear import ternary_linear_a8_ref
    g = torch.Generator().manual_seed(1)
    codes, sc = random_tq2(out_f, in_f, G, g)
    x = torch.randn(4, in_f, generator=g)
    x[2] = 0
    got, ref = tq2_gemv_a8(codes, sc, x, G), ternary_linear_a8_ref(codes, sc, x, G)
    assert (got - ref).abs().max() <= 1e-5 * (1 + ref.abs().max())


@pytest.fixture(scope="module")
def packed_with_costs(tmp_path_factory):
    """A tiny random teacher exported to tq2 with groups of 128, its decode modes measured on the bundled text."""
    from conftest import BUNDLED_TOKENIZER
    from ternary_mamba.cli import main
    from ternary_mamba.formats.folders import save_model
    d = tmp_path_factory.mktemp("modes")
    save_model(random_model(tiny_config(vocab_size=8192, d_model=256, headdim=32)), d / "fp",
               tokenizer_path=BUNDLED_TOKENIZER)
    assert main(["export", str(d / "fp"), "--out", str(d / "packed"), "--group-size", "128",
                 "--cost-tokens", "48"]) == 0
    return d / "packed"


def test_export_records_every_mode_cost_and_generate_states_the_mode_it_runs(packed_with_costs, capsys):
    import json
    from ternary_mamba.cli import main
    from ternary_mamba.runtime.modes import MODES, choose_mode, read_record
    rec = json.loads((packed_with_costs / "decode_modes.json").read_text())
    assert set(rec["modes"]) == set(MODES) and rec["tokens"] == 48 and rec["cpu"]
    assert rec["modes"]["exact"] == {"kl": 0.0, "top1": 1.0}
    assert all(v["kl"] >= 0 and 0 <= v["top1"] <= 1 for v in rec["modes"].values())
    mode, why = choose_mode(read_record(packed_with_costs))
    capsys.readouterr()
    assert main(["generate", str(packed_with_costs), "--prompt", "Once", "--max-new-tokens", "3"]) == 0
    assert f"[decode mode: {why}]" in capsys.readouterr().err
    assert main(["generate", str(packed_with_costs), "--prompt", "Once", "--max-new-tokens", "3", "--exact"]) == 0
    assert "[decode mode: exact (asked for)]" in capsys.readouterr().err
    assert main(["generate", str(packed_with_costs), "--prompt", "x", "--exact", "--mode", "fast"]) == 1
    assert main(["generate", str(packed_with_costs), "--prompt", "x", "--a8", "--mode", "fast"]) == 1


def test_the_fast_default_is_the_fastest_mode_within_the_thresholds(monkeypatch):
    from ternary_mamba.runtime import modes
    from ternary_mamba.runtime.modes import choose_mode
    monkeypatch.setattr(modes, "fast_here", lambda: True)
    from ternary_mamba.spec import DECODE_MODE_MAX_KL, DECODE_MODE_MIN_TOP1
    ok, too_far = {"kl": DECODE_MODE_MAX_KL / 2, "top1": 0.999}, {"kl": DECODE_MODE_MAX_KL * 2, "top1": 0.999}
    rec = {"modes": {"exact": {"kl": 0.0, "top1": 1.0}, "fast": too_far, "a8": ok, "i8head": ok}, "tokens": 9}
    assert choose_mode(rec)[0] == "a8"
    rec["modes"]["a8"] = {"kl": 0.0, "top1": DECODE_MODE_MIN_TOP1 - 0.01}
    assert choose_mode(rec)[0] == "i8head"
    assert choose_mode({"modes": {"exact": {"kl": 0.0, "top1": 1.0}, "fast": too_far}})[0] == "exact"
    assert choose_mode(None)[0] == "exact"
    cheap = {"modes": {"exact": {"kl": 0.0, "top1": 1.0}, "fast": ok, "a8": ok}}
    assert choose_mode(cheap)[0] == "fast"
    monkeypatch.setattr(modes, "fast_here", lambda: False)   # no AVX512-VNNI: fast is slower there, never chosen
    assert choose_mode(cheap)[0] == "a8"


def test_a_damaged_record_is_ignored_and_the_exact_path_runs(packed_with_costs, tmp_path):
    import shutil
    from ternary_mamba.runtime.modes import RECORD, read_record
    d = tmp_path / "p"
    shutil.copytree(packed_with_costs, d)
    for bad in ("{", "[]", '{"modes": {"warp": {"kl": 0, "top1": 1}}}', '{"modes": {"fast": {"kl": "0"}}}'):
        (d / RECORD).write_text(bad)
        assert read_record(d) is None


def test_every_mode_runs_through_the_engine_and_measures_against_exact(packed_with_costs):
    from ternary_mamba.runtime.load import load_model
    from ternary_mamba.runtime.modes import apply_mode, measure_modes
    m = load_model(packed_with_costs)
    ids = list(range(5, 30))
    costs = measure_modes(m, ids)
    assert costs["fast"]["kl"] > 0 and costs["a8"]["kl"] > 0           # not exact: they do change the logits
    assert apply_mode(m, "fast") and decode_engine.engine_for(m).state_dtype == torch.bfloat16


def test_a_mode_the_model_cannot_run_is_one_line_and_auto_falls_back_to_exact(tmp_path, capsys):
    """Groups of 64 have no int8-activation kernels: --mode a8 / fast is refused in one line, exit 1; with no
    recorded cost (--cost-tokens 0) the default is the exact path, and says so."""
    from conftest import BUNDLED_TOKENIZER
    from ternary_mamba.cli import main
    from ternary_mamba.formats.folders import save_model
    save_model(random_model(tiny_config(vocab_size=8192, d_model=128)), tmp_path / "fp",
               tokenizer_path=BUNDLED_TOKENIZER)
    assert main(["export", str(tmp_path / "fp"), "--out", str(tmp_path / "p"), "--group-size", "64",
                 "--cost-tokens", "0"]) == 0
    assert not (tmp_path / "p" / "decode_modes.json").exists()
    capsys.readouterr()
    for mode in ("a8", "fast"):
        assert main(["generate", str(tmp_path / "p"), "--prompt", "x", "--mode", mode]) == 1
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if "error" in ln]
        assert len(errors) == 1 and "cannot run it" in errors[0] and "Traceback" not in err
    assert main(["generate", str(tmp_path / "p"), "--prompt", "x", "--max-new-tokens", "2"]) == 0
    assert "[decode mode: exact (this folder records no measured cost" in capsys.readouterr().err
