"""Each quantizer against values computed by hand from the formulas in the RepQ-ViT spec."""

import math

import pytest
import torch

from repq_tvm.quant.quantizers import (LogQuantizer, UniformQuantizer, log_codes, log_dequant, quantiles_rows,
                                       split_log_sqrt2, uniform_fake_quant, uniform_params)


def test_uniform_params_by_hand():
    s, z = uniform_params(torch.tensor(-1.0), torch.tensor(2.0), 4)
    assert s.item() == pytest.approx(3 / 15)
    assert z.item() == 5  # round(1 / 0.2)


def test_uniform_fake_quant_by_hand():
    x = torch.tensor([-2.0, -0.45, 0.0, 0.31, 5.0])
    # s = 0.2, z = 5, 4 bits: codes clamp(round(x/0.2) + 5, 0, 15) = [0, 3, 5, 7, 15]
    out = uniform_fake_quant(x, torch.tensor(0.2), torch.tensor(5.0), 4)
    assert torch.allclose(out, torch.tensor([-1.0, -0.4, 0.0, 0.4, 2.0]))


def test_quantiles_match_torch():
    x = torch.randn(3, 1001)
    for q in (0.001, 0.5, 0.999, 0.99999):
        assert torch.allclose(quantiles_rows(x.double(), [q])[0], torch.quantile(x.double(), q, dim=1))


def test_minmax_layerwise():
    q = UniformQuantizer(8, search="minmax")
    q.calibrating = True
    x = torch.linspace(-1, 3, 101)
    out = q(x)
    assert q.scale.item() == pytest.approx(4 / 255)
    assert q.zero_point.item() == round(1 / (4 / 255))
    assert (out - x).abs().max() <= q.scale / 2 + 1e-6


def test_percentile_search_picks_least_squared_error():
    torch.manual_seed(0)
    x = torch.randn(20000)
    x[:3] = torch.tensor([40.0, -35.0, 50.0])  # outliers that min/max would stretch the grid for
    q = UniformQuantizer(4)
    q.calibrating = True
    q(x)
    errs = {}
    for p in (0.999, 0.9999, 0.99999):
        s, z = uniform_params(torch.quantile(x.double(), 1 - p), torch.quantile(x.double(), p), 4)
        errs[p] = ((uniform_fake_quant(x, s, z, 4) - x) ** 2).sum().item()
    best = min(errs, key=errs.get)
    s, z = uniform_params(torch.quantile(x.double(), 1 - best), torch.quantile(x.double(), best), 4)
    assert q.scale.item() == pytest.approx(s.item(), rel=1e-5)
    assert q.zero_point.item() == z.item()
    assert (x.max() - x.min()) / 15 > 5 * q.scale  # the search clipped the outliers


def test_channelwise_equals_per_channel_layerwise():
    x = torch.randn(4, 10, 6) * torch.tensor([0.1, 1, 5, 20, 0.5, 3])
    cq = UniformQuantizer(6, channel_wise=True, channel_dim=-1)
    cq.calibrating = True
    cq(x)
    assert cq.scale.shape == (1, 1, 6)
    for c in range(6):
        lq = UniformQuantizer(6)
        lq.calibrating = True
        lq(x[..., c])
        assert cq.scale[0, 0, c].item() == pytest.approx(lq.scale.item(), rel=1e-6)
        assert cq.zero_point[0, 0, c].item() == lq.zero_point.item()


def test_weight_quantizer_is_per_output_channel():
    w = torch.randn(1, 7).repeat(5, 1) * torch.arange(1, 6)[:, None]
    q = UniformQuantizer(4, channel_wise=True, channel_dim=0)
    q.calibrating = True
    q(w)
    assert q.scale.shape == (5, 1)
    assert torch.allclose(q.scale[:, 0], q.scale[0, 0] * torch.arange(1, 6), rtol=1e-5)


def test_log_sqrt2_codes_and_values_by_hand():
    s = 0.8
    k = torch.arange(16, dtype=torch.float32)
    x = s * torch.pow(2.0, -k / 2)  # exactly on the log√2 grid
    codes, under = log_codes(x, torch.tensor(s), 4, sqrt2=True)
    assert torch.equal(codes, k) and not under.any()
    assert torch.allclose(log_dequant(codes, under, torch.tensor(s), True), x, rtol=1e-6)
    # q = 3: s·2^(−2)·√2 ; q = 4: s·2^(−2)
    assert log_dequant(torch.tensor([3.0]), torch.tensor([False]), s, True).item() == pytest.approx(s / 4 * math.sqrt(2))
    # below the smallest level (code 16 > 15) and zero dequantize to 0; above s saturates to code 0
    codes, under = log_codes(torch.tensor([s * 2 ** -8.0, 0.0, 2 * s]), torch.tensor(s), 4, sqrt2=True)
    out = log_dequant(codes, under, torch.tensor(s), True)
    assert out.tolist() == pytest.approx([0.0, 0.0, s])


def test_log2_variant_by_hand():
    codes, under = log_codes(torch.tensor([1.0, 0.26, 0.1]), torch.tensor(1.0), 4, sqrt2=False)
    assert codes.tolist() == [0, 2, 3]  # round(-log2 0.26) = round(1.94) = 2, round(3.32) = 3
    assert log_dequant(codes, under, 1.0, False).tolist() == [1.0, 0.25, 0.125]


def test_split_log_sqrt2_reconstructs_values():
    codes = torch.arange(16)
    shift, odd = split_log_sqrt2(codes)
    assert shift.tolist() == [(q + 1) // 2 for q in range(16)]
    recon = torch.pow(2.0, -shift.float()) * torch.where(odd == 1, math.sqrt(2), 1.0)
    assert torch.allclose(recon, torch.pow(2.0, -codes.float() / 2))


def test_log_quantizer_calibration_picks_a_percentile_scale():
    attn = torch.softmax(torch.randn(2, 3, 16, 16) * 3, dim=-1)
    q = LogQuantizer(4)
    q.calibrating = True
    q(attn)
    candidates = [torch.quantile(attn.flatten(), p).item() for p in (0.999, 0.9999, 0.99999)]
    assert any(q.scale.item() == pytest.approx(c, rel=1e-6) for c in candidates)


@pytest.mark.parametrize("bits", [2, 5, 16])
def test_unsupported_bits_rejected(bits):
    with pytest.raises(ValueError, match="bits must be one of"):
        UniformQuantizer(bits)


def test_uncalibrated_quantizer_refuses_to_run():
    with pytest.raises(RuntimeError, match="before calibration"):
        UniformQuantizer(8)(torch.zeros(3))
