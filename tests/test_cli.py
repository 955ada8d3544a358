"""CLI errors: one clear line on stderr and exit code 2, for each kind of bad input."""

import os
import subprocess
import sys

import pytest
import torch

from repq_tvm.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("repq-tvm: error: "), err
    assert message in lines[0], lines[0]


def test_unknown_model(capsys, tmp_path):
    assert_error(capsys, ["evaluate", "--model", "no_such_vit", "--data", str(tmp_path)], "unknown model 'no_such_vit'")


def test_unsupported_architecture(capsys, tmp_path):
    assert_error(capsys, ["calibrate", "--model", "resnet18", "--data", str(tmp_path), "-o", str(tmp_path / "x.repq")],
                 "unsupported architecture 'resnet18'")


@pytest.mark.parametrize("flag,what", [("--w-bits", "weight"), ("--a-bits", "activation")])
def test_bits_outside_supported(capsys, tmp_path, flag, what):
    assert_error(capsys, ["calibrate", "--model", "vit_cifar10", flag, "5", "-o", str(tmp_path / "x.repq")],
                 f"{what} bits must be one of 4, 6, 8, got 5")


def test_missing_data_path(capsys, tmp_path):
    assert_error(capsys, ["calibrate", "--model", "vit_cifar10", "--data", str(tmp_path / "absent"),
                          "-o", str(tmp_path / "x.repq")], "data path does not exist")


def test_empty_data_folder(capsys, tmp_path):
    os.makedirs(tmp_path / "empty")
    assert_error(capsys, ["evaluate", "--model", "vit_cifar10", "--data", str(tmp_path / "empty")], "no images found")


def test_corrupt_checkpoint(capsys, tmp_path):
    ck = tmp_path / "model.pth"
    ck.write_bytes(b"PK\x03\x04 this is not a real checkpoint")
    assert_error(capsys, ["evaluate", "--model", "vit_cifar10", "--checkpoint", str(ck)], "cannot read checkpoint")


def test_checkpoint_with_code_is_refused(capsys, tmp_path):
    ck = tmp_path / "pickled.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, ck)  # a pickled module: weights_only loading refuses it
    assert_error(capsys, ["evaluate", "--model", "vit_cifar10", "--checkpoint", str(ck)], "cannot read checkpoint")


def test_checkpoint_of_another_model(capsys, tmp_path):
    ck = tmp_path / "other.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, ck)
    assert_error(capsys, ["evaluate", "--model", "vit_cifar10", "--checkpoint", str(ck)], "does not fit vit_cifar10")


def test_missing_checkpoint(capsys, tmp_path):
    assert_error(capsys, ["evaluate", "--model", "vit_cifar10", "--checkpoint", str(tmp_path / "x.pt")],
                 "checkpoint not found")


def test_unknown_method(capsys, tmp_path):
    assert_error(capsys, ["calibrate", "--model", "vit_cifar10", "--method", "magic", "-o", str(tmp_path / "x.repq")],
                 "unknown method 'magic'")


def test_corrupt_calibrated_file(capsys, tmp_path):
    bad = tmp_path / "bad.repq"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert_error(capsys, ["evaluate", "--model", str(bad)], "not a readable repq-tvm calibrated model")


def test_console_script_reports_one_line():
    exe = os.path.join(os.path.dirname(sys.executable), "repq-tvm")
    proc = subprocess.run([exe, "evaluate", "--model", "no_such_vit", "--data", "."], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "repq-tvm: error: unknown model 'no_such_vit': use a bundled fixture " \
                                  "(vit_cifar10, swin_cifar10) or a timm model name"
