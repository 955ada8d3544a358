"""How finely the log√2 attention's integer weights must resolve 2^(−c/2) for the artifact to stay the calibrated model.

The integer attn @ V holds each post-softmax weight s·2^(−c/2) as an integer in units of 2^−B of s: B = 29 today
(`reference.ops.attn_weights`: 2F + 1 with F = 14), two int16 planes on `vpdpwssd` / `vpmaddwd` / `smlal`.  Fewer
bits would be fewer or narrower dot products: B = 23 fits three u8 bands (a `vpdpbusd` each, 3/4 of today's
instructions), B = 14 one int16 plane (half).  This runs the calibrated (fake-quant) model with its log√2 dequantizer
rounded to units of 2^−B (half up; weights below half a unit vanish) and compares its logits with the exact
dequantizer's on the fixture's held-out images: top-1 agreement, and the share of images whose logits all stay
within 1e-4, the measure `tests/test_compile.py` holds the artifact to (≥ 0.9 of the images).

    python benchmarks/attention_precision.py CALIBRATED.repq [--bits 29 23 14] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from unittest import mock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("calibrated", help="a calibrated model (repq-tvm calibrate -o ...)")
    ap.add_argument("--bits", type=int, nargs="+", default=[29, 23, 14], help="B: the weights' units are 2^-B of s")
    ap.add_argument("--out", help="also write the table as JSON here")
    args = ap.parse_args()

    import numpy as np
    import torch

    from repq_tvm import calibrated, data, models
    from repq_tvm.errors import ReqError
    from repq_tvm.evaluate import load_batch, make_transform
    from repq_tvm.quant import quantizers

    try:
        cm = calibrated.load(args.calibrated)
    except ReqError as e:
        sys.exit(f"attention_precision: error: {e}")
    source = data.open_images(models.fixture_file(models.FIXTURE_EVAL_DATA))
    x, _ = load_batch(source, np.arange(len(source)), make_transform(cm.preprocessing))

    def logits():
        with torch.no_grad():
            return torch.cat([cm.model(x[i:i + 100]) for i in range(0, len(x), 100)]).numpy()

    def rounded(bits: int):
        """`quantizers.log_dequant` with 2^(−c/2) rounded to units of 2^−bits."""
        def dequant(codes, underflow, scale, sqrt2):
            c = codes.to(torch.float64)
            w = torch.floor(torch.pow(2.0, (-c / 2 if sqrt2 else -c) + bits) + 0.5) * 2.0 ** -bits
            val = w.to(torch.float32) * scale
            return torch.where(underflow, torch.zeros_like(val), val)
        return dequant

    exact = logits()
    rows = []
    print(f"{cm.arch['name']}: {len(x)} held-out images against the exact log√2 dequantizer")
    for bits in args.bits:
        with mock.patch.object(quantizers, "log_dequant", rounded(bits)):
            out = logits()
        worst = np.abs(out - exact).max(1)
        rows.append({"bits": bits, "top1_agreement": float((out.argmax(1) == exact.argmax(1)).mean()),
                     "share_within_1e-4": float((worst < 1e-4).mean()), "median_max_abs_diff": float(np.median(worst))})
        r = rows[-1]
        print(f"B = {bits:2d}: top-1 agreement {r['top1_agreement']:.4f}, images within 1e-4 {r['share_within_1e-4']:.3f}, "
              f"median max |Δlogit| {r['median_max_abs_diff']:.2e}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": cm.arch['name'], "images": len(x), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
