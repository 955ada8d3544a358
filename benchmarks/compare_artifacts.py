"""Latency of compiled artifacts side by side: interleaved rounds in one process, median and min ms per call.

Why: a compiler change is judged against the artifact it replaces, on the same machine at the same moment
(the machines here are shared; timing one artifact after the other hands one of them the quiet minutes).
Build the baseline at the commit before the change (`git worktree add`, then `repq-tvm compile`) and the new
one at the change, from the same calibrated file:

    python benchmarks/compare_artifacts.py runs/base runs/new [--rounds 40 --calls 5]

Every artifact must take the same input shape (the same model and batch); the logits of the first are
compared with the others' and the largest difference printed, so a speed-up that changed the results shows.
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+", help="artifact folders (repq-tvm compile -o ...)")
    ap.add_argument("--rounds", type=int, default=40, help="interleaved rounds")
    ap.add_argument("--calls", type=int, default=5, help="calls per artifact per round (their mean is one sample)")
    args = ap.parse_args()

    import numpy as np

    from repq_tvm.deploy.runtime import Runner
    from repq_tvm.errors import ReqError

    try:
        runners = [Runner(path) for path in args.artifacts]
    except ReqError as exc:
        sys.exit(f"compare_artifacts: error: {exc}")
    shapes = {tuple(r.input_shape) for r in runners}
    if len(shapes) != 1:
        sys.exit(f"compare_artifacts: error: the artifacts take different inputs {sorted(shapes)}")
    x = np.random.default_rng(0).standard_normal(runners[0].input_shape).astype(np.float32)
    logits = [r(x) for r in runners]
    for r in runners:  # warm-up
        for _ in range(3):
            r(x)
    times = [[] for _ in runners]
    for _ in range(args.rounds):
        for i, r in enumerate(runners):
            t0 = time.perf_counter()
            for _ in range(args.calls):
                r(x)
            times[i].append((time.perf_counter() - t0) / args.calls * 1e3)
    base = float(np.median(times[0]))
    for path, t, out in zip(args.artifacts, times, logits):
        diff = float(np.abs(out - logits[0]).max())
        print(f"{path:40s} median {np.median(t):8.2f} ms  min {np.min(t):8.2f}  {np.median(t) / base:5.2f}x  "
              f"max |Δlogit| vs the first {diff:.3g}")


if __name__ == "__main__":
    main()
