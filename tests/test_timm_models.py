"""timm ViT / DeiT / Swin at 224x224: calibrate from a user's checkpoint and image folder, save, reload, evaluate."""

import json
import os
import re
import subprocess

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from repq_tvm import calibrated
from repq_tvm.cli import main
from repq_tvm.quant.wrap import quantizers

from conftest import calibrated_logits


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


@pytest.mark.parametrize("name,bits", [
    ("deit_tiny_patch16_224", 8), ("swin_tiny_patch4_window7_224", 8),
    pytest.param("deit_small_patch16_224", 8, marks=pytest.mark.slow),  # also built by benchmarks/latency.py
])
def test_compile_and_run_at_224(name, bits, folder, tmp_path, capsys):
    """Random-init timm models calibrate, compile for the host and run; the artifact tracks the calibrated model.

    Swin runs at W8/A8: a random-init Swin-T at W4/A4 is chaotic under any float reordering (TVM's own
    float build of the fake-quant graph, without our passes, was off by 0.19 for a logit spread of 0.43).
    """
    from repq_tvm.deploy.runtime import Runner
    from repq_tvm.evaluate import load_batch, make_transform
    from repq_tvm import data

    cal, art = str(tmp_path / "q.repq"), str(tmp_path / "art")
    assert main(["calibrate", "--model", name, "--data", str(folder), "--calib-size", "4", "--w-bits", str(bits),
                 "--a-bits", str(bits), "-o", cal, "--quiet"]) == 0
    assert main(["compile", cal, "--target", "host", "-o", art, "--quiet"]) == 0
    manifest = json.load(open(os.path.join(art, "manifest.json")))
    stats = manifest["compile"]
    assert stats["unscheduled_kernels"] == [] or all("mean" in k for k in stats["unscheduled_kernels"])
    assert stats["integer_qk"] == stats["log2_attention"] > 0 and stats["integer_patch_embeds"] == 1
    # the linears use the host preset's int8 dot instruction (W8 on VNNI: vpdpbusd, compensated)
    asm = subprocess.run(["objdump", "-d", os.path.join(art, "model.so")], capture_output=True, text=True,
                         check=True).stdout
    # (variants, instruction): on AMX the shapes its blocking cannot take (the 1-row head) run on VNNI
    variants, needle = {"amx": (("_amx_", "_vnni_"), "tdpbusd"), "vnni": (("_vnni_",), "vpdpbusd"),
                        "avx2": (("_avx2_",), "vpmaddwd")}[manifest["target"]["int8_dot"]]
    kernels = set(re.findall(r"<(repq_qdense_\w+?)(?:_compute_)?>:", asm))
    assert all(any(v in k for v in variants) for k in kernels) and needle in asm, kernels
    assert sum(variants[0] in k for k in kernels) >= 4, kernels
    # the fused attentions (where the target has a kernel for the heads: not Swin's on AMX): one kernel per shape and
    # tail, the blocks' scales and quantizers its run-time constants (no copies TVM numbers apart)
    attention = set(re.findall(r"<(repq_attention_\w+?)(?:_compute_)?>:", asm))
    assert bool(attention) == (stats["fused_attention"] > 0), attention
    assert len(attention) < max(2, stats["fused_attention"]) and all(k.endswith("_out_codes") for k in attention)
    cm = calibrated.load(cal)
    source = data.open_images(str(folder))
    x, _ = load_batch(source, np.arange(len(source)), make_transform(cm.preprocessing))
    ref = calibrated_logits(cm.model, x)
    out = Runner(art).predict(x.numpy())
    print(name, "max |Δlogit|", np.abs(out - ref).max(), "logit spread", ref.std())
    assert np.abs(out - ref).max() <= 0.1 * ref.std() + 1e-3
    img = os.path.join(str(folder), "class0", "0.jpg")
    capsys.readouterr()
    assert main(["run", art, img, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[img]) == 5
