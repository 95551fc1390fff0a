"""Crash safety: a run killed with SIGKILL at 20 random moments (inside checkpoint saving too) always resumes,
never goes back past its last checkpoint, and ends on exactly the uninterrupted trajectory."""
import json
import os
import random
import signal
import subprocess
import sys
import time

from conftest import BUNDLED_TOKENIZER
from ternary_mamba.cli import main

TINY = '{"d_model": 32, "n_layer": 2, "d_state": 16, "headdim": 16, "vocab_size": 8192, "chunk_size": 16}'
STEPS = 100


def _args(cfg, data, out, extra=()):
    return ["pretrain", "--config", str(cfg), "--tokenizer", str(BUNDLED_TOKENIZER), "--data", str(data),
            "--tokens", str(STEPS * 4 * 64), "--seq-len", "64", "--batch-size", "4", "--eval-every", "0",
            "--save-every", "1", "--lr", "3e-3", "--threads", "1", "--out", str(out), *extra]


def _losses(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def _saved_step(run):
    try:
        return json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
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
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    while kills < 20:
        extra = ["--resume"] if _saved_step(run) is not None else []
        if not extra and run.exists():          # killed before its first checkpoint: start again
            import shutil
            shutil.rmtree(run)
        p = subprocess.Popen([sys.executable, "-m", "ternary_mamba", *_args(cfg, text_dir, run, extra)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        start = _saved_step(run) or 0
        deadline = time.time() + 120
        # wait until this process has trained a little (random: 0-2 further saves), then kill it mid-flight
        target = start + rng.randint(0, 2)
        while time.time() < deadline and p.poll() is None and (_saved_step(run) or 0) < target:
            time.sleep(0.01)
        time.sleep(rng.random() * 0.05)         # sometimes inside the next save
        if p.poll() is not None:                # it finished: the run is complete
            assert p.returncode == 0, p.stderr.read()[-2000:]
            break
        p.send_signal(signal.SIGKILL)
        p.wait()
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
