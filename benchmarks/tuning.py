"""Tuned against untuned, side by side in one run: the same calibrated model compiled with and without a tuning log.

    python benchmarks/tuning.py CALIBRATED.repq --tuning-log tuning_logs/NAME [--target host] [--rounds 30]

Both artifacts are compiled here (same target, batch 1), loaded in this process and timed in alternating
order, round after round (each round: one call of each, shuffled, after a warm-up), so both see the same
moments of a shared machine. Before timing their logits on the same inputs are compared (they must agree:
every tuned kernel was checked against its definition, integer kernels bit for bit). Prints median / p90 ms
and the ratio untuned / tuned; writes benchmarks/results/tuning_<model>.json (with the tuning log's per-kernel
table) and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())
    with open("/proc/cpuinfo") as f:
        flags = f.read()
    feats = [x for x in ("avx512_vnni", "amx_int8") if x in flags]
    return f"{model} ({', '.join(feats) or 'AVX2 only'}, {os.cpu_count()} CPUs)"


def main() -> None:
    from repq_tvm import api
    from repq_tvm.deploy.runtime import Runner
    from repq_tvm.tuning.log import TuningLog

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("calibrated")
    p.add_argument("--tuning-log", required=True)
    p.add_argument("--target", default="host")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()

    log = TuningLog.open(args.tuning_log)
    with tempfile.TemporaryDirectory() as tmp:
        arts = {}
        for name, tuning in (("untuned", None), ("tuned", args.tuning_log)):
            arts[name] = os.path.join(tmp, name)
            t0 = time.time()
            info = api.compile_artifact(args.calibrated, arts[name], target=args.target, tuning_log=tuning)
            print(f"compiled {name} in {time.time() - t0:.0f} s"
                  + (f" ({info['tuning_log']['tuned_kernels']} tuned kernels)" if tuning else ""), flush=True)
        runners = {name: Runner(path) for name, path in arts.items()}
        x = np.random.default_rng(0).standard_normal(runners["untuned"].input_shape).astype(np.float32)
        outs = {name: r(x) for name, r in runners.items()}
        max_diff = float(np.abs(outs["untuned"] - outs["tuned"]).max())
        for _ in range(5):
            for r in runners.values():
                r(x)
        times = {name: [] for name in runners}
        for _ in range(args.rounds):
            order = list(runners)
            random.shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                runners[name](x)
                times[name].append((time.perf_counter() - t0) * 1e3)
                time.sleep(0.01)
    stats = {n: {"median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)), "runs": len(t)}
             for n, t in times.items()}
    ratio = stats["untuned"]["median_ms"] / stats["tuned"]["median_ms"]
    key = log.manifest["key"]
    result = {"model": key["model"], "bits": f"W{key['w_bits']}/A{key['a_bits']}", "target": key["target"],
              "cpu": cpu_name(), "threads": os.environ.get("TVM_NUM_THREADS"), "rounds": args.rounds,
              "logits_max_abs_diff": max_diff, "latency": stats, "speedup_untuned_over_tuned": ratio,
              "tuning": {k: log.manifest[k] for k in ("trials_budget", "trials_this_run", "minutes_this_run",
                                                      "search_minutes_this_run", "trials_per_minute", "accepted")},
              "kernels": log.manifest["kernels"]}
    for name, s in stats.items():
        print(f"{name:8s} median {s['median_ms']:.2f} ms  p90 {s['p90_ms']:.2f} ms")
    print(f"untuned / tuned = {ratio:.3f}  (logits max |diff| {max_diff:g}; {result['cpu']})")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"tuning_{key['model']}_w{key['w_bits']}a{key['a_bits']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, path[:-5] + ".png")
    print(f"wrote {path}")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["kernels"] if "tuned_ms" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 3]})
    names = ["untuned", "tuned"]
    a.bar(names, [result["latency"][n]["median_ms"] for n in names], color=["#999", "#2a7"])
    a.set_ylabel("ms per image (median)")
    a.set_title(f"{result['model']} {result['bits']}: {result['speedup_untuned_over_tuned']:.2f}x")
    y = np.arange(len(rows))
    b.barh(y - 0.2, [r["default_ms"] for r in rows], 0.4, label="default", color="#999")
    b.barh(y + 0.2, [r["tuned_ms"] for r in rows], 0.4, label="best verified tuned", color="#2a7")
    b.set_yticks(y, [f"{r['kernel'][:40]} ({r['verdict'].split(':')[0]})" for r in rows], fontsize=7)
    b.set_xlabel("ms per call, re-timed side by side")
    b.legend()
    b.invert_yaxis()
    fig.suptitle(result["cpu"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
