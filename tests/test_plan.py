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
    assert "fits in 80 GB" in out and "micro-batch 1 x 2048 fits" in out
    assert main(["plan", "--teacher", "mamba2-130m", "--gpu", "a10g", "--activation-checkpointing",
                 "--batch-size", "4", "--seq-len", "1024", "--nproc", "2", "--fsdp"]) == 0
    out = capsys.readouterr().out
    assert "2 x A10G" in out and "FSDP" in out
