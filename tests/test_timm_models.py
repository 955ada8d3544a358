"""timm ViT / DeiT / Swin at 224x224: calibrate from a user's checkpoint and image folder, save, reload, evaluate."""

import json
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from repq_tvm import calibrated
from repq_tvm.cli import main
from repq_tvm.quant.wrap import quantizers


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in range(3):
        os.makedirs(root / f"class{c}")
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.jpg")
    return root


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
                                  "swin_tiny_patch4_window7_224"])
def test_user_checkpoint_calibrate_and_evaluate(name, folder, tmp_path, capsys):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, num_classes=3).eval()
    ck = tmp_path / "user.pth"
    torch.save({"model": ref.state_dict()}, ck)
    out = tmp_path / "q.repq"
    assert main(["calibrate", "--model", name, "--checkpoint", str(ck), "--data", str(folder), "--calib-size", "4",
                 "--w-bits", "6", "--a-bits", "6", "-o", str(out), "--quiet"]) == 0
    cm = calibrated.load(str(out))
    assert cm.arch["overrides"] == {"num_classes": 3} and cm.preprocessing["input_size"] == [3, 224, 224]
    qs = quantizers(cm.model)
    assert all(q.ready for q in qs.values())
    assert sum(n.endswith("matmul_av.a_quantizer") for n in qs) == sum(1 for n, _ in ref.named_modules()
                                                                       if n.endswith(".attn"))
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data", str(folder), "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 6 and 0 <= res["top1"] <= res["top5"] == 100.0  # 3 classes: top-5 covers all
