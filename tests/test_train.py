"""The trainer end to end on tiny models: pretrain, QAT+KD, kill + resume equality, bad input."""
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import BUNDLED_TOKENIZER
from ternary_mamba.cli import main

TINY = '{"d_model": 32, "n_layer": 2, "d_state": 16, "headdim": 16, "vocab_size": 8192, "chunk_size": 16}'


def _losses(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(l)]


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "tiny.json"
    p.write_text(TINY)
    return p


def _pretrain_args(cfg, data, out, tokens=8192, extra=()):
    return ["pretrain", "--model-config", str(cfg), "--tokenizer", str(BUNDLED_TOKENIZER), "--data", str(data),
            "--tokens", str(tokens), "--seq-len", "64", "--batch-size", "4", "--eval-every", "8",
            "--eval-batches", "1", "--save-every", "2", "--out", str(out), "--lr", "3e-3", *extra]


def test_pretrain_learns(tiny_cfg, text_dir, tmp_path):
    assert main(_pretrain_args(tiny_cfg, text_dir, tmp_path / "run", tokens=16384)) == 0
    losses = _losses(tmp_path / "run")
    assert len(losses) == 64 and sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.5
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["heldout_ppl"] < 8192
    from ternary_mamba import load_model
    assert load_model(tmp_path / "run" / "model").config.d_model == 32


@pytest.fixture
def one_thread():
    """Bit-exact comparisons need a fixed reduction order: one BLAS thread (multi-threaded GEMM may
    change its split under load), restored afterwards."""
    import torch
    n = torch.get_num_threads()
    yield ["--threads", "1"]
    torch.set_num_threads(n)


def test_kill_and_resume_reproduces_the_uninterrupted_run(tiny_cfg, text_dir, tmp_path, one_thread):
    args = _pretrain_args(tiny_cfg, text_dir, tmp_path / "a", tokens=12288, extra=one_thread)
    assert main(args) == 0
    ref = _losses(tmp_path / "a")
    b = tmp_path / "b"
    env = {**os.environ, "TERNARY_MAMBA_FAULT": "kill@0:11"}    # SIGKILL inside step 11 (faults.py)
    proc = subprocess.run([sys.executable, "-m", "ternary_mamba",
                           *_pretrain_args(tiny_cfg, text_dir, b, 12288, one_thread)],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    killed_at = json.loads((b / "checkpoint" / "trainer_state.json").read_text())["step"]
    assert killed_at == 10 < len(ref)           # the last checkpoint before the kill (--save-every 2)
    assert main(_pretrain_args(tiny_cfg, text_dir, b, 12288, ["--resume", *one_thread])) == 0
    got = _losses(b)
    assert len(got) == len(ref)
    assert max(abs(x - y) for x, y in zip(got, ref)) <= 1e-6  # bit-identical on one thread


def test_quantize_runs_and_beats_ptq(tiny_teacher_dir, text_dir, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", "--teacher", str(tiny_teacher_dir), "--data", str(text_dir), "--tokens", "8192",
                 "--seq-len", "64", "--batch-size", "4", "--group-size", "32", "--scale-mode", "guarded",
                 "--eval-every", "16", "--eval-batches", "1", "--final-eval-batches", "2", "--lr", "3e-3",
                 "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    rows = s["rows"]
    assert rows["QAT+KD (guarded)"]["kl"] < rows["PTQ (absmean, no training)"]["kl"]
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("zero_ratio_layers" in r for r in recs)
    from ternary_mamba import load_model
    assert load_model(out / "student").ternary_config.scale_mode == "guarded"
    # what changes the numbers is recorded: versions, CPU kind, threads, kernels; and the scan that ran
    rec = json.loads((out / "run.json").read_text())
    assert isinstance(rec["config"]["threads"], int) and rec["config"]["threads"] >= 1   # the count in force
    env = rec["environment"]
    assert {"torch", "cpu", "threads", "kernels", "kernel_march"} <= set(env)
    from ternary_mamba.ops.build import get_kernel
    assert ("c-train" if get_kernel() is not None else "torch") in s["kernel_paths"]["ssd_scan"]


def test_bad_inputs_give_one_line_and_exit_1(tiny_cfg, text_dir, tmp_path, capsys):
    cases = [
        (["quantize", "--teacher", str(tmp_path / "missing"), "--data", str(text_dir), "--out", str(tmp_path / "x")],
         "no such folder"),
        (_pretrain_args(tiny_cfg, text_dir, tmp_path / "y", tokens=10), "smaller than one optimizer step"),
        (_pretrain_args(tiny_cfg, tmp_path / "nothing", tmp_path / "z"), "no such file"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append((_pretrain_args(tiny_cfg, tmp_path / "empty", tmp_path / "w"), "no text files"))
    binf = tmp_path / "bin.txt"
    binf.write_bytes(b"\xff\xfe\x00\x01" * 100)
    cases.append((_pretrain_args(tiny_cfg, binf, tmp_path / "v"), "binary"))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    cases.append((_pretrain_args(tiny_cfg, latin, tmp_path / "u"), "not UTF-8"))
    for argv, msg in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


def test_existing_run_is_never_overwritten_and_resume_checks_config(tiny_cfg, text_dir, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(_pretrain_args(tiny_cfg, text_dir, out, tokens=1024)) == 0
    before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(_pretrain_args(tiny_cfg, text_dir, out, tokens=1024)) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert main(_pretrain_args(tiny_cfg, text_dir, out, tokens=2048, extra=["--resume"])) == 1
    assert "different config" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before
    assert main(_pretrain_args(tiny_cfg, text_dir, tmp_path / "notrun", extra=["--resume"])) == 1


def test_bf16_autocast_training_follows_the_fp32_loss_curve(tiny_teacher_dir, text_dir, tmp_path, capsys):
    """QAT+KD under bf16 autocast (what --dtype auto picks on AVX512-BF16 CPUs) against the same run in fp32:
    the loss curves agree within a few percent at every logged step, and the choice is printed."""
    runs = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype
        assert main(["quantize", "--teacher", str(tiny_teacher_dir), "--data", str(text_dir), "--tokens", "12288",
                     "--seq-len", "64", "--batch-size", "4", "--group-size", "32", "--eval-every", "1000",
                     "--eval-batches", "1", "--final-eval-batches", "1", "--lr", "3e-3", "--dtype", dtype,
                     "--log-every", "4", "--out", str(out)]) == 0
        runs[dtype] = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()
                       if '"loss"' in l]
        assert json.loads((out / "run.json").read_text())["config"]["dtype"] == dtype
    a, b = runs["fp32"], runs["bf16"]
    assert len(a) == len(b) >= 8
    assert a[-1] < a[0] and b[-1] < b[0]                                    # both learn
    rel = [abs(x - y) / abs(x) for x, y in zip(a, b)]
    assert max(rel) < 0.05, rel
    capsys.readouterr()
    out = tmp_path / "auto"
    assert main(["quantize", "--teacher", str(tiny_teacher_dir), "--data", str(text_dir), "--tokens", "1024",
                 "--seq-len", "64", "--batch-size", "4", "--group-size", "32", "--eval-batches", "1",
                 "--final-eval-batches", "1", "--out", str(out)]) == 0
    assert "--dtype auto:" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["config"]["dtype"] in ("fp32", "bf16")
