"""Interleaved timing for the kernel benchmarks (`kernel_*.py`): every callable once per round, round after round.

Why: the machines here are shared, and their speed drifts by tens of percent within minutes; timing one kernel
after the other would hand one of them the quiet moments.  Interleaved, every kernel samples the same moments.
Importing it sets ``OMP_WAIT_POLICY=PASSIVE`` unless set (see below).
"""

from __future__ import annotations

import os
import time

# Before torch is imported (the kernel benchmarks import this module first): torch's OpenMP threads spin after each
# of its parallel regions (libgomp's default wait policy) and took both cores from the TVM kernel timed right after
# torch (`kernel_dense.py`, 2 threads, Zen 3: 3.97 against 0.42 ms for one u8 x s8 kernel), so the first column of
# every round was slow.  Passive, they sleep at once; torch's own times then include waking them.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def timed(fn, number: int) -> float:
    """Seconds per call of ``fn``, over ``number`` calls."""
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def interleaved(runs: dict, rounds: int, number, warmup: bool = True, settle: bool = False) -> dict:
    """``{name: [seconds per call, one per round]}`` for the callables ``runs`` ({name: fn}; a None fn is not
    run and gets no times), each round calling every one ``number`` times (an int, or {name: int}).  ``warmup``:
    one untimed measurement of each first (thread pools start, caches fill); ``settle``: one untimed call before
    every measurement too (the kernel right after another one's work)."""
    numbers = number if isinstance(number, dict) else dict.fromkeys(runs, number)
    live = {name: fn for name, fn in runs.items() if fn is not None}
    if warmup:
        for name, fn in live.items():
            if settle:
                fn()
            timed(fn, numbers[name])
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in live.items():
            if settle:
                fn()
            times[name].append(timed(fn, numbers[name]))
    return times
