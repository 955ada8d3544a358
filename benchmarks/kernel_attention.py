"""The fused AMX attention kernel (`kernels.attention_amx`) vs the three kernels it replaces and torch fp32.

Why: the whole log√2 attention of a head is one kernel on AMX CPUs; `repq-tvm profile` shows its share of the
model, this shows the kernel alone on its real shapes, side by side with what it replaces: `qbmm` q @ kᵀ, the
fused softmax → weights of `log_weights`, `attn_v` (the host's variants, as the compiler picks them), and torch's
``softmax(q kᵀ) V`` in fp32.  Interleaved round by round in one process (the machine is shared), the same thread
count for TVM and torch; the fused output is checked bit for bit against the three kernels before timing.

    python benchmarks/kernel_attention.py --threads 2
    python benchmarks/kernel_attention.py --threads 2 --shapes 6x197x197x64 48x197x197x64 --bits 8

Needs a CPU with AMX-INT8 (the fused kernel runs only there; its emulation is tested on every CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

SHAPES = [(6, 197, 197, 64)]  # DeiT-Small's heads at batch 1 (Bt = batch·heads, M = N = tokens, D = head dim)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TVM_NUM_THREADS", "1")))
    ap.add_argument("--bits", type=int, default=8, help="bits of the log codes and of V (default 8)")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds; median and min are reported")
    ap.add_argument("--shapes", nargs="*", help="BtxMxNxD, default: DeiT-S batch 1")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its thread pool

    import numpy as np
    import torch
    import tvm

    from repq_tvm import targets
    from repq_tvm.kernels import attention_amx as A
    from repq_tvm.kernels.attn_v import attn_v_primfunc, padded_tokens
    from repq_tvm.kernels.log_weights import log_weights_primfunc
    from repq_tvm.kernels.qbmm import qbmm_primfunc
    from repq_tvm.reference import ops

    if not {"amx_tile", "amx_int8"} <= targets.host_flags():
        sys.exit("kernel_attention: error: this CPU lacks amx_int8 (the fused attention kernel runs only there)")
    torch.set_num_threads(args.threads)
    amx, host = targets.tvm_target("x86_64-amx", args.threads), targets.tvm_target("x86_64-avx512-vnni", args.threads)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else SHAPES
    rng = np.random.default_rng(0)

    def build(func, target):
        mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        return tvm.compile(mod, target=target).jit()["main"]

    def tensors(*arrays):
        return [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]

    def timed(fn, number):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - t0) / number

    print(f"threads={args.threads} (TVM and torch {torch.__version__}), target={targets.target_label(amx)}, {args.bits}-bit codes, "
          f"{args.rounds} interleaved rounds, ms per call (median / min)")
    print(f"{'Bt x M x N x D':>16s}{'fused amx':>18s}{'3 kernels':>18s}{'torch fp32':>18s}{'3k/fused':>10s}"
          f"{'torch/fused':>12s}")
    def kernels(bt, m, n, d):
        """The three callables timed for one shape (fused, the three kernels, torch), the fused one checked."""
        f = ops.attn_frac_bits(n, args.bits)
        groups = ops.attn_groups(args.bits, f, True)
        q, k = rng.integers(0, 256, (bt, m, d)).astype(np.uint8), rng.integers(0, 256, (bt, n, d)).astype(np.uint8)
        v = rng.integers(0, 2 ** args.bits, (bt, n, d)).astype(np.uint8)
        qk_zp, v_zp = np.array([128, 131], np.int32), np.array([2 ** (args.bits - 1)], np.int32)
        qk_scale, v_scale = np.array([9e-4], np.float32), np.array([3e-6], np.float32)  # logits of spread ~±10
        s_attn = 0.0073
        spec = A.attention_spec(bt, m, n, d, scale=s_attn, bits=args.bits, sqrt2=True, f=f, groups=groups,
                                v_bits=args.bits)
        fused_fn = build(A.attention_amx_func(spec), amx)
        qk_fn = build(qbmm_primfunc(bt, m, n, d, host)[0], host)
        lw_fn = build(log_weights_primfunc((bt, m, n), s_attn, args.bits, True, f, groups, host, softmax=True)[0], host)
        av_fn = build(attn_v_primfunc(bt, m, n, d, host, parities=2, groups=groups, f=f, v_bits=args.bits)[0], host)
        qk_args, av_args = tensors(q, k, qk_zp, qk_scale), tensors(v, v_zp, v_scale)
        logits, w, out3, out = tensors(np.empty((bt, m, n), np.float32),
                                       np.zeros((bt, ops.attn_planes(2, groups), m, padded_tokens(n)), np.int16),
                                       np.empty((bt, m, d), np.float32), np.empty((bt, m, d), np.float32))

        def fused():
            fused_fn(*qk_args, *av_args, out)

        def three():
            qk_fn(*qk_args, logits)
            lw_fn(logits, w)
            av_fn(w, *av_args, out3)

        tq, tk, tv = (torch.randn(bt, x, d) for x in (m, n, n))
        fused(), three()
        if not np.array_equal(out.numpy(), out3.numpy()):
            sys.exit(f"kernel_attention: error: the fused kernel differs from the three kernels at {bt}x{m}x{n}x{d}")
        return {"fused": fused, "three": three,
                "torch": lambda: torch.softmax(tq @ tk.transpose(1, 2) * d ** -0.5, dim=-1) @ tv}

    for bt, m, n, d in shapes:
        runs = kernels(bt, m, n, d)
        number = {name: max(1, int(0.05 / max(timed(fn, 3), 1e-6))) for name, fn in runs.items()}
        times = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                times[name].append(timed(fn, number[name]) * 1e3)
        med = {name: float(np.median(t)) for name, t in times.items()}
        cells = "".join(f"{med[x]:9.3f} /{min(times[x]):6.3f}" for x in runs)
        print(f"{f'{bt}x{m}x{n}x{d}':>16s}{cells}{med['three'] / med['fused']:10.2f}{med['torch'] / med['fused']:12.2f}")

if __name__ == "__main__":
    main()
