"""The log√2 attention of one head batch: the fused kernel (`kernels.attention_amx` on AMX CPUs, else
`kernels.attention_vector`), the three kernels it replaces, each alone, and torch fp32.

Why: `repq-tvm profile` shows the attention's share of the model; this shows its kernels alone on their real
shapes, side by side: `qbmm` q @ kᵀ, the fused softmax → weights of `log_weights`, `attn_v` (the variants the
compiler picks for this CPU's `host` preset), the three in a row, the fused kernel the compiler picks for it (AMX
where the CPU has AMX-INT8, else the vector one of the `host` preset's variant), and torch's ``softmax(q kᵀ) V`` in fp32.  Interleaved round by round in
one process (the machine is shared), the same thread count for TVM and torch; the fused output is checked bit
for bit against the three kernels before timing.

    python benchmarks/kernel_attention.py --threads 2
    python benchmarks/kernel_attention.py --threads 2 --shapes 6x197x197x64 48x197x197x64 --bits 8
"""

from __future__ import annotations

import argparse
import os
import sys

from interleaved import interleaved, timed

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
    from repq_tvm.kernels import attention_vector as AV
    from repq_tvm.kernels.attention_consts import attention_consts, log2_scale
    from repq_tvm.kernels.attn_v import attn_v_primfunc, padded_tokens
    from repq_tvm.kernels.log_weights import log2_scale_operand, log_weights_primfunc
    from repq_tvm.kernels.qbmm import qbmm_primfunc
    from repq_tvm.reference import ops

    has_amx = {"amx_tile", "amx_int8"} <= targets.host_flags()
    torch.set_num_threads(args.threads)
    amx = targets.tvm_target("x86_64-amx", args.threads) if has_amx else None
    # the unfused kernels as the compiler builds them for this CPU (on AMX CPUs: the VNNI ones, as before fusion)
    host = targets.tvm_target("x86_64-avx512-vnni" if has_amx else "host", args.threads)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else SHAPES
    rng = np.random.default_rng(0)

    def build(func, target):
        mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        return tvm.compile(mod, target=target).jit()["main"]

    def tensors(*arrays):
        return [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]

    print(f"threads={args.threads} (TVM and torch {torch.__version__}), target={targets.target_label(amx or host)}, "
          f"{args.bits}-bit codes, {args.rounds} interleaved rounds, ms per call (median / min)")

    def kernels(bt, m, n, d):
        """The callables timed for one shape, by column name (the fused one checked against the three first)."""
        f = ops.attn_frac_bits(n, args.bits)
        groups = ops.attn_groups(args.bits, f, True)
        q, k = rng.integers(0, 256, (bt, m, d)).astype(np.uint8), rng.integers(0, 256, (bt, n, d)).astype(np.uint8)
        v = rng.integers(0, 2 ** args.bits, (bt, n, d)).astype(np.uint8)
        qk_zp, v_zp = np.array([128, 131], np.int32), np.array([2 ** (args.bits - 1)], np.int32)
        qk_scale, v_scale = np.array([9e-4], np.float32), np.array([3e-6], np.float32)  # logits of spread ~±10
        s_attn = 0.0073
        spec = A.attention_spec(bt, m, n, d, bits=args.bits, sqrt2=True, f=f, groups=groups, v_bits=args.bits)
        variant = AV.variant_for(host)
        if has_amx:
            fused_fn, fused_name = build(A.attention_amx_func(spec), amx), "fused amx"
        elif variant is not None and AV.fits(m, n, d, variant):
            vspec = AV.attention_spec(bt, m, n, d, bits=args.bits, sqrt2=True, f=f, groups=groups, v_bits=args.bits,
                                      variant=variant)
            fused_fn, fused_name = build(AV.attention_vector_func(vspec), host), f"fused {variant}"
        else:
            fused_fn, fused_name = None, None
        qk_fn = build(qbmm_primfunc(bt, m, n, d, host)[0], host)
        lw_fn = build(log_weights_primfunc((bt, m, n), args.bits, True, f, groups, host, softmax=True)[0], host)
        av_fn = build(attn_v_primfunc(bt, m, n, d, host, groups=groups, f=f, v_bits=args.bits)[0], host)
        qk_args, av_args = tensors(q, k, qk_zp, qk_scale), tensors(v, v_zp, v_scale)
        # the run-time constants: the weights kernel's log2(s), the fused kernel's consts
        log2s, consts = tensors(log2_scale_operand(s_attn), attention_consts(log2_scale(s_attn)))
        logits, w, out3, out = tensors(np.empty((bt, m, n), np.float32),
                                       np.zeros((bt, groups, m, padded_tokens(n)), np.int16),
                                       np.empty((bt, m, d), np.float32), np.empty((bt, m, d), np.float32))

        def three():
            qk_fn(*qk_args, logits)
            lw_fn(logits, log2s, w)
            av_fn(w, *av_args, out3)

        tq, tk, tv = (torch.randn(bt, x, d) for x in (m, n, n))
        three()
        runs = {"q@kT": lambda: qk_fn(*qk_args, logits), "weights": lambda: lw_fn(logits, log2s, w),
                "attn@V": lambda: av_fn(w, *av_args, out3), "3 kernels": three}
        if fused_fn is not None:
            fused_fn(*qk_args, *av_args, consts, out)
            if not np.array_equal(out.numpy(), out3.numpy()):
                sys.exit(f"kernel_attention: error: the fused kernel differs from the three kernels at {bt}x{m}x{n}x{d}")
            runs[fused_name] = lambda: fused_fn(*qk_args, *av_args, consts, out)
        runs["torch fp32"] = lambda: torch.softmax(tq @ tk.transpose(1, 2) * d ** -0.5, dim=-1) @ tv
        return runs

    header_done = False
    for bt, m, n, d in shapes:
        runs = kernels(bt, m, n, d)
        fused = next((x for x in runs if x.startswith("fused")), None)
        number = {name: max(1, int(0.05 / max(timed(fn, 3), 1e-6))) for name, fn in runs.items()}
        times = {name: [t * 1e3 for t in ts] for name, ts in interleaved(runs, args.rounds, number, warmup=False).items()}
        med = {name: float(np.median(t)) for name, t in times.items()}
        if not header_done:
            print(f"{'Bt x M x N x D':>16s}" + "".join(f"{x:>17s}" for x in runs)
                  + ("  3 kernels / fused" if fused else ""))
            header_done = True
        cells = "".join(f"{med[x]:9.3f} /{min(times[x]):6.3f}" for x in runs)
        ratio = f"{med['3 kernels'] / med[fused]:19.2f}" if fused else ""
        print(f"{f'{bt}x{m}x{n}x{d}':>16s}{cells}{ratio}")


if __name__ == "__main__":
    main()
