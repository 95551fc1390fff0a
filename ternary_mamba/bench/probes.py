"""The machine probes every benchmark prints beside its figures: memory read bandwidth (the roofline's
denominator) and how many threads' worth of vector arithmetic the threads deliver (C kernels, csrc/bandwidth.c)."""
from __future__ import annotations

import time

import torch


def memory_bandwidth_gbs(mb: int = 1024) -> float:
    """Streaming read of a buffer far larger than the L3, best of 7: the C probe (csrc/bandwidth.c) that reads the
    way the GEMVs read (contiguous range per thread, four streams, wide loads, L2 prefetch), else torch's sum."""
    from ..ops.build import get_kernel
    x = torch.ones(mb * 2 ** 20 // 4)
    lib = get_kernel()
    read = (lambda: lib.stream_read(x.data_ptr(), x.numel())) if lib is not None else x.sum
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        read()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def thread_scaling(iters: int = 20_000_000) -> float | None:
    """How many single threads' worth of vector arithmetic all threads together deliver (the C compute probe,
    csrc/bandwidth.c vector_probe: register-only FMA chains; best of 3): 2.0 on 2 free cores; on the AMD EPYC VM a
    register-only int8 dot-product loop measured 1.3 at one time and 2.0 at another (the host's load moves).  None
    without the C kernels."""
    from ..ops.build import get_kernel, kernel_threads
    lib = get_kernel()
    if lib is None:
        return None
    n = kernel_threads()

    def best(threads: int) -> float:
        lib.tm_set_threads(threads)
        try:
            times = []
            for _ in range(3):
                t = time.perf_counter()
                lib.vector_probe(iters)
                times.append(time.perf_counter() - t)
            return min(times)
        finally:
            lib.tm_set_threads(n)
    return n * best(1) / best(n)
