"""How many threads to use when the user does not say (`--threads`).

Every parallel region of a decode step ends in a barrier: when one of its threads shares a core with another
busy process, the scheduler parks that thread for a time slice (~3 ms) and the whole step waits.  With ~100
regions per token that turned 400 tok/s into 4.5 on a 2-core machine with one core busy.  So the default is
the number of *idle physical cores* at start-up (sampled from /proc/stat), and one thread when the work per
region is too small to repay the fork and barrier (small models).  `--threads N` always wins."""
from __future__ import annotations

import os
import time
from pathlib import Path

# Below this, one decode step's regions are too short to share: packed decode in the C engine (AVX-512 EPYC, idle,
# 2 cores) ran 1.5 M parameters at 9.0k tok/s on 1 thread vs 7.0k on 2, 5.6 M at 2.8k vs 2.5k, but 17.5 M at
# 1.0k vs 1.9k.
SMALL_MODEL_PARAMS = 10_000_000


def available_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int] | None = None) -> int:
    """Distinct (package, core) pairs among the CPUs this process may run on (SMT siblings count once)."""
    cpus = available_cpus() if cpus is None else cpus
    seen = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            seen.add((topo.joinpath("physical_package_id").read_text().strip(), topo.joinpath("core_id").read_text().strip()))
        except OSError:
            seen.add(("?", str(c)))
    return max(1, len(seen))


def _cpu_times() -> tuple[int, int] | None:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    vals = [int(v) for v in fields[:8]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)   # idle + iowait
    return idle, sum(vals)


def busy_cpus(sample_s: float = 0.1) -> float | None:
    """CPUs' worth of work other processes are doing right now (None where /proc/stat is unreadable)."""
    a = _cpu_times()
    if a is None:
        return None
    time.sleep(sample_s)
    b = _cpu_times()
    if b is None or b[1] <= a[1]:
        return None
    n = os.cpu_count() or 1
    return n * (1 - (b[0] - a[0]) / (b[1] - a[1]))


def default_threads(n_params: int | None = None, sample_s: float = 0.1) -> tuple[int, str]:
    """(threads, why): idle physical cores (shared among the processes torchrun started on this machine),
    1 for a small model's decoding."""
    cores = physical_cores()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local > 1:
        n = max(1, cores // local)
        return n, f"{n} threads: {cores} physical cores shared by {local} local ranks"
    if n_params is not None and n_params < SMALL_MODEL_PARAMS:
        return 1, f"1 thread: a small model ({n_params / 1e6:.1f} M parameters), where threads cost more than they save"
    busy = busy_cpus(sample_s)
    if busy is None:
        return cores, f"{cores} threads (physical cores)"
    per_core = max(1, len(available_cpus()) // cores)        # SMT: logical CPUs per core
    free = max(1, min(cores, int(cores - busy / per_core + 0.5)))
    if free < cores:
        return free, f"{free} of {cores} threads: ~{busy:.1f} CPUs are busy with other work (--threads overrides)"
    return cores, f"{cores} threads (physical cores, idle)"
