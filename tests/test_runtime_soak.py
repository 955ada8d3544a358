"""A runtime that holds under long use: flat resident memory, identical outputs, artifacts that unload.

The default suite runs a short soak (a few hundred calls); `-m slow` runs 10,000.
"""

import gc
import os
import shutil

import numpy as np
import psutil
import pytest

from repq_tvm.deploy.runtime import Runner


@pytest.fixture(scope="module")
def artifact(vit_host_build):
    return vit_host_build[1]


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def _soak(art: str, calls: int) -> None:
    runner = Runner(art)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(runner.input_shape).astype(np.float32)
    first = runner(x)
    for _ in range(20):  # warm up: allocator pools and caches settle
        runner(x)
    base = _rss()
    sizes = [1, 3, 7, 16, 2]
    batch = rng.standard_normal((max(sizes), *runner.input_shape[1:])).astype(np.float32)
    expected = {n: runner.predict(batch[:n]) for n in sizes}
    for i in range(calls):
        assert np.array_equal(runner(x), first), f"output changed at call {i}"
        if i % 50 == 0:
            n = sizes[(i // 50) % len(sizes)]
            assert np.array_equal(runner.predict(batch[:n]), expected[n]), f"predict({n}) changed at call {i}"
    growth = _rss() - base
    # a leak of even 1 KB per call would show as calls KB; allocator noise stays within a few MB
    assert growth < max(8 << 20, calls * 512), f"resident memory grew by {growth >> 10} KB over {calls} calls"


def test_short_soak_is_flat_and_identical(artifact):
    _soak(artifact, 300)


@pytest.mark.slow
def test_long_soak_is_flat_and_identical(artifact):
    _soak(artifact, 10_000)


def test_reloading_an_artifact_does_not_grow_memory(artifact):
    """Load, run and drop the same artifact 20 times: resident memory stays flat (the module is reused;
    TVM 0.27 alone keeps ~the library's size per `load_module`, see `deploy/runtime.py`)."""
    x = np.zeros(Runner(artifact).input_shape, np.float32)
    first = Runner(artifact)(x)
    base = _rss()
    for _ in range(20):
        runner = Runner(artifact)
        assert np.array_equal(runner(x), first)
        del runner
    growth = _rss() - base
    assert growth < 4 << 20, f"20 reloads grew resident memory by {growth >> 10} KB"


def test_twenty_artifacts_cost_at_most_their_libraries(artifact, tmp_path):
    """20 different artifact folders in one process: each costs at most ~its library (TVM 0.27 does not
    free a loaded library's constants when it is dropped; this bounds what stays resident)."""
    copies = []
    for i in range(20):
        copies.append(str(tmp_path / f"a{i}"))
        shutil.copytree(artifact, copies[-1])
    lib_size = os.path.getsize(os.path.join(artifact, "model.so"))
    x = np.zeros(Runner(artifact).input_shape, np.float32)
    base = _rss()
    runners = [Runner(c) for c in copies]
    outs = [r(x) for r in runners]
    assert all(np.array_equal(o, outs[0]) for o in outs)
    del runners, outs
    growth = _rss() - base
    print(f"20 artifacts ({lib_size >> 10} KB library each): +{growth >> 10} KB resident")
    assert growth <= 20 * 2 * lib_size + (8 << 20), (growth, lib_size)
