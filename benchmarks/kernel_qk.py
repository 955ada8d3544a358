"""TVM integer ``q @ k^T`` (`repq_tvm.kernels.qbmm`) vs torch fp32 ``torch.matmul`` on attention shapes.

Why: the integer attention logits only pay off if they beat the float batched matmul they replace.
Interleaved rounds, same thread count for both, median reported; every TVM result checked bit for
bit against `reference.ops.qmatmul_acc` first.

    TVM_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/kernel_qk.py
"""

from __future__ import annotations

import argparse
import os

from interleaved import interleaved

SHAPES = [(6, 197, 197, 64), (4, 65, 65, 32)]  # DeiT-Small (6 heads, 197 tokens); ViT fixture (4 heads, 65)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("TVM_NUM_THREADS", 1)))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--layout", default="nd", choices=("nd", "dn"), help="k codes as [N, D] or [D, N]")
    ap.add_argument("--shapes", nargs="*", help="BtxMxNxD, default: DeiT-S and the ViT fixture")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import numpy as np
    import torch

    from repq_tvm import targets
    from repq_tvm.kernels.qdense import host_target
    from repq_tvm.reference import ops
    from repq_tvm.testing.qbmm import QBmm

    torch.set_num_threads(args.threads)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes] if args.shapes else SHAPES
    target = host_target(args.threads)
    rng = np.random.default_rng(0)

    print(f"threads={args.threads}, target={targets.target_label(target)}, k layout {args.layout}, "
          f"median of {args.rounds} interleaved rounds")
    print(f"{'Bt x M x N x D':>18s}{'tvm int (ms)':>14s}{'torch fp32 (ms)':>17s}{'torch/tvm':>11s}{'GMAC/s':>8s}")
    for Bt, M, N, D in shapes:
        kern = QBmm(Bt, M, N, D, target, b_layout=args.layout)
        a = rng.integers(0, 16, (Bt, M, D), dtype=np.uint8)
        b = rng.integers(0, 16, (Bt, N, D), dtype=np.uint8)
        call = kern.args(a, b if args.layout == "nd" else b.transpose(0, 2, 1), 7, 9)
        fn = kern.function()
        fn(*call)
        assert np.array_equal(call[-1].numpy(), ops.qmatmul_acc(a, 7, b.transpose(0, 2, 1), 9)), "not exact"
        q, kt = torch.randn(Bt, M, D), torch.randn(Bt, D, N)
        runs = {"tvm": lambda: fn(*call), "torch": lambda: torch.matmul(q, kt)}
        number = max(1, int(2e7 / (Bt * M * N * D)))
        t_tvm, t_torch = (float(np.median(t)) * 1e3 for t in interleaved(runs, args.rounds, number).values())
        print(f"{f'{Bt}x{M}x{N}x{D}':>18s}{t_tvm:14.4f}{t_torch:17.4f}{t_torch / t_tvm:10.2f}x"
              f"{Bt * M * N * D / t_tvm / 1e6:8.1f}", flush=True)


if __name__ == "__main__":
    main()
