"""The .repq file: exact round trip, and a clear error for anything that is not one."""


import pytest
import torch
from safetensors.torch import save_file

from repq_tvm import calibrated, models
from repq_tvm.errors import ReqError
from repq_tvm.quant.calibrate import calibrate
from repq_tvm.quant.config import method_config

from conftest import small_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    images = torch.randn(8, 3, 32, 32)
    model = calibrate(small_model("swin_cifar10"), images, method_config("repq-vit", 6, 6), progress=False)
    arch = models.arch_for("swin_cifar10")
    path = str(tmp_path_factory.mktemp("cal") / "m.repq")
    calibrated.save(path, calibrated.CalibratedModel(model, arch, method_config("repq-vit", 6, 6), {"seed": 0}))
    return path, model, images


def test_round_trip_is_exact(saved):
    path, model, images = saved
    cm = calibrated.load(path)
    with torch.no_grad():
        assert torch.equal(cm.model(images), model(images))
    assert cm.config.w_bits == 6 and cm.arch["name"] == "swin_cifar10" and cm.info == {"seed": 0}
    assert cm.preprocessing["input_size"] == [3, 32, 32]


def test_metadata_describes_every_quantizer(saved):
    meta = calibrated.read_metadata(saved[0])
    qs = meta["quantizers"]
    assert qs["layers.0.blocks.0.attn.matmul_av.a_quantizer"] == {"kind": "log_sqrt2", "bits": 6}
    assert qs["patch_embed.proj.input_quantizer"]["bits"] == 8
    assert qs["layers.1.downsample.reduction.input_quantizer"]["channel_wise"] is False


def test_missing_file(tmp_path):
    with pytest.raises(ReqError, match="calibrated model not found"):
        calibrated.load(str(tmp_path / "nope.repq"))


def test_garbage_file(tmp_path):
    p = tmp_path / "bad.repq"
    p.write_bytes(b"\x00\x01 definitely not safetensors" * 10)
    with pytest.raises(ReqError, match="not a readable repq-tvm calibrated model"):
        calibrated.load(str(p))


def test_truncated_file(saved, tmp_path):
    data = open(saved[0], "rb").read()
    p = tmp_path / "cut.repq"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ReqError, match="calibrated model"):
        calibrated.load(str(p))


def test_foreign_safetensors(tmp_path):
    p = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    with pytest.raises(ReqError, match="not a repq-tvm calibrated model"):
        calibrated.load(str(p))


def test_future_version(tmp_path):
    p = tmp_path / "v9.repq"
    save_file({"w": torch.zeros(2)}, str(p), metadata={"format": calibrated.FORMAT, "version": "9"})
    with pytest.raises(ReqError, match="format version 9"):
        calibrated.load(str(p))


def test_tensor_missing(saved, tmp_path):
    from safetensors import safe_open

    with safe_open(saved[0], framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.endswith("matmul_av.a_quantizer.scale")}
    p = tmp_path / "partial.repq"
    save_file(tensors, str(p), metadata=meta)
    with pytest.raises(ReqError, match="incomplete"):
        calibrated.load(str(p))
