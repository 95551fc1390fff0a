"""The planner: its memory figures against the measured peak of a real CPU step at small scale, and the 1.3B
plan the issue asks for."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ternary_mamba.cli import main

HELPER = Path(__file__).parent / "helpers" / "measure_step_memory.py"


@pytest.mark.parametrize("checkpointing", ["0", "1"])
def test_planned_peak_matches_a_measured_step_within_20_percent(checkpointing):
    if not Path("/proc/self/statm").exists():
        pytest.skip("needs /proc to measure memory")
    # a fixed mmap threshold: glibc maps every large block and unmaps it when freed, so the peak RSS is the peak
    # of live memory (the adaptive threshold otherwise keeps freed blocks in the heap, run to run differently)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, str(HELPER), "4", "512", checkpointing], capture_output=True, text=True,
                         check=True, env=env).stdout.split()
    measured, planned = int(out[0]), int(out[1])
    assert 0.8 <= measured / planned <= 1.2, (measured, planned)


def test_plan_for_the_paper_run(capsys):
    assert main(["plan", "--teacher", "mamba2-1.3b", "--device", "cuda", "--dtype", "bf16", "--batch-size", "8",
                 "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    # Mamba-2 1.3B's parameters from its published shape, written out here (not the package's counter):
    # d 2048, 48 layers, d_inner 4096, 64 heads, d_state 128, conv 4, vocab 50277 padded to 50288, tied head
    d, L, di, h, n, K, V = 2048, 48, 4096, 64, 128, 4, 50288
    conv = di + 2 * n
    per_layer = (2 * di + 2 * n + h) * d + conv * K + conv + 3 * h + di + di * d + d
    params = V * d + L * per_layer + d
    assert params == 1_343_757_312
    assert f"{params / 1e9:.3f} B params" in out and "AdamW moments" in out and "102 M tokens in" in out
    import re
    assert "fits in 80 GB" in out and re.search(r"micro-batch [1-7] x 2048 fits", out)
    assert main(["plan", "--teacher", "mamba2-130m", "--gpu", "a10g", "--activation-checkpointing",
                 "--batch-size", "4", "--seq-len", "1024", "--nproc", "2", "--fsdp"]) == 0
    out = capsys.readouterr().out
    assert "2 x A10G" in out and "FSDP" in out


def _gpu_measurements():
    """The rows of docs/GPU.md's "measurements the planner is held to" table."""
    text = (Path(__file__).parent.parent / "docs" / "GPU.md").read_text()
    block = text.split("### The measurements the planner is held to", 1)[1]
    rows = []
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in ("130m", "370m", "780m", "1.3B", "2.7B"):
            b, l = (int(x) for x in cells[1].split(" × "))
            rows.append(dict(model="mamba2-" + cells[0].lower(), batch=b, seq=l, ckpt=cells[2] == "yes", gpu=cells[3],
                             kernels=tuple(k.strip() for k in cells[4].split(",")),
                             tok_s=None if cells[5] == "-" else float(cells[5]),
                             peak_gb=None if cells[6] == "-" else float(cells[6])))
    assert rows, "the table is gone from docs/GPU.md"
    return rows




def _cases(what):
    return [pytest.param(r, id=f"{r['model']}-{r['batch']}x{r['seq']}-ckpt{int(r['ckpt'])}-{r['gpu']}")
            for r in _gpu_measurements() if r[what] is not None]


def _setup(r):
    from ternary_mamba.core.config import PRESETS, Mamba2Config
    from ternary_mamba.quant.config import TernaryConfig
    return Mamba2Config(**PRESETS[r["model"]]), TernaryConfig(group_size=256, scale_mode="guarded", scale_format="bf16")


@pytest.mark.parametrize("r", _cases("peak_gb"))
def test_planned_peak_within_15_percent_of_the_gpu_measurement(r):
    from ternary_mamba.train.memory import plan_memory
    cfg, q = _setup(r)
    planned = plan_memory(cfg, q, r["batch"], r["seq"], "bf16", 1, False, r["ckpt"], "cuda", r["kernels"]).peak / 1e9
    assert 0.85 <= r["peak_gb"] / planned <= 1.15, (r, planned)


@pytest.mark.parametrize("r", _cases("tok_s"))
def test_cost_model_time_within_15_percent_of_the_gpu_measurement(r):
    from ternary_mamba.spec import GPUS
    from ternary_mamba.train.costmodel import predict_step
    cfg, q = _setup(r)
    pred = predict_step(cfg, q, r["batch"], r["seq"], GPUS[r["gpu"]], "bf16", r["ckpt"], r["kernels"])
    assert 0.85 <= r["tok_s"] / pred.tok_s <= 1.15, (r, pred.tok_s, pred.bound())
    assert 0 < pred.mfu < 1


def test_the_cost_model_sees_what_changes_the_time():
    """Sanity of the model itself: checkpointing costs time, a faster memory system saves it, a bigger
    micro-batch amortises the optimizer and raises tok/s."""
    import dataclasses
    from ternary_mamba.core.config import PRESETS, Mamba2Config
    from ternary_mamba.quant.config import TernaryConfig
    from ternary_mamba.spec import GPUS
    from ternary_mamba.train.costmodel import predict_step
    cfg, q = Mamba2Config(**PRESETS["mamba2-130m"]), TernaryConfig(group_size=256, scale_format="bf16")
    h = GPUS["h100"]
    base = predict_step(cfg, q, 2, 512, h)
    assert predict_step(cfg, q, 2, 512, h, checkpointing=True).seconds > base.seconds
    assert predict_step(cfg, q, 2, 512, dataclasses.replace(h, hbm_tbps=2 * h.hbm_tbps)).seconds < base.seconds
    assert predict_step(cfg, q, 8, 512, h).tok_s > base.tok_s
    # today's fused kernels against the ones the measured code had; tensor cores for the scan once more
    from ternary_mamba.train.standins import FUSED_TC
    older = predict_step(cfg, q, 2, 512, h, kernels=("fake_quant", "kd_loss"))
    tc = predict_step(cfg, q, 2, 512, h, kernels=FUSED_TC)
    assert older.seconds > base.seconds > tc.seconds
    assert base.costs.kernels["stream"] < older.costs.kernels["stream"] / 3 and tc.costs.kernels["fp32"] == 0
