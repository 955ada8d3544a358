"""Integer semantics of every quantized op, in NumPy: the oracle the TVM kernels must match bit for bit.

The integer program (issue 3) computes exactly this:

- quantize (float → codes): q = clamp(round_half_even(x / s) + z, 0, 2^b − 1), as uint8.
- linear / patch embedding: int32 acc[m, n] = Σ_k (a[m, k] − z_a)·(w[n, k] − z_w[n]), evaluated as
  u8 × s8 with the weight offset by `weight_offset(...)` and the zero points folded into precomputed
  corrections; output float y = acc · (s_a·s_w[n]) + bias[n].
- q @ kᵀ: int32 Σ_d (q − z_q)·(k − z_k); logits = acc · (s_q·s_k·softmax_scale).
- post-Softmax log√2 codes: c = clamp(round(−2·log2(p / s)), 0, 2^b − 1), underflow (code > 2^b − 1
  or p = 0) marked as "no contribution".
- attn @ V as an integer dot product: a right shift by s is a multiply by 2^−s. Each log√2 code c (shift
  s = ⌈c/2⌉; log2: s = c) becomes the integer W = 2^(2F + 1 − c/m) (m = 2 for log√2, 1 for log2) in units of
  2^−(2F+1): exact for even codes, rounded once (half up, from the Q30 √2) for odd ones (`attn_weights`), with
  F = attn_frac_bits(N, b_v) ≤ 14.  Its high part W >> (F + 1) (≤ 2^14, exact 2^(F − s) for even codes) goes to
  plane 0, its low F + 1 bits to plane 1 (0 for even codes with s ≤ F; the whole W past s = F: only codes of more
  than 4 bits).  S_p[m, d] = Σ_n w_p[m, n]·(v[n, d] − z_v) exactly in int32 per plane (`attn_v_acc`: one int16
  dot product, vpdpwssd / vpmaddwd / smlal, or udot on the weights' two bytes), then acc = (S_0 << G) +
  (S_1 << (G − F − 1)) in int64 (G = ATTN_EXTRA_BITS; < 2^62); out = float32(acc) · float32(s_attn·s_v / 2^(F+G)).
  An odd code's weight is off by at most 2^−(2F+2) of s_attn (2^−30 at F = 14): float32's own rounding of the
  output is coarser, as in the float model.  Shifts past 2F + 1 (p̂ < 2^−29·s_attn at F = 14) count as underflow.
  (Until 2026-12 even and odd codes had a plane each, the odd sum times √2 once per output, and the low plane
  only held shifts past F: three planes for 8-bit codes, two now, with the same agreement with the float model.)
"""

from __future__ import annotations

import math

import numpy as np

SQRT2_Q = 30  # fractional bits of the √2 constant
SQRT2_FIXED = int(round(math.sqrt(2) * (1 << SQRT2_Q)))


def quantize(x: np.ndarray, scale, zero_point, bits: int) -> np.ndarray:
    """Float → unsigned codes (round half to even, like torch.round and LLVM's roundeven)."""
    x = np.asarray(x, dtype=np.float32)
    q = np.round(x / np.float32(scale)) + np.float32(zero_point)
    return np.clip(q, 0, 2 ** bits - 1).astype(np.int32)


def weight_codes(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, bits: int) -> np.ndarray:
    """Per-output-channel weight codes; scale / zero_point have one entry per row of w."""
    s = np.asarray(scale, np.float32).reshape(-1, *([1] * (w.ndim - 1)))
    z = np.asarray(zero_point, np.float32).reshape(-1, *([1] * (w.ndim - 1)))
    return quantize(w, s, z, bits)


def weight_offset(zero_point: np.ndarray, bits: int) -> np.ndarray:
    """Per-channel offset o[n] making w − o fit int8: the zero point itself below 8 bits, 128 at 8 bits
    (an 8-bit asymmetric code minus its zero point can reach ±255)."""
    z = np.asarray(zero_point).reshape(-1).astype(np.int32)
    return z if bits < 8 else np.full_like(z, 128)


def qlinear_acc(a: np.ndarray, z_a: int, w: np.ndarray, z_w: np.ndarray, bits_w: int) -> np.ndarray:
    """int32 Σ_k (a − z_a)(w − z_w) computed the way the kernel does: u8·s8 dot plus corrections.

    With w' = w − o (int8) and c = o − z_w: acc = a·w'ᵀ + c·Σa − z_a·Σw' − z_a·c·K.
    """
    a = a.astype(np.int64)
    o = weight_offset(z_w, bits_w).astype(np.int64)
    w8 = w.astype(np.int64) - o[:, None]
    assert w8.min() >= -128 and w8.max() <= 127, "weight codes do not fit int8 after the offset"
    c = o - np.asarray(z_w).reshape(-1).astype(np.int64)
    k = a.shape[-1]
    acc = a @ w8.T + a.sum(-1, keepdims=True) * c - z_a * w8.sum(-1) - z_a * c * k
    assert np.abs(acc).max(initial=0) < 2 ** 31, "int32 accumulator overflow"
    return acc.astype(np.int32)


def qmatmul_acc(a: np.ndarray, z_a: int, b: np.ndarray, z_b: int) -> np.ndarray:
    """int32 Σ (a − z_a)(b − z_b) for batched a [..., M, K], b [..., K, N] (q @ kᵀ)."""
    acc = (a.astype(np.int64) - z_a) @ (b.astype(np.int64) - z_b)
    assert np.abs(acc).max(initial=0) < 2 ** 31, "int32 accumulator overflow"
    return acc.astype(np.int32)


def log_sqrt2_codes(p: np.ndarray, scale, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes of the log√2 quantizer and the mask of entries that contribute nothing.  (The compiled kernel that
    fuses the softmax computes the same codes from the logits in the log domain, `kernels.log_weights`: equal
    except where −2·log2(p/s) lies within float32 rounding of a midpoint.)"""
    p = np.asarray(p, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = np.round(np.float32(-2.0) * np.log2(p / np.float32(scale)))
    dead = ~(raw <= 2 ** bits - 1)  # also NaN / +inf for p == 0
    codes = np.clip(np.nan_to_num(raw, nan=0.0, posinf=0.0), 0, 2 ** bits - 1).astype(np.int32)
    return codes, dead


ATTN_MAX_F = 14  # 2^14: the largest power of two an int16 weight holds
ATTN_EXTRA_BITS = 16  # G: acc's fractional bits below 2^−F (plane 1 enters shifted left by G − F − 1 ≥ 1)


def attn_frac_bits(tokens: int, v_bits: int = 8) -> int:
    """F of the attention weights: the largest F ≤ 14 for which N·(2^b − 1)·`attn_max_weight`(F) < 2^31, so that
    no Σ_n w·(v − z_v) over N tokens of b-bit V codes (|v − z_v| ≤ 2^b − 1) leaves int32.  14 for the 197 tokens
    of DeiT at 8 bits; 10 for 3136 tokens at 8 bits."""
    if not 1 <= v_bits <= 8:
        raise ValueError(f"V codes of {v_bits} bits")
    bound = max(int(tokens), 1) * ((1 << v_bits) - 1)
    for f in range(ATTN_MAX_F, 0, -1):
        if bound * attn_max_weight(f) < 1 << 31:
            return f
    raise ValueError(f"{tokens} tokens of {v_bits}-bit V leave no fractional bit")


def attn_max_weight(f: int) -> int:
    """The largest weight in any plane: 2^(F + 1) − 1 (plane 1's F + 1 bits; plane 0 holds at most 2^F)."""
    return (1 << (f + 1)) - 1


def sqrt2_weight(f: int) -> int:
    """round(√2·2^F) from the Q30 constant (23170 for F = 14), rounded once, half up."""
    return (SQRT2_FIXED + (1 << (SQRT2_Q - f - 1))) >> (SQRT2_Q - f)


def attn_groups(bits: int, f: int, sqrt2: bool = True) -> int:
    """Weight planes: 1 when every weight is a whole 2^(F − s) (log2 codes with every shift ≤ F), else 2 (plane 1
    holds odd log√2 codes' low bits and the weights of shifts F + 1 … 2F + 1)."""
    return 1 if not sqrt2 and 2 ** bits - 1 <= f else 2


def attn_weights(codes: np.ndarray, dead: np.ndarray, f: int, sqrt2: bool = True, groups: int = 2) -> np.ndarray:
    """int16 weights [..., groups, M, N] of log codes [..., M, N]: W = round(2^(2F + 1 − c/m)) (log√2: shift
    s = ⌈c/2⌉, m = 2, odd codes `sqrt2_weight`(2F + 1 − s); log2: s = c, m = 1, exact) split as W >> (F + 1)
    (plane 0) and W mod 2^(F + 1) (plane 1); 0 when dead or s > 2F + 1.  With one group (log2 codes, every shift
    ≤ F) plane 1 would be 0 and is left out."""
    if not 1 <= f <= ATTN_MAX_F or groups not in (1, 2):
        raise ValueError(f"F = {f} outside [1, {ATTN_MAX_F}] or {groups} groups")
    c = np.asarray(codes).astype(np.int64)
    alive = ~np.asarray(dead)
    s = (c + 1) >> 1 if sqrt2 else c
    odd = ((c & 1) == 1) if sqrt2 else np.zeros(c.shape, bool)
    e = 2 * f + 1 - np.clip(s, 0, 2 * f + 1)  # ≤ 29: sqrt2_weight's shifts stay ≥ 0
    w = np.where(odd, sqrt2_weight(e), np.int64(1) << e)
    w = np.where(alive & (s <= 2 * f + 1), w, 0)
    planes = [w >> (f + 1), w & ((1 << (f + 1)) - 1)]
    if groups == 1 and np.any(planes[1]):
        raise ValueError(f"one weight plane holds no odd log√2 code nor a shift past F = {f}")
    return np.stack(planes[:groups], axis=-3).astype(np.int16)


def attn_shift(plane: int, f: int) -> int:
    """The power of two a plane's sum takes in acc (unit 2^−(F+G)): G for plane 0, G − F − 1 for plane 1."""
    return ATTN_EXTRA_BITS if plane == 0 else ATTN_EXTRA_BITS - f - 1


def attn_term(s, plane: int, f: int):
    """One plane's int64 share of acc (unit 2^−(F+G)): S·2^`attn_shift`; ``s`` int64 NumPy values or TIR
    expressions alike (the kernels' epilogues call it)."""
    return s << attn_shift(plane, f)


def attn_v_acc(weights: np.ndarray, v: np.ndarray, z_v: int, f: int, v_bits: int = 8) -> np.ndarray:
    """acc[..., m, d] (int64) for weights [..., groups, M, N] (`attn_weights`) and `v_bits`-bit V codes
    [..., N, D]: S = Σ_n w[..., plane, m, n]·(v[..., n, d] − z_v) per plane in int32, acc = Σ_planes
    `attn_term`; the float value is acc · s_attn·s_v / 2^(F+G) (G = ATTN_EXTRA_BITS)."""
    top = (1 << v_bits) - 1
    v = np.asarray(v)
    assert 0 <= z_v <= top and v.min(initial=0) >= 0 and v.max(initial=0) <= top, f"V codes exceed {v_bits} bits"
    s = np.asarray(weights).astype(np.int64) @ (v.astype(np.int64) - z_v)[..., None, :, :]
    assert np.abs(s).max(initial=0) < 2 ** 31, "int32 overflow"
    return sum(attn_term(s[..., pl, :, :], pl, f) for pl in range(s.shape[-3]))
