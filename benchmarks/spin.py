"""What TVM's idle-worker spinning costs and buys: for each ``TVM_THREAD_POOL_SPIN_COUNT``, an artifact's latency and
the CPU time its process burns in the pause after a run.

Why: TVM's workers spin (``sched_yield``) after every parallel kernel before they sleep, 300,000 times by default;
importing `repq_tvm` sets 30,000 unless the user chose (`repq_tvm/deploy/threads.py`).  The CPU burnt after a run
is taken from whatever the application does between inferences; too few spins and a run's own kernels wait for
sleeping workers.  Each count runs in a fresh process (TVM reads the variable when its pool starts), the counts in
turn, ``--repeats`` times:

    python benchmarks/spin.py ART [--counts 300000,30000,10000,0] [--runs 50] [--pause-ms 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import sys, time, json, numpy as np
from repq_tvm.deploy.runtime import Runner
r = Runner(sys.argv[1]); x = np.random.default_rng(0).standard_normal(r.input_shape).astype(np.float32)
runs, pause = int(sys.argv[2]), float(sys.argv[3]) / 1e3
for _ in range(5): r(x)
lat = []
for _ in range(runs):
    t = time.perf_counter(); r(x); lat.append((time.perf_counter() - t) * 1e3)
burn = []
for _ in range(max(3, runs // 5)):
    r(x); c = time.process_time(); time.sleep(pause); burn.append((time.process_time() - c) * 1e3)
print(json.dumps({"median_ms": float(np.median(lat)), "p90_ms": float(np.percentile(lat, 90)),
                  "cpu_ms_after_run": float(np.median(burn))}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--counts", default="300000,30000,10000,0", help="TVM_THREAD_POOL_SPIN_COUNT values")
    ap.add_argument("--runs", type=int, default=50, help="back-to-back runs timed per process")
    ap.add_argument("--pause-ms", type=float, default=200.0, help="the pause whose CPU time is measured")
    ap.add_argument("--repeats", type=int, default=2, help="processes per count, the counts in turn")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    print(f"{args.artifact}: median / p90 ms of {args.runs} runs back to back; CPU ms the process burns in the "
          f"{args.pause_ms:.0f} ms after a run (median)")
    for repeat in range(args.repeats):
        for count in counts:
            env = {**os.environ, "TVM_THREAD_POOL_SPIN_COUNT": str(count)}
            out = subprocess.run([sys.executable, "-c", CHILD, args.artifact, str(args.runs), str(args.pause_ms)],
                                 env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.exit(f"spin.py: error: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'failed'}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  spin count {count:>7d}: {r['median_ms']:6.2f} / {r['p90_ms']:6.2f} ms, "
                  f"{r['cpu_ms_after_run']:6.1f} CPU ms after a run", flush=True)


if __name__ == "__main__":
    main()
