"""`benchmarks/latency.py`'s timing loop: which call of an engine is timed (first after the pause, or warm)."""

import importlib.util
import os
import time

import pytest

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "latency.py")
_spec = importlib.util.spec_from_file_location("bench_latency", _PATH)
latency = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(latency)


class _Engine:
    """Counts its calls; slow (30 ms) unless the call before it, of any engine, was its own."""

    last = None

    def __init__(self, name):
        self.name, self.calls = name, 0

    def __call__(self):
        self.calls += 1
        if _Engine.last is not self:
            time.sleep(0.03)
        _Engine.last = self


@pytest.mark.parametrize("warm_calls", [0, 2])
def test_measure_times_the_call_after_the_warm_calls(warm_calls):
    _Engine.last = None
    engines = {name: _Engine(name) for name in ("a", "b", "c")}
    res = latency.measure(engines, rounds=4, warmup=1, pause_s=0.0, seed=0, log=lambda *_: None,
                          warm_calls=warm_calls)
    for name, engine in engines.items():
        assert engine.calls == 1 + 4 * (1 + warm_calls)
        times = res["engines"][name]["times_ms"]
        assert len(times) == 4
        if warm_calls:  # every timed call came right after the engine's own: none slept
            assert max(times) < 25, times
    if not warm_calls:  # three engines, each round in a shuffled order: most timed calls follow another engine
        assert sum(t >= 25 for e in res["engines"].values() for t in e["times_ms"]) >= 8


def test_timing_mode_says_which_call_was_timed():
    assert latency.timing_mode({"pause_ms": 200.0}) == "first call after a 200 ms pause"
    assert latency.timing_mode({"pause_ms": 200.0, "warm_calls": 3}) == "each call after 3 warm calls"
