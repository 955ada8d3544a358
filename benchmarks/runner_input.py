"""What handing an image to an artifact costs, per call: `Runner`'s whole call against the VM's ``main`` on an input
tensor it already holds, and three ways to get the images into a TVM tensor (a new one per call, `copyfrom`, a copy
through a NumPy view of a tensor made once, which `Runner` does).  Each way is timed right after a run of the
model, whose weights have pushed the images out of the caches, as in a serving loop.

Why: the input copy is the one part of a call outside the compiled kernels, and `repq-tvm profile`'s end-to-end
time leaves it out (it reuses one input tensor) while `benchmarks/latency.py` times `Runner` calls.

    python benchmarks/runner_input.py ART [--rounds 60]
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", help="artifact folder (repq-tvm compile -o ...)")
    ap.add_argument("--rounds", type=int, default=60, help="rounds, each timing every way once after a model run")
    args = ap.parse_args()

    import numpy as np
    import tvm

    from repq_tvm.deploy.runtime import Runner
    from repq_tvm.errors import ReqError

    try:
        runner = Runner(args.artifact)
    except ReqError as exc:
        sys.exit(f"runner_input: error: {exc}")
    x = np.random.default_rng(0).standard_normal(runner.input_shape).astype(np.float32)
    held = tvm.runtime.tensor(x)
    view = np.from_dlpack(held)
    ways = {
        "tvm.runtime.tensor(x), a new tensor": lambda: tvm.runtime.tensor(x),
        "tensor.copyfrom(x)": lambda: held.copyfrom(x),
        "np.copyto(view, x) (Runner)": lambda: np.copyto(view, x),
    }
    calls = {
        "Runner call": lambda: runner(x),
        "VM main on the held tensor": lambda: runner._main(held, *runner.weights).numpy(),
    }
    times = {name: [] for name in [*ways, *calls]}
    for fn in calls.values():
        fn()
    for _ in range(args.rounds):
        for name, fn in ways.items():
            runner(x)  # the model's weights through the caches, as before any call
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    print(f"{args.artifact}: input {runner.input_shape} float32, {runner.threads} threads, median of {args.rounds} "
          "rounds, ms")
    for name, v in times.items():
        print(f"  {name:40s} {np.median(v) * 1e3:8.3f}")


if __name__ == "__main__":
    main()
