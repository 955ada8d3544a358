"""Shared fixtures: small random-weight models (fast, no files), a seeded calibration batch and one compiled
ViT fixture artifact."""

import numpy as np
import pytest
import torch

from repq_tvm import models


@pytest.fixture(scope="session")
def vit_host_build(tmp_path_factory):
    """(calibrated file, artifact folder) of the ViT fixture, W4/A4 on 8 calibration images, compiled for
    `host`: one build for every test that only reads an artifact (copy it before changing it)."""
    from repq_tvm.cli import main

    root = tmp_path_factory.mktemp("vit_host")
    cal, art = str(root / "m.repq"), str(root / "art")
    assert main(["calibrate", "--model", "vit_cifar10", "--calib-size", "8", "-o", cal, "--quiet"]) == 0
    assert main(["compile", cal, "--target", "host", "-o", art, "--quiet"]) == 0
    return cal, art


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def small_model(name: str = "vit_cifar10") -> torch.nn.Module:
    """A fixture architecture with random weights and uneven LayerNorm affines (inter-channel variation)."""
    torch.manual_seed(0)
    model = models.build(models.arch_for(name))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(torch.rand_like(m.weight) * 3 + 0.1)
                m.bias.copy_(torch.randn_like(m.bias))
    return model


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def extreme_codes(M, N, K, bits_a, bits_w, seed=0, zero_last_row=False):
    """Random integer-kernel operands with extreme rows: a = max code (and 0 in the last row if asked);
    centred weights w = -max / +max.  8-bit weights are codes minus a per-channel zero point, +-255 at
    the extremes (rows 0, 1) and -128 / 127 (rows 2, 3); below 8 bits |w| <= 2^b - 1."""
    rng = np.random.default_rng(seed)
    a_max = 2**bits_a - 1
    a = rng.integers(0, a_max + 1, (M, K), dtype=np.uint8)
    a[0, :] = a_max
    if zero_last_row and M > 1:
        a[-1, :] = 0
    if bits_w < 8:
        w_max = 2**bits_w - 1
        w = rng.integers(-w_max, w_max + 1, (N, K))
        w[0, :], w[1, :] = -w_max, w_max
    else:
        w = rng.integers(0, 256, (N, K)) - rng.integers(0, 256, (N, 1))
        w[0, :], w[1, :] = -255, 255
        w[2, :], w[3, :] = -128, 127
    return a, w.astype(np.int16)
