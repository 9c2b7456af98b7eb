"""Interleaved timing for the benchmarks: CPU-time and wall-clock medians of named variants.

On a shared machine the wall clock of a step depends on what other processes do; the CPU time
of this process (``time.process_time``, all its threads) much less. With one torch thread
(the benchmarks' default) CPU time is the time the step itself computed. Both are recorded;
ratios are taken of medians and the CPU-time ratio decides a target.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

CLOCKS = ("cpu", "wall")


def clock() -> dict[str, float]:
    """Both clocks now: CPU seconds of this process and the wall clock."""
    return {"cpu": time.process_time(), "wall": time.perf_counter()}


def since(t0: dict[str, float]) -> dict[str, float]:
    """Seconds on each clock since ``t0`` (a ``clock()``)."""
    now = clock()
    return {k: now[k] - t0[k] for k in CLOCKS}


def timed(fn: Callable[[], object]) -> dict[str, float]:
    """CPU seconds of this process and wall seconds of one call of ``fn``."""
    t0 = clock()
    fn()
    return since(t0)


def interleaved(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, dict[str, list[float]]]:
    """Run every variant ``warmup`` times, then ``repeats`` rounds of all variants, rotating their order.

    Returns ``{clock: {variant: [seconds per repeat]}}``. Rotation keeps drift of a shared machine
    and the position in a round from favouring one variant.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times = {clock: {name: [] for name in names} for clock in CLOCKS}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t = timed(variants[name])
            for clock in CLOCKS:
                times[clock][name].append(t[clock])
    return times


def medians(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {clock: {name: statistics.median(v) for name, v in per.items()} for clock, per in times.items()}


def print_table(times: dict[str, dict[str, list[float]]], unit: str = "s") -> None:
    """Median, min and max per variant and clock."""
    print(f"  {'variant':<12}{'clock':<6}{'median':>10}{'min':>10}{'max':>10}  ({unit})")
    for name in times["cpu"]:
        for clock in CLOCKS:
            v = times[clock][name]
            print(f"  {name:<12}{clock:<6}{statistics.median(v):>10.3f}{min(v):>10.3f}{max(v):>10.3f}")
