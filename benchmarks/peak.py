"""This CPU's int8 (and fp32 FMA) multiply-accumulate peak per instruction family, on 1 thread and all cores.

The micro-kernels are TIR built by TVM (`repq_tvm.deploy.peak`): register tiles of independent
accumulators fed like the project's kernels, nothing else in the loop; their assembly is checked for the
instruction first.  Families the CPU lacks are skipped, naming the missing feature.  The machine is shared:
families are measured in interleaved rounds and the fastest run of each is its peak (other work only ever
slows a run down); the median run is reported too.  `repq-tvm profile` measures the same kernels (fewer
runs) to put each integer kernel's GMAC/s against its family's peak.

    python benchmarks/peak.py                       # all logical CPUs (TVM_NUM_THREADS), 5 rounds
    python benchmarks/peak.py --threads 1 --json    # as one JSON object
    python benchmarks/peak.py --out benchmarks/results/peak.json   # also written to a file (the committed
                                                    # results name their CPU: write yours under another name)
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1)),
                    help="threads of the all-cores run (TVM's pool; default: every logical CPU)")
    ap.add_argument("--families", nargs="*", help="default: vnni avx2_u8s8 avx2_u8s8_d1 avx2_i16 fp32_fma")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the families")
    ap.add_argument("--repeat", type=int, default=20, help="timed runs per family, thread count and round")
    ap.add_argument("--seconds", type=float, default=0.003, help="length of one timed run")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ap.add_argument("--out", help="also write the result to this JSON file (by default nothing is written: the "
                                  "committed results/peak*.json are other CPUs' figures)")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its thread pool

    import numpy as np
    import tvm

    from repq_tvm.deploy import peak

    names = args.families or list(peak.DEFAULT_FAMILIES)
    threads = peak.num_threads()
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for n in names:
            runs[n].append(peak.measure_family(n, threads=threads, seconds=args.seconds, repeat=args.repeat))
    families = {}
    for n, rs in runs.items():
        if "skipped" in rs[0]:
            families[n] = rs[0]
            continue
        f = {"family": n, "instruction": rs[0]["instruction"], "threads": threads}
        for key in ("1t", "all"):
            f[f"gmacs_{key}"] = max(r[f"gmacs_{key}"] for r in rs)
            f[f"gmacs_{key}_median"] = float(np.median([r[f"gmacs_{key}_median"] for r in rs]))
            f[f"gops_{key}"] = 2 * f[f"gmacs_{key}"]
        families[n] = f
    result = {"cpu": peak.cpu_name(), "threads": threads, "tvm": tvm.__version__,
              "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds, "repeat": args.repeat,
              "families": families}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['cpu']}; TVM {tvm.__version__}; all cores = {threads} TVM thread(s)")
    print(f"{'family':<13} {'1 thread GMAC/s (GOPS)':>23} {f'{threads} threads GMAC/s (GOPS)':>24}  instruction")
    for n, f in families.items():
        if "skipped" in f:
            print(f"{n:<13} {'skipped: ' + f['skipped']}")
            continue
        one = f"{f['gmacs_1t']:7.1f} ({f['gops_1t']:6.1f})"
        allc = f"{f['gmacs_all']:7.1f} ({f['gops_all']:6.1f})"
        print(f"{n:<13} {one:>23} {allc:>24}  {f['instruction']}")
    print(f"(best of {args.rounds} x {args.repeat} runs; medians in "
          f"{os.path.relpath(args.out) if args.out else 'the --json output or an --out file'})")


if __name__ == "__main__":
    main()
