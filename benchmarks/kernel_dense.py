"""TVM integer dense (AVX2 u8 x s8 and int16 variants, or VNNI, and AMX where the CPU has it) vs torch fp32
``x @ w.T`` on ViT shapes.

Why: the int8 path only pays off if it beats the float matmul it replaces.  Everything is timed in
one process, interleaved round by round (the machine is shared: a fixed order would hand one
kernel the quiet moments), with the same thread count for TVM and torch.  Every kernel runs with its
float epilogue at unit scale (the compiler's form, and the only one the AMX kernel has), so its output is
float32(acc): checked bit for bit first.

    TVM_NUM_THREADS=1 python benchmarks/kernel_dense.py            # all shapes, 1 thread
    python benchmarks/kernel_dense.py --threads 2 --shapes 197x384x384
    python benchmarks/kernel_dense.py --threads 2 --shapes 197x1536x384 196x384x1536 --rows 3,4,5,6

``--rows`` adds each kernel again with that many rows per register tile (its default lane blocks), to check
`kernels.qdense.default_tiles`' choice of rows on this CPU: the default's rows are in the first columns.
``--rows-outer`` adds each int16 kernel again with row tiles outer (where the compiler runs blocks of column tiles:
1024+ rows, `kernels.qdense.column_block`), to compare the two orders.
``--gelu`` adds each kernel again with fc1's fused GELU → codes tail (`kernels.epilogue.tail`, the codes as
fc2 reads them, the quantizer a run-time operand as the compiler builds it), checked bit for bit against the same kernel with the intrinsic's plain-loop twin: the tail's cost
is the difference to the first column.
``--no-prefetch`` adds each VNNI kernel that prefetches its weights (`kernels.qdense.weight_prefetch`: 512 rows or
fewer) and each AMX kernel (whose column tasks ask for the next block's weights, `kernels.qdense_amx`) again without
the prefetch, to compare the two (with ``--cold`` too).
``--cold MB`` adds each kernel again with its weight operands (packed weights, compensation, epilogue vectors) read
from one of several copies, a different one each call, the copies together ``MB`` megabytes: weights that come
from L3 or memory, as in a model, where the other layers' weights pass through the caches between two calls of a
kernel (DeiT-Small's weights take 22 MB); the activations stay the same, as a kernel finds its producer's output
in the caches.  The cost of cold weights is the difference to the kernel's warm column.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os

from interleaved import interleaved

# ViT linear layers: (tokens, out features, in features)
SHAPES = [
    (197, 384, 384), (197, 1152, 384), (197, 1536, 384), (197, 384, 1536),  # DeiT-S, 224 px
    (65, 384, 128), (65, 128, 128), (65, 512, 128), (65, 128, 512),  # dim 128, 65 tokens
    (785, 384, 128), (785, 128, 128), (785, 512, 128), (785, 128, 512),  # dim 128, 28x28 + cls
    (3136, 384, 128), (3136, 128, 128), (3136, 512, 128), (3136, 128, 512),  # dim 128, 56x56
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TVM_NUM_THREADS", os.cpu_count())))
    ap.add_argument("--bits", default="6,6", help="bits_a,bits_w of the u8 x s8 kernel (default 6,6; widths it would "
                    "saturate with time the int16 kernel alone)")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds; the median is reported")
    ap.add_argument("--shapes", nargs="*", help="MxNxK, default: the ViT list")
    ap.add_argument("--rows", default="", help="also time these rows per register tile, e.g. 3,4,5,6")
    ap.add_argument("--gelu", action="store_true", help="also time each kernel with fc1's fused GELU → codes tail")
    ap.add_argument("--rows-outer", action="store_true", help="also time each kernel with row tiles outer where "
                    "it runs blocks of column tiles (`kernels.qdense.column_block`: int16, 1024+ rows)")
    ap.add_argument("--no-prefetch", action="store_true",
                    help="also time each VNNI and AMX kernel without its weight prefetch")
    ap.add_argument("--cold", type=float, default=0, metavar="MB", help="also time each kernel with its weights "
                    "rotating through copies that take this many MB together (e.g. 24: from L3 or memory, as in a "
                    "model)")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM starts its thread pool

    import numpy as np
    import torch

    from repq_tvm import targets
    from repq_tvm.kernels import qdense as Q
    from repq_tvm.kernels.epilogue import ZERO_POINT
    from repq_tvm.testing.qdense import build_qdense

    torch.set_num_threads(args.threads)
    bits_a, bits_w = map(int, args.bits.split(","))
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else SHAPES
    target = Q.host_target(args.threads)
    vnni = targets.tvm_target("x86_64-avx512-vnni", args.threads)
    amx = targets.tvm_target("x86_64-amx", args.threads)
    if targets.runnable_reason(vnni) is None:
        kernels = [("vnni", vnni, 8, 8)]
    elif Q.VARIANTS["avx2_u8s8"].exact(bits_a, bits_w):
        kernels = [("avx2_u8s8", target, bits_a, bits_w), ("avx2_i16", target, 8, 8)]
    else:  # a saturating u8 x s8 kernel is refused (`schedule_qdense`); 8-bit codes are the int16 kernel's
        kernels = [("avx2_i16", target, 8, 8)]
    if targets.runnable_reason(amx) is None:
        kernels.insert(0, ("amx", amx, 8, 8))
    # (variant, target, bits_a, bits_w, rows per tile or None, GELU tail, column blocks where the rule takes them,
    # weight prefetch where the rule takes it)
    kernels = [(v, tgt, ba, bw, None, False, True) for v, tgt, ba, bw in kernels]
    kernels += [(v, tgt, ba, bw, int(r), False, True) for v, tgt, ba, bw, *_ in list(kernels) if v != "amx"
                for r in filter(None, args.rows.split(","))]  # the AMX kernel has one fixed blocking
    kernels += [(v, tgt, ba, bw, None, True, True) for v, tgt, ba, bw, r, *_ in list(kernels) if args.gelu and r is None]
    kernels += [(v, tgt, ba, bw, r, g, False) for v, tgt, ba, bw, r, g, _ in list(kernels)
                if args.rows_outer and v == "avx2_i16" and r is None]
    kernels = [(*k, True) for k in kernels]
    kernels += [(v, tgt, ba, bw, r, g, b, False) for v, tgt, ba, bw, r, g, b, _ in list(kernels)
                if args.no_prefetch and v in ("vnni", "amx") and r is None]
    rng = np.random.default_rng(0)

    label = lambda r, gelu, blocks=True, prefetch=True: (  # noqa: E731
        (f" r{r}" if r else "") + (" gelu" if gelu else "") + ("" if blocks else " rows-outer")
        + ("" if prefetch else " no-pf"))
    names = [f"{v}(a{ba}w{bw}{label(r, g, b, pf)})" for v, _, ba, bw, r, g, b, pf in kernels]
    short = [f"{v}{label(r, g, b, pf)}" for v, _, _, _, r, g, b, pf in kernels]
    if args.cold:  # every kernel's cold twin right after it
        names = [n for name in names for n in (name, name + " cold")]
        short = [n for name in short for n in (name, name + " cold")]
    print(f"threads={args.threads} (TVM and torch {torch.__version__}), target={targets.target_label(target)}, "
          f"median of {args.rounds} interleaved rounds, ms per call")
    head = f"{'M x N x K':>16s}" + "".join(f"{n:>20s}" for n in names) + f"{'torch fp32':>12s}"
    head += "".join(f"{'torch/' + n:>18s}" for n in short)
    head += "".join(f"{n + ' GMAC/s':>18s}" for n in short)
    print(head)
    for M, N, K in shapes:
        runs = []
        for variant, tgt, ba, bw, rows, gelu, blocks, prefetch in kernels:
            if variant == "amx" and not Q.qdense_amx.fits(M, N, K):
                runs.extend([None] * (2 if args.cold else 1))
                continue
            v = Q.VARIANTS[variant]
            tiles = None if rows is None else (rows, Q.default_tiles(M, N, v, v.max_depth(ba, bw, K))[1])
            a_max, w_max = 2**ba - 1, (127 if bw >= 8 else 2**bw - 1)
            # fc1's tail as the compiler builds it: uint8 codes, or the int16 kernel's centred codes for fc2
            tail = {} if not gelu else {"gelu_codes": (0.02, 10, 255),
                                        **({"codes_operand": ("int16", ZERO_POINT)} if variant == "avx2_i16" else {})}
            build = lambda ref=False: build_qdense(  # noqa: E731
                M, N, K, tgt, variant=variant, bits_a=ba, bits_w=bw, epilogue=True, tiles=tiles, ref=ref,
                column_blocks=blocks, prefetch=prefetch, **tail)
            kern = build()
            a = rng.integers(0, a_max + 1, (M, K), dtype=np.uint8)
            w = rng.integers(-w_max, w_max + 1, (N, K))
            a_zp = 0 if variant != "avx2_i16" else a_max // 2
            # unit scale: the output is float32(acc); with the GELU tail, a scale putting GELU's inputs at a few units
            scale = np.full(N, 1.0 if not gelu else 3.0 / (a_max * w_max * K ** 0.5 / 3), np.float32)
            operands = (kern.prepare_activation(a, a_zp), *kern.weight_args(w),
                        np.zeros(N, np.int32), scale, np.zeros(N, np.float32))
            call = kern._args(*operands)
            fn = kern.function()
            fn(*call)
            if gelu:  # the same tail on the intrinsic's plain-loop twin, bit for bit
                twin_out = build(ref=True)(*operands)
                assert np.array_equal(call[-1].numpy(), twin_out), f"{variant} gelu {M}x{N}x{K} differs from its twin"
            else:
                exact = ((a.astype(np.int64) - a_zp) @ w.astype(np.int64).T).astype(np.float32)  # float32(acc)
                assert np.array_equal(call[-1].numpy(), exact), f"{variant} {M}x{N}x{K} not exact"
            runs.append(lambda fn=fn, call=call: fn(*call))
            if args.cold:
                runs.append(cold_calls(fn, call, args.cold))
        x, wt = torch.randn(M, K), torch.randn(N, K)
        runs.append(lambda: x @ wt.T)
        number = max(1, int(3e6 / (M * N * K) * 10))  # ~0.3-3 ms per measurement
        # warmed up (thread pools start, caches fill): the first shape measured 30x slow without
        times = interleaved(dict(enumerate(runs)), args.rounds, number, settle=True).values()
        med = [float(np.median(t)) * 1e3 if t else float("nan") for t in times]
        row = f"{f'{M}x{N}x{K}':>16s}" + "".join(f"{t:20.3f}" for t in med[:-1]) + f"{med[-1]:12.3f}"
        row += "".join(f"{med[-1] / t:17.2f}x" for t in med[:-1])
        print(row + "".join(f"{M * N * K / t / 1e6:18.1f}" for t in med[:-1]), flush=True)


def cold_calls(fn, call: list, megabytes: float):
    """A callable running ``fn`` on ``call`` whose weight operands (all but the first, the activations, and the
    last, the output) are one of several copies, the next one each call; the copies take ``megabytes`` together."""
    import tvm

    weights = call[1:-1]
    size = sum(x.numpy().nbytes for x in weights)
    copies = max(2, math.ceil(megabytes * 2**20 / size))
    calls = [call] + [[call[0], *(tvm.runtime.tensor(x.numpy()) for x in weights), call[-1]] for _ in range(copies - 1)]
    rotation = itertools.cycle(calls)
    return lambda: fn(*next(rotation))


if __name__ == "__main__":
    main()
