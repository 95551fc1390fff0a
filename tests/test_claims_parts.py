"""The claims experiment's parts: state distillation, the GPT control model, the clean held-out set, the
bootstrap statistics, and the scale modes of the from-scratch control."""
import json

import numpy as np
import pytest
import torch

from conftest import random_model, tiny_config
from ternary_mamba.core.gpt import GPTConfig, GPTLM
from ternary_mamba.experiment.heldout import CLEAN, HELDOUT_BOOKS, leakage_table
from ternary_mamba.experiment.stats import arm_statistics, difference_ci, eval_windows, summary
from ternary_mamba.quant.qat import TernaryConfig, quantize_, ternary_modules
from ternary_mamba.train.distill import DistillObjective, segmented_forward


def test_segmented_forward_is_the_forward_and_state_distillation_trains_the_states():
    teacher = random_model(tiny_config(), seed=0).eval()
    student = random_model(tiny_config(), seed=0)
    quantize_(student, TernaryConfig(group_size=32))
    x = torch.randint(0, 512, (2, 48))
    with torch.no_grad():
        full = student(x)
        seg, states = segmented_forward(student, x, 4)
    assert torch.allclose(seg, full, atol=1e-4)
    assert len(states) == 3 * teacher.config.n_layer       # 3 inner boundaries x layers
    obj = DistillObjective(teacher, gamma_state=1.0, state_segments=4)
    batch = torch.randint(0, 512, (2, 49))
    loss, metrics = obj.loss(student, batch)
    assert metrics["state_mse"] > 0 and loss.item() == pytest.approx(metrics["kl"] + metrics["state_mse"], rel=1e-5)
    loss.backward()
    g = student.backbone.layers[0].mixer.in_proj.weight.grad
    assert g is not None and g.abs().sum() > 0
    # without the state term the loss is the plain KD loss of the unsegmented forward
    plain, m2 = DistillObjective(teacher).loss(student, batch)
    assert m2["kl"] == pytest.approx(metrics["kl"], rel=1e-4)


def test_gpt_control_matches_the_teacher_size_and_takes_the_ternary_quantizer():
    c = GPTConfig.matching(5_570_176, 8192, 256)
    assert c.n_layer == 4 and abs(c.n_params - 5_570_176) / 5_570_176 < 0.02
    small = GPTConfig(vocab_size=300, d_model=64, n_layer=2, n_head=2, d_ff=96)
    m = GPTLM(small, seed=0)
    assert sum(p.numel() for p in m.parameters()) == small.n_params
    x = torch.randint(0, 300, (2, 20))
    y = m(x)
    # causal: the first 10 positions do not see the rest
    assert torch.allclose(m(x[:, :10]), y[:, :10], atol=1e-5)
    quantize_(m, TernaryConfig(group_size=32))
    assert len(ternary_modules(m)) == 4 * small.n_layer      # attention qkv/out and MLP up/down


def test_the_clean_heldout_books_are_bundled_and_the_leaky_ones_named():
    from ternary_mamba import assets
    assert set(CLEAN) == {84, 11757}
    assert sorted(p.name for p in assets.CLEAN_HELDOUT_BOOKS.iterdir()) == ["11757.txt", "84.txt"]
    assert "Oz" in HELDOUT_BOOKS[55][2] and len(leakage_table()) == 2 + len(HELDOUT_BOOKS)


def test_bootstrap_intervals_cover_the_estimate_and_separate_different_arms():
    rng = np.random.default_rng(0)

    def windows(mean):
        ce = list(rng.normal(mean * 256, 20, size=200))
        return {"ce": ce, "kl": [c / 10 for c in ce], "agree": [128] * 200, "tokens": [256] * 200}
    a = [windows(3.0), windows(3.0), windows(3.01)]
    b = [windows(3.2), windows(3.2), windows(3.21)]
    st = arm_statistics(a)
    assert st["seeds"] == 3 and st["ppl_ci"][0] < st["ppl"] < st["ppl_ci"][1] and st["ppl_sd"] > 0
    assert summary(a[0])["top1_agree"] == 0.5
    lo, hi = difference_ci(b, a)
    assert lo > 0                                    # b is clearly worse
    lo, hi = difference_ci(a, a)
    assert lo <= 0 <= hi
    assert eval_windows(list(range(1000)), 5) == [0, 249, 499, 749, 999]


@pytest.mark.parametrize("mode", ["learned", "frozen"])
def test_pretrain_takes_a_scale_mode(text_dir, tmp_path, mode):
    from conftest import BUNDLED_TOKENIZER
    from ternary_mamba.cli import main
    from ternary_mamba.runtime.load import load_model
    cfg = tmp_path / "tiny.json"
    cfg.write_text('{"d_model": 32, "n_layer": 2, "d_state": 16, "headdim": 16, "vocab_size": 8192, "chunk_size": 16}')
    out = tmp_path / "scratch"
    assert main(["pretrain", "--model-config", str(cfg), "--tokenizer", str(BUNDLED_TOKENIZER), "--data",
                 str(text_dir), "--ternary", "--scale-mode", mode, "--group-size", "32", "--tokens", "2048",
                 "--seq-len", "32", "--batch-size", "4", "--out", str(out), "--eval-every", "0"]) == 0
    m = load_model(out / "model")
    assert m.ternary_config.scale_mode == mode
    rec = json.loads((out / "run.json").read_text())
    assert rec["config"]["quant"]["scale_mode"] == mode


def test_published_commands_name_corpora_from_their_data_folder():
    from ternary_mamba.commands.configs import ClaimsConfig
    from ternary_mamba.experiment.results import command, shown_data_path
    assert shown_data_path("../shared/data/corpora/gutenberg/train") == "DATA/corpora/gutenberg/train"
    assert shown_data_path("/srv/corpora-disk/data/evals") == "DATA/evals"                 # absolute
    assert shown_data_path("books/") == "books/"                     # inside the working directory: as given
    cmd = command(ClaimsConfig(control_data=["../shared/data/corpora/gutenberg/train"], out="runs/c"))
    assert "--control-data DATA/corpora/gutenberg/train" in cmd and "shared" not in cmd
