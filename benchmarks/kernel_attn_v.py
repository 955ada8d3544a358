"""TVM log√2 attention ``attn @ V`` (int16 power-of-two weights, `kernels.attn_v`) vs torch fp32 ``matmul``.

Why: the integer kernel replaces the float matmul of attention's second product; it only pays off if it is not
much slower.  Shapes (Bt = batch·heads, M = N = tokens, D = head dim): DeiT-S at 224 px and the ViT fixture.
Timed in one process, interleaved round by round (the machine is shared), same thread count for TVM and
torch; each TVM result is checked bit for bit against `reference.ops.attn_v_acc` first.

    TVM_NUM_THREADS=1 python benchmarks/kernel_attn_v.py
    python benchmarks/kernel_attn_v.py --threads 2 --shapes 6x197x197x64
    python benchmarks/kernel_attn_v.py --threads 2 --bits 8 --variants amx,vnni_i16   # side by side (AMX CPU)
"""

from __future__ import annotations

import argparse
import os

from interleaved import interleaved

SHAPES = [(6, 197, 197, 64), (4, 65, 65, 32)]  # DeiT-Small heads (batch 1), ViT fixture heads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TVM_NUM_THREADS", 1)))
    ap.add_argument("--bits", type=int, default=4, help="bits of the log codes (default 4)")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds; median and min are reported")
    ap.add_argument("--shapes", nargs="*", help="BtxMxNxD, default: DeiT-S and the ViT fixture")
    ap.add_argument("--variants", default="", help="kernel variants, comma-separated (default: the host's)")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its thread pool

    import numpy as np
    import torch

    from repq_tvm import targets
    from repq_tvm.reference import ops
    from repq_tvm.testing.attn_v import AttnV

    torch.set_num_threads(args.threads)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else SHAPES
    target = targets.tvm_target("host", args.threads)  # what `compile` uses
    rng = np.random.default_rng(0)

    print(f"threads={args.threads} (TVM and torch {torch.__version__}), target={targets.target_label(target)}, {args.bits}-bit codes, "
          f"{args.rounds} interleaved rounds, ms per call (median / min)")
    variants = [v or None for v in args.variants.split(",")]
    print(f"{'Bt x M x N x D':>18s}{'variant':>10s}{'int log√2':>18s}{'int log2':>18s}{'torch fp32':>18s}"
          f"{'log√2/torch':>13s}{'log2/torch':>12s}")
    for (bt, m, n, d), variant in ((s, v) for s in shapes for v in variants):
        f = ops.attn_frac_bits(n, args.bits)
        runs = []
        for sqrt2 in (True, False):
            groups = ops.attn_groups(args.bits, f, sqrt2)
            kern = AttnV(bt, m, n, d, target, groups=groups, f=f, v_bits=args.bits, epilogue=False,
                         variant=variant)
            # codes of a softmax of random logits: realistic spread of shifts and dead entries
            logits = rng.standard_normal((bt, m, n)).astype(np.float32) * 3
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            codes, dead = ops.log_sqrt2_codes(p, p.max(), args.bits)
            if not sqrt2:
                codes //= 2
            v = rng.integers(0, 2 ** args.bits, (bt, n, d)).astype(np.uint8)
            z_v = 2 ** (args.bits - 1)
            w = ops.attn_weights(codes, dead, f, sqrt2, groups)
            call = kern.args(w, v, z_v)
            fn = kern.function()
            fn(*call)
            ref = ops.attn_v_acc(w, v, z_v, f, args.bits)
            assert np.array_equal(call[-1].numpy(), ref), f"{bt}x{m}x{n}x{d} sqrt2={sqrt2} not exact"
            runs.append(lambda fn=fn, call=call: fn(*call))
        a, b = torch.rand(bt, m, n), torch.randn(bt, n, d)
        runs.append(lambda: torch.matmul(a, b))
        number = max(1, int(2e7 / (bt * m * n * d)))  # ~1 ms per measurement
        times = list(interleaved(dict(enumerate(runs)), args.rounds, number, warmup=False).values())
        med = [float(np.median(t)) * 1e3 for t in times]
        low = [float(np.min(t)) * 1e3 for t in times]
        row = f"{f'{bt}x{m}x{n}x{d}':>18s}{kern.variant:>10s}" + "".join(f"{md:10.3f} /{lo:6.3f}" for md, lo in zip(med, low))
        row += f"{med[0] / med[2]:12.2f}x{med[1] / med[2]:11.2f}x"
        print(row, flush=True)


if __name__ == "__main__":
    main()
