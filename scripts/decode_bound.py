"""What bounds the `fast` decode mode on this machine (docs/SPEED.md, "What bounds `fast` at 1.3B"):

  1. per round, back to back: the probe, the read-only pass over the mode's own bytes (bench.probes.read_only_timer:
     the same buffers in the engine's order, nothing computed), the decode, the probe again -> what the decode
     reads of what the bytes alone allow, and whether issue 29's target (>= 80 tok/s and >= 85 % of the probe
     around it) was within reach of the pass, let alone of the decode, at that moment;
  2. back to back: the bandwidth probe, then tokens of the engine with its phase profile -> the share of the
     bandwidth of that moment, per phase and for the whole token;
  3. one thread against all threads, alternated in one process, the probe read at each thread count.

    .venv/bin/python scripts/decode_bound.py [preset, default mamba2-1.3b] [rounds, default 5]

Random weights (a preset), the same modes as `bench decode`'s `tq2+q4head+a8+s16`."""
import sys

import torch

from ternary_mamba.bench.probes import memory_bandwidth_gbs, read_only_timer
from ternary_mamba.bench.roofline import bytes_per_token
from ternary_mamba.bench.runtime import _decode_timer, decode_profile, load_bench_model, pack_in_place
from ternary_mamba.ops.build import kernel_threads, set_threads
from ternary_mamba.ops.device import cpu_description
from ternary_mamba.runtime.decode_engine import use_bf16_state
from ternary_mamba.runtime.heads import use_fp16_head, use_q4_head
from ternary_mamba.runtime.packed_linear import use_a8_activations

name = sys.argv[1] if len(sys.argv) > 1 else "mamba2-1.3b"
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
threads = max(1, kernel_threads())
print(f"machine: {cpu_description()}; threads {threads}")
m = load_bench_model(name)
pack_in_place(m)
use_fp16_head(m)
use_q4_head(m)
use_a8_activations(m)
use_bf16_state(m)
gb = bytes_per_token(m) / 1e9
TARGET_TOKS, TARGET_SHARE = 80.0, 0.85
with torch.no_grad():
    decode, passes = _decode_timer(m, 30), read_only_timer(m, 30)
    for _ in range(rounds):
        p0 = memory_bandwidth_gbs(256)
        ro, tok = passes(), decode()
        bw = max(p0, memory_bandwidth_gbs(256))
        ro_gbs, tok_gbs = ro * passes.nbytes / 1e9, tok * gb
        print(f"probe {bw:5.1f} GB/s | read-only pass {ro_gbs:5.1f} GB/s ({100 * ro_gbs / bw:3.0f} %) | decode {tok:5.1f} "
              f"tok/s, {tok_gbs:5.1f} GB/s ({100 * tok_gbs / bw:3.0f} % of the probe, {100 * tok / ro:3.0f} % of the pass) | "
              f"target needs {max(TARGET_TOKS * gb, TARGET_SHARE * bw):5.1f} GB/s: "
              + ("met" if tok >= TARGET_TOKS and tok_gbs >= TARGET_SHARE * bw else
                 "out of reach even of the pass" if ro_gbs < max(TARGET_TOKS * gb, TARGET_SHARE * bw) else "missed"),
              flush=True)
    for _ in range(rounds):
        bw = memory_bandwidth_gbs(256)
        prof = decode_profile(m, 30)
        ms = sum(prof.values())
        print(f"probe {bw:5.1f} GB/s | token {ms:6.2f} ms: {gb / ms * 1e3:5.1f} GB/s = {100 * gb / ms * 1e3 / bw:3.0f} % "
              f"of it | " + ", ".join(f"{k} {v:.2f} ms" for k, v in prof.items()), flush=True)
    timer = _decode_timer(m, 30)
    for r in range(rounds):
        got = {}
        for n in ((1, threads) if r % 2 == 0 else (threads, 1)):
            set_threads(n)
            got[n] = (memory_bandwidth_gbs(256), timer())
        set_threads(threads)
        (p1, v1), (pn, vn) = got[1], got[threads]
        print(f"1 thread {v1:6.1f} tok/s ({v1 * gb:5.1f} GB/s, probe {p1:5.1f}) | {threads} threads {vn:6.1f} tok/s "
              f"({vn * gb:5.1f} GB/s, probe {pn:5.1f}) | {vn / v1:.2f}x", flush=True)
