"""The AMX linears of DeiT-Small as the compiler emits them: each with its fused tail (q/k/v codes, residual add,
GELU → codes), standalone, per call.

Why: `repq-tvm profile` gives the kernels' share of the model; this times one kernel alone on its real shape and
tail, for a change to the kernel (blocking, pipelining, epilogue).  A/B between two commits: run it in each
(``PYTHONPATH=<worktree of the base commit> python benchmarks/kernel_amx_tails.py``), interleaved by hand, or
compare whole artifacts with `benchmarks/compare_artifacts.py`.  Timed with TVM's time evaluator, rounds of
``--number`` calls; median over ``--rounds``.

    python benchmarks/kernel_amx_tails.py --threads 2
    python benchmarks/kernel_amx_tails.py --threads 2 --batch 8 --tails gelu,res
"""

from __future__ import annotations

import argparse
import os
import sys

TOKENS, DIM, HEADS = 197, 384, 6  # DeiT-Small at 224 px
# tail -> (N, K) of the linear that carries it
TAILS = {"qkv": (3 * DIM, DIM), "proj_res": (DIM, DIM), "gelu": (4 * DIM, DIM), "fc2_res": (DIM, 4 * DIM)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TVM_NUM_THREADS", "1")))
    ap.add_argument("--batch", type=int, default=1, help="images (M = batch x 197 tokens)")
    ap.add_argument("--tails", default=",".join(TAILS), help=f"comma-separated, of {', '.join(TAILS)}")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--number", type=int, default=50, help="calls per round")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its thread pool

    import numpy as np
    import tvm

    from repq_tvm import targets
    from repq_tvm.kernels import qdense_amx
    from repq_tvm.kernels.epilogue import quantizer_args

    if not {"amx_tile", "amx_int8"} <= targets.host_flags():
        sys.exit("kernel_amx_tails: error: this CPU lacks amx_int8")
    unknown = set(args.tails.split(",")) - set(TAILS)
    if unknown:
        sys.exit(f"kernel_amx_tails: error: unknown tails {sorted(unknown)}: use {', '.join(TAILS)}")
    target = targets.tvm_target("x86_64-amx", args.threads)
    rng = np.random.default_rng(0)
    M = args.batch * TOKENS
    print(f"threads={args.threads}, target={targets.target_label(target)}, M={M}, microseconds per call "
          f"(median of {args.rounds} rounds of {args.number})")
    for tail in args.tails.split(","):
        N, K = TAILS[tail]
        kw = {"qkv": {"qkv_codes": {"tokens": TOKENS, "heads": HEADS, "tops": [255] * 3}},
              "gelu": {"gelu_codes": 255}}.get(tail, {"residual": True} if "res" in tail else {})
        exe = tvm.compile(tvm.IRModule({"main": qdense_amx.qdense_amx_func(M, N, K, **kw)}), target=target)
        arrays = [rng.integers(0, 256, (M, K)).astype(np.uint8),
                  rng.integers(-128, 128, (N // 16, K // 4, 16, 4)).astype(np.int8),
                  rng.integers(-100, 100, N).astype(np.int32), rng.integers(-1000, 1000, N).astype(np.int32),
                  np.full(N, 1e-5, np.float32), rng.standard_normal(N).astype(np.float32)]
        if tail == "qkv":  # the three quantizers, then q, k, v
            arrays += [np.stack([quantizer_args(0.05, 120)] * 3)]
            arrays += [np.zeros((args.batch, HEADS, TOKENS, DIM // HEADS), np.uint8)] * 3
        else:
            arrays += [rng.standard_normal((M, N)).astype(np.float32)] if "res" in tail else []
            arrays += [quantizer_args(0.02, 10)] if tail == "gelu" else []
            arrays.append(np.zeros((M, N), np.uint8 if tail == "gelu" else np.float32))
        timer = exe.mod.time_evaluator("main", tvm.cpu(), number=args.number, repeat=args.rounds)
        times = timer(*[tvm.runtime.tensor(a) for a in arrays]).results
        print(f"{tail:>10s} {M}x{N}x{K}: {np.median(times) * 1e6:8.1f} us (min {np.min(times) * 1e6:.1f})")


if __name__ == "__main__":
    main()
