"""Collectives right by construction: every collective of ours goes through `distributed.all_reduce`, which puts
its tensor on the device the backend serves.  NCCL serves CUDA tensors only, and a gloo test cannot see a CPU
tensor handed to it; here a fake NCCL group (FakeTensorMode makes CUDA tensors without a GPU) checks the device
of every tensor that reaches the collective.  And torchrun at world size 1 really forms the group and wraps."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import BUNDLED_TOKENIZER
from ternary_mamba.train import distributed as D

PKG = Path(__file__).resolve().parents[1] / "ternary_mamba"
COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "reduce", "gather", "scatter", "send", "recv", "all_to_all",
               "all_to_all_single", "broadcast_object_list", "all_gather_object"}


def test_collectives_are_called_only_through_the_helper():
    bad = []
    for p in PKG.rglob("*.py"):
        tree = ast.parse(p.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr in COLLECTIVES and isinstance(node.func.value, ast.Name) \
                        and node.func.value.id in ("dist", "torch.distributed"):
                    if not (p.name == "distributed.py" and fn.name == "all_reduce"):
                        bad.append(f"{p.relative_to(PKG)}:{node.lineno} {fn.name} calls dist.{node.func.attr}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("backend, local, want", [("nccl", 1, "cuda:1"), ("gloo", 0, "cpu"),
                                                  ("cpu:gloo,cuda:nccl", 1, "cpu"), ("cuda:nccl", 0, "cuda:0")])
def test_the_collective_device_follows_the_backend(monkeypatch, backend, local, want):
    monkeypatch.setattr(dist, "get_backend", lambda *a: backend)
    monkeypatch.setattr(D, "local_device", lambda: torch.device(want) if want != "cpu" else torch.device("cpu"))
    assert str(D.collective_device()) == want


class Reached(Exception):
    """The collective received its tensor (values of fake tensors cannot be read back, so the test stops here)."""


@pytest.fixture
def fake_nccl_group(monkeypatch):
    """A two-rank NCCL group on GPU 0 as far as our code can tell; the collective checks its tensor's device."""
    seen = []

    def all_reduce(t, op=None, group=None, async_op=False):
        seen.append(t.device)
        assert t.device.type in D.served_device_types(dist.get_backend()), \
            f"a {t.device.type} tensor handed to a {dist.get_backend()} collective"
        raise Reached
    monkeypatch.setattr(D, "active", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(D, "local_device", lambda: torch.device("cuda", 0))
    with FakeTensorMode(allow_non_fake_inputs=True):
        yield seen


@pytest.mark.parametrize("call", [lambda: D.mean_metrics({"loss": 1.0, "kl": 0.5}), lambda: D.any_rank(True)],
                         ids=["mean_metrics", "any_rank"])
def test_an_nccl_group_gets_cuda_tensors(fake_nccl_group, call):
    with pytest.raises(Reached):
        call()
    assert [d.type for d in fake_nccl_group] == ["cuda"]


def _pretrain(out, extra=()):
    cfg = out.parent / "tiny.json"
    cfg.write_text('{"d_model": 32, "n_layer": 2, "d_state": 16, "headdim": 16, "vocab_size": 8192, "chunk_size": 16}')
    return ["pretrain", "--model-config", str(cfg), "--tokenizer", str(BUNDLED_TOKENIZER), "--data",
            str(out.parent / "text"), "--tokens", str(8 * 64 * 6), "--seq-len", "64", "--batch-size", "8",
            "--eval-every", "0", "--save-every", "2", "--threads", "1", "--out", str(out), *extra]


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_at_world_size_one_forms_the_group_and_follows_the_single_process_run(text_dir, tmp_path, mode):
    import shutil
    shutil.copytree(text_dir, tmp_path / "text")
    from ternary_mamba.cli import main
    n = torch.get_num_threads()
    try:
        assert main(_pretrain(tmp_path / "single")) == 0
    finally:
        torch.set_num_threads(n)
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    extra = ["--fsdp"] if mode == "fsdp" else []
    r = subprocess.run([exe, "--standalone", "--nproc_per_node=1", "-m", "ternary_mamba",
                        *_pretrain(tmp_path / "one", extra)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"distributed: {'FSDP2' if mode == 'fsdp' else 'DDP'} over 1 rank(s), gloo" in r.stdout
    got, ref = _losses(tmp_path / "one"), _losses(tmp_path / "single")
    assert len(got) == len(ref) == 6 and max(abs(a - b) for a, b in zip(got, ref)) < 1e-4
