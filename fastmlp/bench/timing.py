"""The timing core: per-iteration samplers, interleaved rounds, summary statistics.

A sampler runs `n` iterations of one variant and returns the seconds each took (each iteration
timed on its own: on a loaded machine a preemption then spoils one iteration, not a whole chunk).
Samplers are handed their clock when they are built; nothing here is global.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from typing import Callable

Sampler = Callable[[int], list]
Clock = Callable[[], float]

# "wall": time.perf_counter (the default, what a user waits). "cpu": time.process_time, this process's
# CPU time (all its threads): with --threads 1 it ignores the time the process spends descheduled,
# so it stays usable on a machine shared with other work (with more threads it also counts spinning
# and is no measure of elapsed time).
TIMERS: dict[str, Clock] = {"wall": time.perf_counter, "cpu": time.process_time}


def summarize(rounds: list[list[float]]) -> dict:
    """Statistics of one variant's per-iteration times, pooled over its rounds; samples_s holds each
    round's median (what pytest-benchmark is given)."""
    pooled = sorted(t for r in rounds for t in r)
    q = statistics.quantiles(pooled, n=4) if len(pooled) >= 2 else [pooled[0]] * 3
    return {
        "median_s": statistics.median(pooled),
        "q1_s": q[0],
        "q3_s": q[2],
        "min_s": pooled[0],
        "mean_s": statistics.fmean(pooled),  # includes the stalls the median leaves out
        "rounds": len(rounds),
        "iterations": len(rounds[0]) if rounds else 0,
        "samples_s": [float(f"{statistics.median(r):.6g}") for r in rounds],
    }


@contextlib.contextmanager
def no_gc():
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def calibrate(sampler: Sampler, target_s: float, max_n: int = 100000) -> int:
    """Iterations per chunk so that one chunk of `sampler` takes about target_s."""
    per_iter = min(sampler(1)[0] for _ in range(3))
    if per_iter <= 0:
        return max_n
    return int(max(1, min(max_n, round(target_s / per_iter))))


def interleave(samplers: dict[str, Sampler], n: int, rounds: int, warmup_rounds: int = 2,
               warmup_s: float = 0.0) -> dict[str, list[list[float]]]:
    """Per-iteration seconds of each sampler, one chunk of `n` iterations per variant per round (a list
    per round), the order of variants rotating every round, after untimed warm-up rounds (at least
    `warmup_rounds`, and for at least `warmup_s` seconds: a machine's first ~0.1 s of work after a
    pause runs measurably slower)."""
    names = list(samplers)
    out = {name: [] for name in names}
    with no_gc():
        r = 0
        t_end = time.perf_counter() + warmup_s
        while r < warmup_rounds or time.perf_counter() < t_end:
            for name in names:
                samplers[name](n)
            r += 1
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                out[name].append(samplers[name](n))
    return out
