"""Interleaved measuring rounds and the bandwidth around each one (the benchmarks' timing loop).

On a shared VM the memory bandwidth moves within minutes (the AMD EPYC kind's probe read 28-68 GB/s in one half
hour), so a variant's best round and the probe's best round need not fall in the same moment, and their ratio (the
roofline share every benchmark prints) mixes the machine's moods with the kernel's efficiency.  So the probe is
also read right before and right after each timing of the variants that have a roofline, and each such timing is
set against the larger of the two readings around it: the share of the bandwidth the machine gave at that moment."""
from __future__ import annotations

import statistics
from typing import Callable


def interleaved_rounds(timers: dict[str, Callable[[], float]], rounds: int, probe: Callable[[], float],
                       paired: set[str]) -> tuple[dict[str, float], dict[str, list[tuple[float, float]]], float]:
    """Run every timer once per round, in order, `rounds` times; read the probe at the start of each round, after
    each timer in `paired`, and before one where another timer ran since the last reading.  Returns (best rate per
    timer, per paired timer every round's (rate, the larger probe reading just before and just after it), the best
    probe reading)."""
    best = {k: 0.0 for k in timers}
    around: dict[str, list[tuple[float, float]]] = {k: [] for k in timers if k in paired}
    top = 0.0
    for _ in range(rounds):
        last: float | None = probe()
        top = max(top, last)
        for k, run in timers.items():
            if k in around and last is None:           # an unpaired timer ran since the last reading
                last = probe()
                top = max(top, last)
            rate = run()
            best[k] = max(best[k], rate)
            if k not in around:
                last = None
                continue
            after = probe()
            top = max(top, after)
            around[k].append((rate, max(last, after)))
            last = after
    return best, around, top


def paired_share(samples: list[tuple[float, float]], bytes_per_item: float) -> float | None:
    """Median over rounds of rate x bytes / the bandwidth read around that round (GB/s), in percent; None without
    samples.  Above 100 % the machine sped up within the round (both readings around it were lower)."""
    shares = [100 * rate * bytes_per_item / 1e9 / bw for rate, bw in samples if bw > 0]
    return statistics.median(shares) if shares else None


def share_text(share: float, near: float | None) -> str:
    """A decode line's roofline shares: of the run's best probe, and the median around each round (`paired_share`,
    None: not measured).  Never a share above 100 %: a rate above its probe says the probe was no limit there."""
    text = (f"{share:3.0f} % of it" if share <= 100 else
            "at the measured bandwidth (the probe read less: a limit, not >100 %)")
    if near is not None:
        text += (f"; {near:3.0f} % of the bandwidth probed around each round (median)" if near <= 100 else
                 "; above the bandwidth probed around its rounds (median: not a limit there; part of the token "
                 "stayed in the cache, or the machine sped up mid-round)")
    return text


def round_ratio(samples: list[tuple[float, float]], ref: list[tuple[float, float]]) -> float | None:
    """Median over rounds of a paired timer's rate / another paired timer's rate in the same round, in percent (None
    without rounds): e.g. a decode mode against the read-only pass over its own bytes timed right after it."""
    r = [100 * a / b for (a, _), (b, _) in zip(samples, ref) if b > 0]
    return statistics.median(r) if r else None
