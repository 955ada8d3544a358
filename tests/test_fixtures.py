"""The shipped fixtures, end to end: calibrate through the CLI (a .repq file), reload it, evaluate on held-out images.

Accuracy claims here are statistical claims about 1,000 held-out images, tested as such. The exact figures
move a little from CPU to CPU: PyTorch's float kernels (oneDNN / ATen, AVX2 vs AVX-512 code paths) sum in a
different order, a few activations land on the other side of a quantizer's rounding midpoint, and a few
images change class; more so at 4 bits, where one code step is large (the W4/A4 PTQ baseline on vit_cifar10:
52.5 on an AVX2 Zen 3, 53.6 on an AVX-512 Zen 4, with RepQ-ViT at 58.5 on both). So a claim "A is better than
B" compares the two models on the same images with a paired bootstrap (`evaluate.paired_margin`, the accuracy
table's interval): the 95% interval must clear the claimed margin, not one CPU's point estimates.
"""

import json

import pytest

from repq_tvm import api
from repq_tvm.cli import main
from repq_tvm.evaluate import paired_margin


def run_json(capsys, *argv):
    assert main([*argv, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def calibrated_file(capsys, tmp_path, name, method, bits):
    out = str(tmp_path / f"{name}-{method}-w{bits}a{bits}.repq")
    res = run_json(capsys, "calibrate", "--model", name, "--method", method, "--w-bits", str(bits), "--a-bits",
                   str(bits), "-o", out)
    assert (res["output"], res["w_bits"], res["a_bits"], res["method"]) == (out, bits, bits, method)
    return out


@pytest.fixture(scope="module")
def fp32():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = api.evaluate(name, progress=False)
        return cache[name]
    return get


@pytest.mark.parametrize("name", ["vit_cifar10", "swin_cifar10"])
def test_w8a8_within_one_point_of_fp32(name, tmp_path, capsys, fp32):
    """W8/A8 stays within one point of FP32 (point estimate, as the README claims), and a loss of 1.5 points
    or more is ruled out at 95% (the paired interval's lower end is above −1.5). One point for the interval
    itself would fail on noise: 13 (ViT) and 7 (Swin) images go from right to wrong or back, which makes the
    interval ±0.5-0.7 points wide (measured on an AVX-512 Zen 4: ViT −0.1 [−0.8, +0.6], Swin −0.3 [−0.8, +0.2];
    Swin's estimate is −0.1 on AVX2), so its lower end sits at −0.8 and a drift of 0.2 points would cross −1."""
    fp = fp32(name)
    assert fp["images"] == 1000 and fp["top1"] > 40  # a trained model, not chance (10%)
    q = api.evaluate(calibrated_file(capsys, tmp_path, name, "repq-vit", 8), progress=False)
    margin = paired_margin(q["correct"], fp["correct"])
    print(f"\n{name} W8/A8 − FP32: {margin['points']:+.2f} points, 95% paired CI {margin['ci95']}")
    assert q["images"] == 1000
    assert abs(margin["points"]) <= 1.0, margin
    assert margin["ci95"][0] > -1.5, margin


@pytest.mark.parametrize("name", ["vit_cifar10", "swin_cifar10"])
def test_repq_beats_plain_ptq_at_w4a4(name, tmp_path, capsys):
    """RepQ-ViT beats the plain PTQ baseline at W4/A4 beyond the noise of the 1,000 images (the interval's
    lower end is above 0) and by at least 3 points. Measured: ViT +6.0 [+3.5, +8.5] on AVX2 Zen 3 and
    +4.9 [+2.4, +7.5] on AVX-512 Zen 4; Swin +8.2 [+5.7, +10.7] and +8.1 [+5.5, +10.6]. 3 points leaves the
    smallest of these (4.9) room for about twice the largest CPU-to-CPU drift seen (1.1 points)."""
    res = {method: api.evaluate(calibrated_file(capsys, tmp_path, name, method, 4), progress=False)
           for method in ("repq-vit", "ptq-baseline")}
    margin = paired_margin(res["repq-vit"]["correct"], res["ptq-baseline"]["correct"])
    print(f"\n{name} W4/A4 RepQ-ViT {res['repq-vit']['top1']:.1f} − PTQ baseline {res['ptq-baseline']['top1']:.1f}: "
          f"{margin['points']:+.2f} points, 95% paired CI {margin['ci95']}")
    assert margin["ci95"][0] > 0, margin
    assert margin["points"] >= 3.0, margin


def test_limit_evaluates_a_subset(capsys):
    res = run_json(capsys, "evaluate", "--model", "vit_cifar10", "--limit", "50")
    assert res["images"] == 50
