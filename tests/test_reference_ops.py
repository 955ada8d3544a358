"""The integer reference agrees with the float (fake-quant) definitions of each quantized op."""

import math

import numpy as np
import torch

from repq_tvm.quant.quantizers import log_codes, log_dequant, uniform_fake_quant
from repq_tvm.reference import ops


def test_quantize_rounds_half_to_even_like_torch():
    x = np.array([0.5, 1.5, 2.5, -0.5, 3.49, 300.0, -9.0], np.float32)
    assert ops.quantize(x, 1.0, 3, 8).tolist() == [3, 5, 5, 3, 6, 255, 0]
    t = torch.from_numpy(x)
    assert ops.quantize(x, 1.0, 3, 8).tolist() == torch.clamp(torch.round(t) + 3, 0, 255).int().tolist()


def test_qlinear_acc_equals_direct_sum_for_all_bit_widths():
    rng = np.random.default_rng(0)
    for bits in (4, 6, 8):
        a = rng.integers(0, 2 ** bits, (7, 33))
        w = rng.integers(0, 2 ** bits, (5, 33))
        z_w = rng.integers(0, 2 ** bits, 5)
        z_a = int(rng.integers(0, 2 ** bits))
        direct = (a - z_a) @ (w - z_w[:, None]).T
        assert np.array_equal(ops.qlinear_acc(a, z_a, w, z_w, bits), direct)


def test_qlinear_matches_fake_quant_linear():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 16)).astype(np.float32)
    wf = rng.standard_normal((8, 16)).astype(np.float32)
    s_a, z_a = 0.05, 7
    s_w = (np.abs(wf).max(1) / 7).astype(np.float32)
    z_w = np.full(8, 8.0, np.float32)
    a = ops.quantize(x, s_a, z_a, 4)
    w = ops.weight_codes(wf, s_w, z_w, 4)
    y = ops.qlinear_acc(a, z_a, w, z_w, 4) * (s_a * s_w)
    ref = uniform_fake_quant(torch.from_numpy(x), s_a, z_a, 4) @ uniform_fake_quant(
        torch.from_numpy(wf), torch.from_numpy(s_w)[:, None], torch.from_numpy(z_w)[:, None], 4).T
    assert np.allclose(y, ref.numpy(), rtol=1e-5, atol=1e-6)


def test_log2_shift_attention_matches_log_sqrt2_dequant():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(2, 3, 10, 10) * 2, dim=-1)
    v = torch.randint(0, 16, (2, 3, 10, 8))
    s_attn, z_v, s_v, bits = 0.6, 8, 0.1, 4
    codes, dead = ops.log_sqrt2_codes(p.numpy(), s_attn, bits)
    tc, tdead = log_codes(p, torch.tensor(s_attn), bits, sqrt2=True)
    assert np.array_equal(codes[~dead], tc.numpy().astype(np.int32)[~dead]) and np.array_equal(dead, tdead.numpy())
    f = ops.frac_bits(10, bits)
    assert f == 23
    acc = ops.log2_attn_v(codes, dead, v.numpy(), z_v, f, bits)
    out = acc * s_attn * s_v / 2 ** f
    unit = s_attn * s_v / 2 ** f
    # 4-bit log√2 codes shift at most 8 ≤ F: every shift is exact, only the √2 step rounds (≤ ½ unit, plus
    # |√2_Q/2^Q − √2|·|S_odd| ≤ 1.2e-11·10·15·2^F < 0.02 unit); exact value in float64
    a = np.where(dead, 0.0, s_attn * 2.0 ** (-codes / 2))
    exact = a @ ((v.numpy().astype(np.float64) - z_v) * s_v)
    assert np.abs(out - exact).max() <= 0.52 * unit
    # the float32 PyTorch dequant graph: also its own rounding (≤ (N + 2)·2^-24 of Σ|â||v̂|)
    ref = (log_dequant(tc, tdead, s_attn, True) @ ((v - z_v).float() * s_v)).numpy()
    float_err = (10 + 2) * 2.0 ** -24 * (np.abs(a) @ np.abs((v.numpy() - z_v) * s_v))
    assert np.all(np.abs(out - ref) <= 0.52 * unit + float_err)
    assert np.abs(ref).max() > 1e6 * unit  # the comparison is not vacuous


def test_shift_attention_is_exact_on_the_grid():
    """When V·2^F is divisible by every shift, shifts are exact: only the √2 constant rounds."""
    codes = np.array([[0, 1, 2, 3, 4, 15]])
    dead = np.zeros_like(codes, bool)
    v = np.array([[3], [5], [7], [1], [2], [4]]) + 8
    f = 12
    acc = ops.log2_attn_v(codes, dead, v, 8, f, v_bits=4)
    exact = sum(vz * 2 ** (-c / 2) for vz, c in zip([3, 5, 7, 1, 2, 4], codes[0])) * 2 ** f
    assert abs(acc[0, 0] - exact) <= 0.5 + 1e-6  # the √2 product is rounded to nearest


def test_shift_attention_rounds_sqrt2_to_nearest_and_drops_shifts_past_f_plus_v_bits():
    f, v_bits = 5, 4
    v, dead = np.array([[8 + 7], [8 - 7], [8 + 3]]), np.zeros((1, 3), bool)
    # one odd code: S_odd = 7·2^5 >> 1 = 112, √2·112 = 158.39 → 158; S_odd = 3·2^5 >> 2 = 24, √2·24 = 33.94 → 34
    assert ops.log2_attn_v(np.array([[1, 0, 0]]), ~np.array([[True, False, False]]), v, 8, f, v_bits)[0, 0] == 158
    assert ops.log2_attn_v(np.array([[0, 0, 3]]), ~np.array([[False, False, True]]), v, 8, f, v_bits)[0, 0] == 34
    # shift F + b_v = 9 still counts (−7·2^5 >> 9 = −1), shift 10 (code 19 or 20) is dead
    assert ops.log2_attn_v(np.array([[18, 18, 18]]), dead, v, 8, f, v_bits)[0, 0] == 0 + -1 + 0
    assert ops.log2_attn_v(np.array([[19, 20, 19]]), dead, v, 8, f, v_bits)[0, 0] == 0


def test_frac_bits_keep_int32():
    """The largest F with N·(2^(b+1) − 1)·2^F < 2^32 (the kernel's biased uint32 sums; implies the int32 sums)."""
    for n in (1, 2, 16, 49, 65, 197, 3136):
        for b in (4, 6, 8):
            f = ops.frac_bits(n, b)
            assert max(n, 2) * (2 ** (b + 1) - 1) * 2 ** f < 2 ** 32 and n * (2 ** b - 1) * 2 ** f < 2 ** 31
            assert max(n, 2) * (2 ** (b + 1) - 1) * 2 ** (f + 1) >= 2 ** 32 or f + b + 1 == 31
            assert 1 <= f and f + b + 1 <= 31
    assert ops.frac_bits(197) == ops.frac_bits(197, 8) == 15
    assert ops.frac_bits(65, 8) == 16 and ops.frac_bits(65, 4) == 21 and ops.frac_bits(49, 4) == 21
    assert abs(ops.SQRT2_FIXED / 2 ** ops.SQRT2_Q - math.sqrt(2)) < 2 ** -29
