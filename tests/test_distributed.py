"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 runs follow the single-process trajectory with
the same global batch, and a killed distributed run resumes onto the same trajectory."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import BUNDLED_TOKENIZER

TINY = '{"d_model": 32, "n_layer": 2, "d_state": 16, "headdim": 16, "vocab_size": 8192, "chunk_size": 16}'
pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "torchrun")), reason="torchrun not installed")


def _args(cfg, data, out, batch, extra=()):
    return ["pretrain", "--model-config", str(cfg), "--tokenizer", str(BUNDLED_TOKENIZER), "--data", str(data),
            "--tokens", str(16 * 64 * 12), "--seq-len", "64", "--batch-size", str(batch), "--eval-every", "0",
            "--save-every", "2", "--out", str(out), "--lr", "3e-3", "--threads", "1", *extra]


def _torchrun(args, fault=None, **kw):
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [exe, "--standalone", "--nproc_per_node=2", "-m", "ternary_mamba", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"TERNARY_MAMBA_FAULT": fault} if fault else {})}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _losses(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if "loss" in l]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, text_dir):
    d = tmp_path_factory.mktemp("dist")
    cfg = d / "tiny.json"
    cfg.write_text(TINY)
    from ternary_mamba.cli import main
    assert main(_args(cfg, text_dir, d / "single", batch=16)) == 0
    return cfg, d, _losses(d / "single")


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp-accum", "fsdp-accum"])
def test_two_processes_match_single_process(setup, text_dir, mode):
    """2 ranks x 8 (or x 4 x 2 accumulated micro-batches, gradients reduced once per step) = the single run's 16."""
    cfg, d, ref = setup
    out = d / mode
    extra = (["--fsdp"] if mode.startswith("fsdp") else []) + (["--grad-accum", "2"] if "accum" in mode else [])
    p = _torchrun(_args(cfg, text_dir, out, batch=4 if "accum" in mode else 8, extra=extra))
    log = p.communicate(timeout=600)[0]
    assert p.returncode == 0, log[-3000:]
    got = _losses(out)
    assert len(got) == len(ref) == 12
    diff = max(abs(a - b) for a, b in zip(got, ref))
    print(f"{mode}: max |loss difference| vs single process = {diff:.2e}")
    assert diff < 2e-4
    from ternary_mamba import load_model
    assert load_model(out / "model").config.d_model == 32


def test_killed_distributed_run_resumes_onto_the_same_trajectory(setup, text_dir):
    cfg, d, ref = setup
    out = d / "killed"
    # rank 0 SIGKILLs itself inside step 7 (faults.py); torchrun then stops the other rank
    p = _torchrun(_args(cfg, text_dir, out, batch=8), start_new_session=True, fault="kill@0:7")
    p.communicate(timeout=600)
    assert p.returncode != 0
    state = out / "checkpoint" / "trainer_state.json"
    assert json.loads(state.read_text())["step"] == 6
    p = _torchrun(_args(cfg, text_dir, out, batch=8, extra=["--resume"]))
    log = p.communicate(timeout=600)[0]
    assert p.returncode == 0, log[-3000:]
    got = _losses(out)
    assert len(got) == 12 and max(abs(a - b) for a, b in zip(got, ref)) < 2e-4


def test_a_run_resumes_at_another_world_size_with_the_same_global_batch(setup, text_dir):
    """Killed in one process (batch 16), resumed on two ranks (8 each): the same trajectory as the uninterrupted run."""
    cfg, d, ref = setup
    out = d / "regrown"
    env = {**os.environ, "TERNARY_MAMBA_FAULT": "kill@0:7"}
    r = subprocess.run([sys.executable, "-m", "ternary_mamba", *_args(cfg, text_dir, out, batch=16)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 6
    p = _torchrun(_args(cfg, text_dir, out, batch=8, extra=["--resume"]))
    log = p.communicate(timeout=600)[0]
    assert p.returncode == 0, log[-3000:]
    assert "shared out anew (world size 1 -> 2)" in log
    got = _losses(out)
    assert len(got) == len(ref) == 12 and max(abs(a - b) for a, b in zip(got, ref)) < 2e-4


@pytest.mark.parametrize("fault,message", [("nan@1:3", "loss is not finite on some rank"),
                                           ("raise@1:3", "injected fault at step 3")])
def test_a_fault_on_one_rank_stops_every_rank_promptly(setup, text_dir, tmp_path, fault, message):
    cfg, _, _ = setup
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERNARY_MAMBA_FAULT": fault}
    # "promptly": every rank stops by itself (no rank left waiting in a collective until torchrun's or NCCL's
    # timeout); the subprocess limit is only a backstop
    p = subprocess.run([exe, "--standalone", "--nproc_per_node=2", "-m", "ternary_mamba",
                        *_args(cfg, text_dir, tmp_path / "f", batch=8)], env=env, capture_output=True, text=True,
                       timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert message in out, out[-2000:]
    ours = [l for l in out.splitlines() if l.startswith("ternary-mamba pretrain: error:")]
    assert len(ours) == 1 if fault.startswith("nan") else len(ours) >= 1, ours


def test_fsdp_checkpoints_are_sharded_and_resume_at_another_world_size(setup, text_dir):
    """An FSDP run on 2 ranks writes one shard per rank (nothing gathered to rank 0); killed inside step 7, it
    resumes in one process (world size 2 -> 1, batch doubled) onto the uninterrupted trajectory."""
    cfg, d, ref = setup
    out = d / "fsdp-sharded"
    p = _torchrun(_args(cfg, text_dir, out, batch=8, extra=["--fsdp"]), start_new_session=True, fault="kill@0:7")
    p.communicate(timeout=600)
    assert p.returncode != 0
    ckpt = out / "checkpoint"
    assert sorted(f.name for f in ckpt.iterdir()) == ["shard-00000-of-00002.safetensors",
                                                      "shard-00001-of-00002.safetensors", "trainer_state.json"]
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 6
    r = subprocess.run([sys.executable, "-m", "ternary_mamba", *_args(cfg, text_dir, out, batch=16,
                                                                      extra=["--fsdp", "--resume"])],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    got = _losses(out)
    assert len(got) == 12 and max(abs(a - b) for a, b in zip(got, ref)) < 2e-4
    assert not list(out.glob(".checkpoint.tmp*"))


def test_a_sharded_save_killed_midway_leaves_the_previous_checkpoint(setup, text_dir):
    """Rank 0 killed while step 6's shards are being written: step 4's checkpoint is still whole, the half-written
    folder is cleared at the next start, and the resumed run (on 2 ranks again) follows the trajectory."""
    cfg, d, ref = setup
    out = d / "fsdp-killed-in-save"
    p = _torchrun(_args(cfg, text_dir, out, batch=8, extra=["--fsdp"]), start_new_session=True,
                  fault="kill@0:6:save0")
    p.communicate(timeout=600)
    assert p.returncode != 0
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    p = _torchrun(_args(cfg, text_dir, out, batch=8, extra=["--fsdp", "--resume"]))
    log = p.communicate(timeout=600)[0]
    assert p.returncode == 0, log[-3000:]
    got = _losses(out)
    assert len(got) == 12 and max(abs(a - b) for a, b in zip(got, ref)) < 2e-4
    assert not list(out.glob(".checkpoint.tmp*"))
