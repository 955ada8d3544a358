"""Accuracy table: FP32 vs RepQ-ViT, a plain PTQ baseline and RepQ-ViT ablations, on the bundled fixtures.

Every quantized model is calibrated with 32 images of the shipped training-split pack (seed 0) and
evaluated on the shipped held-out pack (1,000 images never used in training or calibration).
RepQ-ViT's margin over the PTQ baseline is also given with a 95% paired-bootstrap interval over the
same images, so "clearly better" means the interval's lower end is above zero, not a judgement call.
Writes benchmarks/results/accuracy.json, accuracy.png, and the table between the markers in README.md.

    python benchmarks/accuracy_table.py [--fixtures vit_cifar10 swin_cifar10] [--bits 8 6 4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import torch

from repq_tvm import api, data, models
from repq_tvm.evaluate import paired_margin
from repq_tvm.quant.config import METHODS

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LABELS = {
    "repq-vit": "RepQ-ViT",
    "ptq-baseline": "PTQ baseline (min/max, layer-wise LN, uniform softmax)",
    "repq-no-ln-reparam": "RepQ-ViT without post-LN channel-wise + reparam",
    "repq-no-log-sqrt2": "RepQ-ViT without log√2 (uniform softmax)",
    "repq-float-zero-point": "RepQ-ViT with the reference's float zero point",
}


def run(fixtures, bits_list, methods) -> dict:
    """Every fixture x bit width x method, calibrated and evaluated exactly as `repq-tvm calibrate` /
    `repq-tvm evaluate` do (the library API under them), so the table and the CLI give the same numbers."""
    eval_images = len(data.open_images(models.fixture_file(models.FIXTURE_EVAL_DATA)))
    results = {"eval_images": eval_images, "calib_images": 32, "fixtures": {}, "repq_minus_baseline": {}}
    for name in fixtures:
        row = {"fp32": api.evaluate(name)["top1"]}
        print(f"{name} FP32 top-1 {row['fp32']:.2f}", flush=True)
        margins = {}
        for bits in bits_list:
            correct = {}
            for method in methods:
                t0 = time.time()
                cm = api.calibrate(name, w_bits=bits, a_bits=bits, method=method, calib_size=32, seed=0)
                res = api.evaluate(cm)
                row[f"{method} W{bits}/A{bits}"] = res["top1"]
                correct[method] = res["correct"]
                print(f"{name} {method} W{bits}/A{bits} top-1 {res['top1']:.2f} ({time.time() - t0:.0f} s)", flush=True)
            if {"repq-vit", "ptq-baseline"} <= set(correct):
                margins[f"W{bits}/A{bits}"] = paired_margin(correct["repq-vit"], correct["ptq-baseline"])
        results["fixtures"][name] = row
        results["repq_minus_baseline"][name] = margins
    return results


def markdown(results, bits_list, methods) -> str:
    fixtures = list(results["fixtures"])
    head = "| method | bits | " + " | ".join(fixtures) + " |\n|---|---|" + "---|" * len(fixtures) + "\n"
    lines = ["| FP32 | 32/32 | " + " | ".join(f"{results['fixtures'][f]['fp32']:.1f}" for f in fixtures) + " |"]
    for bits in bits_list:
        for m in methods:
            vals = " | ".join(f"{results['fixtures'][f][f'{m} W{bits}/A{bits}']:.1f}" for f in fixtures)
            lines.append(f"| {LABELS[m]} | W{bits}/A{bits} | {vals} |")
        margins = [results["repq_minus_baseline"][f].get(f"W{bits}/A{bits}") for f in fixtures]
        if all(margins):
            vals = " | ".join(f"{m['points']:+.1f} [{m['ci95'][0]:+.1f}, {m['ci95'][1]:+.1f}]" for m in margins)
            lines.append(f"| RepQ-ViT − PTQ baseline, points [95% paired CI] | W{bits}/A{bits} | {vals} |")
    return head + "\n".join(lines) + "\n"


def plot(results, bits_list, methods, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixtures = list(results["fixtures"])
    fig, axes = plt.subplots(1, len(fixtures), figsize=(6 * len(fixtures), 4), squeeze=False)
    width = 0.8 / len(methods)
    for ax, f in zip(axes[0], fixtures):
        row = results["fixtures"][f]
        for i, m in enumerate(methods):
            ax.bar([b + (i - len(methods) / 2) * width for b in range(len(bits_list))],
                   [row[f"{m} W{b}/A{b}"] for b in bits_list], width, label=m)
        ax.axhline(row["fp32"], color="k", ls="--", lw=1, label="FP32")
        ax.set_xticks(range(len(bits_list)), [f"W{b}/A{b}" for b in bits_list])
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{f} ({results['eval_images']} held-out images)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def update_readme(table: str) -> None:
    path = os.path.join(ROOT, "README.md")
    text = open(path).read()
    new = re.sub(r"(<!-- accuracy-table:start -->\n).*?(<!-- accuracy-table:end -->)",
                 lambda m: m.group(1) + table + m.group(2), text, flags=re.S)
    with open(path, "w") as f:
        f.write(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", nargs="+", default=list(models.FIXTURES))
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 6, 4])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--no-readme", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = run(args.fixtures, args.bits, args.methods)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "accuracy.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, args.bits, args.methods, os.path.join(args.out_dir, "accuracy.png"))
    table = markdown(results, args.bits, args.methods)
    print("\n" + table)
    if not args.no_readme:
        update_readme(table)


if __name__ == "__main__":
    main()
