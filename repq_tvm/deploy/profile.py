"""Latency of an artifact: whole-model statistics over warm runs and a per-kernel breakdown.

TVM 0.27's Relax VM has no built-in profiler, so the breakdown uses the VM's instrument hook: every
call instruction is timed (before/after) and summed per kernel symbol. The hook adds a few
microseconds per call, so whole-model figures come from separate, uninstrumented runs.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

from .runtime import Runner

# VM bookkeeping calls that are not kernels
_BUILTIN_PREFIXES = ("vm.builtin.", "relax.")


def latency(runner: Runner, repeat: int = 50, warmup: int = 5) -> dict:
    x = np.random.default_rng(0).standard_normal(runner.input_shape).astype(np.float32)
    for _ in range(warmup):
        runner(x)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        runner(x)
        times.append((time.perf_counter() - t0) * 1e3)
    t = np.array(times)
    return {"median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)), "min_ms": float(t.min()),
            "runs": repeat, "batch": runner.input_shape[0]}


def kernel_breakdown(runner: Runner, repeat: int = 10) -> list[dict]:
    """Mean time per run of every kernel symbol, slowest first."""
    x = np.random.default_rng(0).standard_normal(runner.input_shape).astype(np.float32)
    totals, counts, started = defaultdict(float), defaultdict(int), {}

    def instrument(func, symbol, before, ret, *args):
        if symbol.startswith(_BUILTIN_PREFIXES):
            return 0
        now = time.perf_counter()
        if before:
            started[symbol] = now
        else:
            totals[symbol] += now - started.pop(symbol, now)
            counts[symbol] += 1
        return 0

    runner(x)
    runner.vm.set_instrument(instrument)
    try:
        for _ in range(repeat):
            runner(x)
    finally:
        runner.vm.set_instrument(None)
    rows = [{"kernel": k, "ms_per_run": totals[k] * 1e3 / repeat, "calls_per_run": counts[k] // repeat}
            for k in totals]
    return sorted(rows, key=lambda r: -r["ms_per_run"])


def plot_breakdown(rows: list[dict], path: str, title: str, top: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows[:top][::-1]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.2))
    ax.barh([r["kernel"][:60] for r in rows], [r["ms_per_run"] for r in rows])
    ax.set_xlabel("ms per inference")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
