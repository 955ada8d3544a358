"""Shared fixtures: small random-weight models (fast, no files) and a seeded calibration batch."""

import pytest
import torch

from repq_tvm import models


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
