"""The machine probes every benchmark prints beside its figures: memory read bandwidth (the roofline's
denominator), how many threads' worth of vector arithmetic the threads deliver, and a pass that reads a decode
mode's own bytes without computing (C kernels, csrc/bandwidth.c)."""
from __future__ import annotations

import time

import torch


def memory_bandwidth_gbs(mb: int = 1024) -> float:
    """Streaming read of a buffer far larger than the L3, best of 7: the C probe (csrc/bandwidth.c: a contiguous
    range per thread as the GEMVs split theirs, read as four streams with wide loads and L2 prefetch, the fastest read
    we know), else torch's sum."""
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


def read_only_timer(model, n: int):
    """A timer like the decode timers (n per call, returns per second) of a pass that reads a decode step's own
    bytes and computes nothing: the engine's buffers in the order a token reads them, split over the threads as its
    kernels split them, the recurrent states written back (csrc/bandwidth.c stream_ranges; the ceiling of the
    access pattern on this machine at this moment, against which a mode's arithmetic shows).  Its `.nbytes`: the
    bytes one pass moves (written ones twice).  None where the model does not decode on the engine."""
    import ctypes
    from ..ops.build import get_kernel
    from ..runtime.decode_engine import engine_for
    eng, lib = engine_for(model), get_kernel()
    if eng is None or lib is None:
        return None
    state = eng.prepare_state(model.empty_state(1), 1)
    ranges = [(t, w, j == 0) for call in eng.byte_ranges(state) for j, (t, w) in enumerate(call)]
    k = len(ranges)
    ptrs = (ctypes.c_void_p * k)(*[t.data_ptr() for t, _, _ in ranges])
    sizes = (ctypes.c_int64 * k)(*[t.numel() * t.element_size() for t, _, _ in ranges])
    flags = (ctypes.c_uint8 * k)(*[int(w) | 2 * int(first) for _, w, first in ranges])   # 1: written, 2: new region

    def run() -> float:
        t = time.perf_counter()
        for _ in range(n):
            lib.stream_ranges(ptrs, sizes, flags, k, 0)
        return n / (time.perf_counter() - t)
    run.nbytes = sum(sizes) + sum(s for s, f in zip(sizes, flags) if f & 1)
    run.state = state            # keep the buffers alive with the timer
    lib.stream_ranges(ptrs, sizes, flags, k, 0)
    return run
