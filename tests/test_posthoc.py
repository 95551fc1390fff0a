"""PTQ and the post-hoc corrections (bias, low-rank, QEP), and the recurrence error analysis."""
import json

import pytest
import torch

from conftest import random_model, tiny_config
from ternary_mamba.experiment.analysis import (decay_horizons, inject_noise, recurrence_analysis, relative_error,
                                              states_at, trajectories)
from ternary_mamba.formats.folders import save_model
from ternary_mamba.runtime.load import load_model
from ternary_mamba.cli import main
from ternary_mamba.errors import UserError
from ternary_mamba.quant.posthoc import (PosthocConfig, capture_inputs, correction_params, lowrank_fit,
                                         posthoc_quantize, qep_weight)
from ternary_mamba.quant.qat import TernaryConfig, TernaryLinear


def test_qep_weight_is_the_damped_least_squares_solution():
    torch.manual_seed(0)
    W, X = torch.randn(12, 20), torch.randn(300, 20)
    Xq = X + 0.3 * torch.randn_like(X)
    Ws = qep_weight(W, X, Xq, alpha=1.0, damp=0.0)
    ref = torch.linalg.lstsq(Xq.double(), (X @ W.T).double()).solution.T.float()
    assert torch.allclose(Ws, ref, atol=1e-4)
    assert torch.equal(qep_weight(W, X, Xq, alpha=0.0, damp=0.01), W)  # α = 0: no change
    assert torch.allclose(qep_weight(W, X, X, alpha=1.0, damp=0.01), W, atol=1e-5)  # no input error


def test_lowrank_fit_plain_is_truncated_svd_and_weighted_wins_on_its_objective():
    torch.manual_seed(1)
    E = torch.randn(16, 32)
    X = torch.randn(500, 32) * torch.linspace(0.05, 3.0, 32)  # strongly anisotropic inputs
    U, V = lowrank_fit(E, 4, None, 0.01)
    s = torch.linalg.svdvals(E)
    assert U.shape == (16, 4) and V.shape == (4, 32)
    assert torch.allclose((E - U @ V).norm(), s[4:].norm(), atol=1e-4)  # Eckart–Young
    Uw, Vw = lowrank_fit(E, 4, X, 1e-6)
    err = lambda A, B: (X @ (E - A @ B).T).norm()  # noqa: E731
    assert err(Uw, Vw) < err(U, V)


def test_correction_terms_enter_the_forward():
    lin = torch.nn.Linear(64, 8, bias=False)
    q = TernaryLinear(lin, TernaryConfig(group_size=32, corr_bias=True, corr_rank=2))
    x = torch.randn(3, 64)
    y0 = q(x)
    with torch.no_grad():
        q.corr_bias.fill_(0.5)
    assert torch.allclose(q(x), y0 + 0.5)
    with pytest.raises(UserError):
        TernaryConfig(corr_rank=-1)


@pytest.fixture(scope="module")
def calib():
    torch.manual_seed(3)
    return [torch.randint(0, 512, (4, 48)) for _ in range(2)]


@pytest.fixture(scope="module")
def teacher():
    return random_model(tiny_config(), seed=7)


def test_capture_inputs_sees_what_the_module_sees(teacher, calib):
    m = teacher.backbone.layers[1].mixer.out_proj
    X = capture_inputs(teacher, m, calib)
    assert X.shape == (2 * 4 * 48, m.in_features)
    seen = []
    h = m.register_forward_hook(lambda mod, a, o: seen.append(a[0].reshape(-1, m.in_features)))
    with torch.no_grad():
        for b in calib:
            teacher(b)
    h.remove()
    assert torch.allclose(X, torch.cat(seen))


def test_block_streams_capture_what_the_whole_model_does(teacher, calib):
    from ternary_mamba.quant.posthoc import BlockInputs
    stream = BlockInputs(teacher, calib)
    with torch.no_grad():
        for layer, block in enumerate(teacher.backbone.layers):
            for m in (block.mixer.in_proj, block.mixer.out_proj):
                assert torch.equal(stream.capture(m, layer), capture_inputs(teacher, m, calib))
    assert stream.layer == len(teacher.backbone.layers) - 1


def test_posthoc_quantize_fits_and_does_not_touch_the_teacher(teacher, calib):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    plain, _ = posthoc_quantize(teacher, calib, 32)
    qep, fit = posthoc_quantize(teacher, calib, 32, PosthocConfig(methods=("qep", "lowrank", "bias"), rank=2))
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert correction_params(plain) == 0 and correction_params(qep) > 0
    assert set(fit) and all(0 <= st["output_rel_err"] < 2 for st in fit.values())
    # the first ternary module sees exactly the teacher's inputs
    assert next(iter(fit.values()))["input_rel_err"] == 0.0
    with torch.no_grad():
        t = teacher(calib[0])
        kl = lambda s: torch.nn.functional.kl_div(s(calib[0]).log_softmax(-1), t.log_softmax(-1),  # noqa: E731
                                                  log_target=True, reduction="batchmean")
        assert kl(qep) < kl(plain)  # on its calibration data the compensated student is closer


def test_corrected_student_saves_loads_and_refuses_packing(teacher, calib, tmp_path):
    st, _ = posthoc_quantize(teacher, calib, 32, PosthocConfig(methods=("lowrank", "bias"), rank=2))
    save_model(st, tmp_path / "s")
    back = load_model(tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(back(calib[0]), st(calib[0]))
    from ternary_mamba.formats.packed import export_packed
    with pytest.raises(UserError, match="correction"):
        export_packed(back, tmp_path / "p", "tq2")


def test_posthoc_config_rejects_bad_input():
    with pytest.raises(UserError, match="unknown correction"):
        PosthocConfig(methods=("awq",))
    with pytest.raises(UserError):
        PosthocConfig(methods=("lowrank",), rank=0)
    with pytest.raises(UserError):
        PosthocConfig(qep_alpha=2.0)


def test_recurrence_error_is_zero_against_itself_and_grows_with_noise(teacher):
    tokens = torch.randint(0, 512, (2, 24))
    S, O = trajectories(teacher, tokens)
    H = teacher.config.nheads
    assert S.shape[:4] == (24, 2, 2, H) and O.shape == (24, 2, 2, 64)
    with torch.no_grad():  # step() trajectories are the forward's per-block residual streams
        _, hidden = teacher(tokens, return_hidden=True)
    for layer, h in enumerate(hidden):
        assert torch.allclose(O[:, layer].transpose(0, 1), h, atol=1e-4)
    # continuing from the forward's state at t0 reproduces the trajectory from t0 on
    S2, O2 = trajectories(teacher, tokens, 10, states_at(teacher, tokens, 10))
    assert torch.allclose(O2, O[10:], atol=1e-4) and torch.allclose(S2, S[10:], atol=1e-4)
    hz = decay_horizons(teacher, tokens)
    assert hz.shape == (2, H) and bool((hz > 0).all())
    same = recurrence_analysis(teacher, teacher, tokens, (S, O), hz, 12)
    assert max(same["output"]) == 0.0 and max(same["injection"]["state_only"]) < 1e-5   # forward vs step: fp noise
    noisy = inject_noise(teacher, 1, group_size=32)
    err = relative_error(trajectories(noisy, tokens)[1], O)
    assert float(err[:, 0].abs().max()) == 0.0          # layer 0 untouched
    assert float(err[:, 1].min()) > 0.0                  # layer 1 perturbed at every position
    r = recurrence_analysis(noisy, teacher, tokens, (S, O), hz, 12)
    inj = r["injection"]
    assert len(inj["own"]) == len(inj["weights_only"]) == len(inj["state_only"]) == 12
    assert inj["state_only"][0] > 0 and inj["weights_only"][0] > 0
    assert sum(b["heads"] for b in r["state_abs"].values()) == 2 * H


def test_gptq_beats_round_to_nearest_on_its_objective_and_exports_exactly():
    from ternary_mamba.quant.posthoc import gptq_ternary
    from ternary_mamba.quant.ternary import absmean_scale, dequantize, round_scale, ternary_codes
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 128, generator=gen) @ (0.3 * torch.randn(128, 128, generator=gen) + torch.eye(128))
    W = 0.05 * torch.randn(24, 128, generator=gen)
    Q, s = gptq_ternary(W, X.T @ X, 64)
    s0 = round_scale(absmean_scale(W, 64))
    rtn = dequantize(ternary_codes(W, s0, 64), s0, 64)
    err = lambda A: float((X @ (A - W).T).norm())
    assert err(Q) < 0.85 * err(rtn)
    assert torch.equal(dequantize(ternary_codes(Q, s, 64), s, 64), Q)     # Q is exactly ternary under s
    assert torch.equal(s, round_scale(s))


def test_ptq_cli_end_to_end_and_bad_input(tiny_teacher_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "ptq"
    args = ["ptq", "--teacher", str(tiny_teacher_dir), "--data", str(text_dir), "--group-size", "32",
            "--calib-seqs", "4", "--seq-len", "32", "--eval-batches", "2", "--correct", "qep", "lowrank",
            "--rank", "2", "--out", str(out)]
    assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == "PTQ + QEP + low-rank r2 (act.-weighted)" and s["extra_params"] > 0
    assert s["row"]["ppl"] > 1 and 0 < s["row"]["top1_agree"] <= 1
    assert s["sizes_bytes"]["tq2"] < s["sizes_bytes"]["fp16"]
    assert (out / "student" / "config.json").exists()
    capsys.readouterr()
    assert main(args) == 1  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["ptq", "--teacher", str(tmp_path / "none"), "--data", str(text_dir)]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.slow
def test_claims_experiment_end_to_end_and_resume(tiny_teacher_dir, text_dir, tmp_path, capsys):
    out = tmp_path / "claims"
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- claims:begin -->\nSTALE-TEXT\n<!-- claims:end -->\ntail\n")
    args = ["experiment", "claims", "--teacher", str(tiny_teacher_dir), "--data", str(text_dir), "--eval-data",
            str(text_dir), "--tokens", "10000", "--control-tokens", "10000", "--seeds", "2", "--positions", "24",
            "--sequences", "2", "--group-size", "32", "--calib-small", "4", "--calib-large", "8",
            "--eval-windows", "8", "--out", str(out), "--publish", str(tmp_path / "pub"), "--readme", str(readme),
            "--skip", "qat-learned-linear", "qat-learned-lr3", "qat-guarded", "qat-frozen", "scratch-fp",
            "qat-absmean-x16"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert {"teacher", "ptq", "gptq", "qat-absmean@0", "qat-absmean@1", "scratch-ternary@1", "gpt-teacher",
            "gpt-ptq", "gpt-qat-absmean@0"} <= set(res["arms"])
    st = res["statistics"]["qat-absmean"]["held-out"]
    assert st["seeds"] == 2 and st["ppl_ci"][0] <= st["ppl"] <= st["ppl_ci"][1]
    assert {v["verdict"] for v in res["verdicts"]} <= {"held", "did not hold", "inconclusive", "not tested"}
    keys = {r["key"] for r in res["rules"]}
    assert {"collapse-linear-x10", "collapse-scratch-linear-x10", "collapse-specific", "guard", "because-ssm",
            "budget-curve", "recurrence"} <= keys, keys
    assert all("sensitivity" in r for r in res["rules"] if "ci" in r)
    assert res["sets"]["held-out"]["window_book"] and res["arms"]["ptq"]["bits_per_weight"] > 2
    assert any("Transformer control" in v["claim"] or "GPT" in v["claim"] for v in res["verdicts"])
    for png in ("collapse.png", "state_error_by_horizon.png", "injection.png"):
        assert (out / png).stat().st_size > 1000 and (tmp_path / "pub" / png).exists()
    assert "| PTQ + QEP |" in (out / "results.md").read_text()
    text = readme.read_text()
    assert "STALE-TEXT" not in text and "tail" in text and "| claim | verdict |" in text
    from ternary_mamba.experiment.results import render_markdown
    assert (out / "results.md").read_text() == render_markdown(res)     # rendered from results.json alone
    assert res["code_version"] and all(r["cache_key"] for r in res["arms"].values())
    capsys.readouterr()
    assert main(args) == 0  # resume: every stage cached
    assert capsys.readouterr().out.count("done (cached)") >= 20
    stage = out / "stages" / "ptq.json"        # a stage cached by other settings or code is computed again
    st = json.loads(stage.read_text())
    stage.write_text(json.dumps({**st, "cache_key": "0" * 16}))
    assert main(args) == 0
    got = capsys.readouterr().out
    assert "ptq: cached result is from other settings or code" in got and got.count("re-running it") == 1
    assert json.loads(stage.read_text())["cache_key"] == st["cache_key"]
    res2 = json.loads((out / "results.json").read_text())
    res2["arms"]["ptq"]["code_version"] = "000000000000"     # a result from other code is never published
    (out / "results.json").write_text(json.dumps(res2))
    from ternary_mamba.errors import UserError
    from ternary_mamba.experiment.results import publish
    with pytest.raises(UserError, match="another code version"):
        publish(out, tmp_path / "pub2", [])
    assert not (tmp_path / "pub2").exists()
    control = list(args)                       # another control budget: only the control's stages run again
    control[control.index("--control-tokens") + 1] = "12000"
    capsys.readouterr()
    assert main(control) == 0
    rerun = [ln for ln in capsys.readouterr().out.splitlines() if "re-running it" in ln]
    assert rerun and all(ln.startswith("[claims] gpt-") for ln in rerun), rerun
    other = [("20000" if a == "10000" else a) for a in args]
    assert main(other) == 1  # different experiment in the same folder
    assert "different tokens" in capsys.readouterr().err
