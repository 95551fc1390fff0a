"""Default thread counts (ops/threads.py): idle physical cores, fewer when other work is running, one for a
small model, shared among local ranks; and `--threads` reaching the C kernels."""
import pytest

from ternary_mamba.ops import threads


def _fake_times(monkeypatch, busy_fraction: float, ncpu: int = 2, cores: int = 2):
    seq = iter([(0, 0), (int(1000 * (1 - busy_fraction)), 1000)])
    monkeypatch.setattr(threads, "_cpu_times", lambda: next(seq))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: ncpu)
    monkeypatch.setattr(threads, "available_cpus", lambda: list(range(ncpu)))
    monkeypatch.setattr(threads, "physical_cores", lambda cpus=None: cores)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


@pytest.mark.parametrize("busy,expect", [(0.0, 2), (0.45, 1), (0.2, 2), (1.0, 1)])
def test_idle_cores_decide(monkeypatch, busy, expect):
    _fake_times(monkeypatch, busy)
    n, why = threads.default_threads(sample_s=0)
    assert n == expect, why
    assert ("busy" in why) == (expect < 2)


def test_smt_siblings_count_once(monkeypatch):
    _fake_times(monkeypatch, 0.25, ncpu=8, cores=4)       # 2 of 8 logical CPUs busy = 1 of 4 cores
    assert threads.default_threads(sample_s=0)[0] == 3


def test_small_models_and_local_ranks(monkeypatch):
    _fake_times(monkeypatch, 0.0)
    assert threads.default_threads(n_params=5_000_000, sample_s=0)[0] == 1
    assert threads.default_threads(n_params=200_000_000, sample_s=0)[0] == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.default_threads(sample_s=0)[0] == 1


def test_real_machine_answers():
    n, why = threads.default_threads(sample_s=0.02)
    assert 1 <= n <= threads.physical_cores() and why
