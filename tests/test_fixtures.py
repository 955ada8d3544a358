"""The shipped fixtures, end to end through the CLI: calibrate, save, reload, evaluate on held-out images."""

import json

import pytest

from repq_tvm.cli import main


def run_json(capsys, *argv):
    assert main([*argv, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def fp_top1():
    cache = {}

    def get(name, capsys):
        if name not in cache:
            cache[name] = run_json(capsys, "evaluate", "--model", name)
        return cache[name]
    return get


@pytest.mark.parametrize("name", ["vit_cifar10", "swin_cifar10"])
def test_w8a8_within_one_point_of_fp32(name, tmp_path, capsys, fp_top1):
    fp = fp_top1(name, capsys)
    assert fp["images"] == 1000 and fp["top1"] > 40  # a trained model, not chance (10%)
    out = str(tmp_path / "w8a8.repq")
    run_json(capsys, "calibrate", "--model", name, "--w-bits", "8", "--a-bits", "8", "-o", out)
    q = run_json(capsys, "evaluate", "--model", out)
    assert q["images"] == 1000
    assert abs(q["top1"] - fp["top1"]) <= 1.0, (q["top1"], fp["top1"])


@pytest.mark.parametrize("name", ["vit_cifar10", "swin_cifar10"])
def test_repq_beats_plain_ptq_at_w4a4(name, tmp_path, capsys):
    top1 = {}
    for method in ("repq-vit", "ptq-baseline"):
        out = str(tmp_path / f"{method}.repq")
        run_json(capsys, "calibrate", "--model", name, "--method", method, "-o", out)
        top1[method] = run_json(capsys, "evaluate", "--model", out)["top1"]
    assert top1["repq-vit"] >= top1["ptq-baseline"] + 5, top1


def test_limit_evaluates_a_subset(capsys):
    res = run_json(capsys, "evaluate", "--model", "vit_cifar10", "--limit", "50")
    assert res["images"] == 50
