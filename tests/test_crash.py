"""Crash safety: a run killed with SIGKILL at 20 seeded random moments (inside checkpoint saving too) always resumes,
never goes back past its last checkpoint, and ends on exactly the uninterrupted trajectory."""
import json
import os
import random
import signal
import subprocess
import sys

from conftest import BUNDLED_TOKENIZER
from ternary_mamba import faults
from ternary_mamba.cli import main
from ternary_mamba.formats.fs import aside_path

TINY = '{"d_model": 32, "n_layer": 2, "d_state": 16, "headdim": 16, "vocab_size": 8192, "chunk_size": 16}'
STEPS = 100


def _args(cfg, data, out, extra=()):
    return ["pretrain", "--model-config", str(cfg), "--tokenizer", str(BUNDLED_TOKENIZER), "--data", str(data),
            "--tokens", str(STEPS * 4 * 64), "--seq-len", "64", "--batch-size", "4", "--eval-every", "0",
            "--save-every", "1", "--lr", "3e-3", "--threads", "1", "--out", str(out), *extra]


def _losses(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def _saved_step(run):
    """The step of the checkpoint a resume would load: the checkpoint folder, or, killed between the renames of
    a save, its previous version set aside (which `--resume` puts back)."""
    for d in (run / "checkpoint", aside_path(run / "checkpoint")):
        try:
            return json.loads((d / "trainer_state.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            continue
    return None


def test_twenty_sigkills_lose_nothing(text_dir, tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(TINY)
    n = __import__("torch").get_num_threads()
    try:
        assert main(_args(cfg, text_dir, tmp_path / "ref")) == 0
    finally:
        __import__("torch").set_num_threads(n)
    ref = _losses(tmp_path / "ref")
    run, rng, kills, last = tmp_path / "run", random.Random(0), 0, 0
    while kills < 20:
        start = _saved_step(run)
        extra = ["--resume"] if start is not None else []
        if not extra and run.exists():          # killed before its first checkpoint: start again
            import shutil
            shutil.rmtree(run)
        # a moment this process will reach, chosen up front (no timer to race): while computing a step's loss,
        # inside a checkpoint save after 0-3 of its files, or between the renames that swap it in (faults.py)
        step, where = (start or 1) + rng.randint(1, 3), rng.choice(faults.POINTS)
        env = {**os.environ, "TERNARY_MAMBA_FAULT": f"kill@0:{step}:{where}"}
        p = subprocess.run([sys.executable, "-m", "ternary_mamba", *_args(cfg, text_dir, run, extra)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
        assert p.returncode == -signal.SIGKILL, (where, step, p.stderr[-2000:])
        kills += 1
        now = _saved_step(run)
        assert now is None or now >= last, f"the checkpoint went back from step {last} to {now}"
        last = now or last
    if _saved_step(run) != STEPS:               # finish the run after the last kill
        assert main(_args(cfg, text_dir, run, ["--resume"] if _saved_step(run) is not None else [])) == 0
    got = _losses(run)
    assert kills == 20, f"only {kills} kills happened before the run finished"
    assert len(got) == len(ref) == STEPS
    assert max(abs(a - b) for a, b in zip(got, ref)) <= 1e-6


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_killed_saves_leftovers_go(text_dir, tmp_path):
    """Two runs on one --out cannot both proceed (the folder is locked while a run holds it); the temporary
    checkpoint folder a killed save left is removed when the run is resumed."""
    from ternary_mamba.train.runs import claim_run_dir
    cfg = tmp_path / "tiny.json"
    cfg.write_text(TINY)
    run = tmp_path / "run"
    args = ["pretrain", "--model-config", str(cfg), "--tokenizer", str(BUNDLED_TOKENIZER), "--data", str(text_dir),
            "--tokens", str(4 * 4 * 64), "--seq-len", "64", "--batch-size", "4", "--eval-every", "0",
            "--save-every", "1", "--threads", "1", "--out", str(run)]
    claim_run_dir(run)                           # this process holds the folder, as a run in progress would
    r = subprocess.run([sys.executable, "-m", "ternary_mamba", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "another run is using this folder" in r.stderr and not run.exists()
    env = {**os.environ, "TERNARY_MAMBA_FAULT": "kill@0:2:save2"}     # killed inside the save of step 2
    other = tmp_path / "other"
    p = subprocess.run([sys.executable, "-m", "ternary_mamba", *args[:-1], str(other)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL
    assert list(other.glob(".checkpoint.tmp*"))              # the half-written checkpoint
    p = subprocess.run([sys.executable, "-m", "ternary_mamba", *args[:-1], str(other), "--resume"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-1000:]
    assert not list(other.glob(".checkpoint.tmp*")) and not list(tmp_path.glob(".other.lock"))
