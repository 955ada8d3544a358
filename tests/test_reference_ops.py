"""The integer reference agrees with the float (fake-quant) definitions of each quantized op."""

import math

import numpy as np
import pytest
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


def test_log2_attention_matches_log_sqrt2_dequant():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(2, 3, 10, 10) * 2, dim=-1)
    v = torch.randint(0, 16, (2, 3, 10, 8))
    s_attn, z_v, s_v, bits = 0.6, 8, 0.1, 4
    codes, dead = ops.log_sqrt2_codes(p.numpy(), s_attn, bits)
    tc, tdead = log_codes(p, torch.tensor(s_attn), bits, sqrt2=True)
    assert np.array_equal(codes[~dead], tc.numpy().astype(np.int32)[~dead]) and np.array_equal(dead, tdead.numpy())
    f = ops.attn_frac_bits(10, bits)
    assert f == 14 and ops.attn_groups(bits, f) == 2  # plane 1: the odd codes' low bits
    acc = ops.attn_v_acc(ops.attn_weights(codes, dead, f), v.numpy(), z_v, f, bits)
    unit = s_attn * s_v / 2 ** (f + ops.ATTN_EXTRA_BITS)
    out = acc * unit
    # even weights are exact, odd ones off by ≤ ½ of 2^−(2F+1): ≤ 2^(G−F−2)·|v − z| units per token; float64 exact
    a = np.where(dead, 0.0, s_attn * 2.0 ** (-codes / 2))
    exact = a @ ((v.numpy().astype(np.float64) - z_v) * s_v)
    bound = 2.0 ** (ops.ATTN_EXTRA_BITS - f - 2) * np.abs(v.numpy() - z_v).sum(-2, keepdims=True) * unit
    assert np.all(np.abs(out - exact) <= bound) and bound.max() < 1e-7 * np.abs(exact).max()
    # the float32 PyTorch dequant graph: also its own rounding (≤ (N + 2)·2^-24 of Σ|â||v̂|)
    ref = (log_dequant(tc, tdead, s_attn, True) @ ((v - z_v).float() * s_v)).numpy()
    float_err = (10 + 2) * 2.0 ** -24 * (np.abs(a) @ np.abs((v.numpy() - z_v) * s_v))
    assert np.all(np.abs(out - ref) <= bound + float_err)
    assert np.abs(ref).max() > 1e6 * unit  # the comparison is not vacuous


def test_attention_weights_split_the_rounded_powers_into_two_planes():
    f = 5
    codes = np.arange(0, 2 * (2 * f + 1) + 3)[None]  # every shift of both planes and a little past them
    dead = np.zeros_like(codes, bool)
    dead[0, 4] = True
    w = ops.attn_weights(codes, dead, f, sqrt2=True, groups=2).astype(np.int64)[:, 0]
    s = (codes[0] + 1) // 2
    for c in range(codes.shape[1]):
        whole = 0 if c == 4 or s[c] > 2 * f + 1 else int(np.floor(2.0 ** (2 * f + 1 - c / 2) + 0.5))
        assert list(w[:, c]) == [whole >> (f + 1), whole % 2 ** (f + 1)], (c, list(w[:, c]), whole)
        if c % 2 == 0 and s[c] <= f and c != 4:
            assert list(w[:, c]) == [2 ** (f - s[c]), 0]  # even codes: the exact power of two, in plane 0
    # plain log2 (m = 1, no odd codes): shift = code
    w2 = ops.attn_weights(np.array([[0, 3, 5, 6, 11, 12]]), np.zeros((1, 6), bool), f, sqrt2=False, groups=2)
    assert w2.shape == (2, 1, 6) and list(w2[0, 0]) == [32, 4, 1, 0, 0, 0] and list(w2[1, 0]) == [0, 0, 0, 32, 1, 0]
    with pytest.raises(ValueError, match="one weight plane"):
        ops.attn_weights(np.array([[1]]), np.zeros((1, 1), bool), f, sqrt2=True, groups=1)


def test_attention_acc_combines_the_planes_exactly():
    """acc = S_0·2^G + S_1·2^(G−F−1) = Σ W·(v − z)·2^(G−F−1), W = round(2^(2F+1−c/2)), on a small case."""
    f, g = 5, ops.ATTN_EXTRA_BITS
    codes, dead = np.array([[0, 1, 3, 12, 13]]), np.zeros((1, 5), bool)
    v = np.array([[8 + 7], [8 - 5], [8 + 3], [8 + 6], [8 - 2]])
    acc = ops.attn_v_acc(ops.attn_weights(codes, dead, f, True, 2), v, 8, f, v_bits=4)
    whole = [int(np.floor(2.0 ** (2 * f + 1 - c / 2) + 0.5)) for c in codes[0]]
    expect = sum(wc * int(vc - 8) for wc, vc in zip(whole, v[:, 0])) << (g - f - 1)
    assert int(acc[0, 0]) == expect


def test_attn_frac_bits_keep_int32():
    """The largest F ≤ 14 with N·(2^b − 1)·(2^(F+1) − 1) < 2^31 (the largest weight: plane 1's F + 1 bits)."""
    for n in (1, 2, 16, 49, 65, 197, 3136, 100_000):
        for b in (4, 6, 8):
            f = ops.attn_frac_bits(n, b)
            assert 1 <= f <= 14 and n * (2 ** b - 1) * ops.attn_max_weight(f) < 2 ** 31
            assert f == 14 or n * (2 ** b - 1) * ops.attn_max_weight(f + 1) >= 2 ** 31
    assert ops.attn_frac_bits(197) == ops.attn_frac_bits(197, 8) == 14
    assert ops.attn_frac_bits(3136, 8) == 10 and ops.sqrt2_weight(14) == 23170
    assert abs(ops.SQRT2_FIXED / 2 ** ops.SQRT2_Q - math.sqrt(2)) < 2 ** -29
