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
  s = ⌈c/2⌉) becomes the exact int16 weight 2^(F − s) in the sum of its parity p = c mod 2 (`attn_weights`),
  with F = attn_frac_bits(N, b_v) ≤ 14 (2^14 fits int16, and no sum over N tokens of b_v-bit V leaves int32).
  S_p[m, d] = Σ_n w_p[m, n]·(v[n, d] − z_v) exactly in int32 (`attn_v_acc`: one int16 dot product,
  vpdpwssd / vpmaddwd / smlal, or udot on the weights' two bytes), then one fixed-point √2 multiply per output, rounded to nearest with
  G = ATTN_EXTRA_BITS more fractional bits: acc = (S_0 << G) + ((S_1 · SQRT2_FIXED + 2^(Q−G−1)) >> (Q−G)) in
  int64 (< 2^62); out = float32(acc) · float32(s_attn·s_v / 2^(F+G)). The √2 product keeps 2^−(F+G) of
  s_attn·s_v: float32's own rounding of the output is coarser, as in the float model.
  Codes with shifts past F (only from codes of more than 4 bits) go to one more plane with weights
  2^(2F + 1 − c/2), odd codes rounded once (these p̂ are below 2^−F·s_attn: an error of 2^−(2F+2)·s_attn at
  most), whose sum enters acc shifted right by F + 1 (`attn_groups`, `attn_term`); shifts past 2F + 1
  (p̂ < 2^−29·s_attn at F = 14) count as underflow.
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
ATTN_EXTRA_BITS = 16  # fractional bits kept below 2^−F by the √2 product (int64: 2^31·√2·2^30 < 2^63)


def attn_frac_bits(tokens: int, v_bits: int = 8) -> int:
    """F of the attention weights: the largest F ≤ 14 for which N·(2^b − 1)·round(√2·2^F) < 2^31, so that no
    Σ_n w·(v − z_v) over N tokens of b-bit V codes (|v − z_v| ≤ 2^b − 1, w ≤ round(√2·2^F)) leaves int32.
    14 for the 197 tokens of DeiT at 8 bits; 10 for 3136 tokens at 8 bits."""
    if not 1 <= v_bits <= 8:
        raise ValueError(f"V codes of {v_bits} bits")
    bound = max(int(tokens), 1) * ((1 << v_bits) - 1)
    for f in range(ATTN_MAX_F, 0, -1):
        if bound * sqrt2_weight(f) < 1 << 31:
            return f
    raise ValueError(f"{tokens} tokens of {v_bits}-bit V leave no fractional bit")


def sqrt2_weight(f: int) -> int:
    """round(√2·2^F) from the Q30 constant (23170 for F = 14)."""
    return (SQRT2_FIXED + (1 << (SQRT2_Q - f - 1))) >> (SQRT2_Q - f)


def attn_groups(bits: int, f: int, sqrt2: bool = True) -> int:
    """Shift groups the weights need: 1 when every shift of a `bits`-bit code is ≤ F (4-bit log√2 codes:
    shifts ≤ 8), else 2 (the second holds shifts F + 1 … 2F + 1)."""
    top = 2 ** bits - 1
    return 1 if ((top + 1) // 2 if sqrt2 else top) <= f else 2


def attn_planes(parities: int, groups: int) -> int:
    """Weight planes: the parities of group 0, plus one plane for group 1 (both parities merged)."""
    return parities + (groups - 1)


def attn_weights(codes: np.ndarray, dead: np.ndarray, f: int, sqrt2: bool = True, groups: int = 1) -> np.ndarray:
    """int16 weights [..., planes, M, N] of log codes [..., M, N] with shift s (log√2: s = ⌈c/2⌉, parity
    c mod 2, P = 2; log2: s = c, P = 1); 0 in every plane but the code's, and everywhere when dead or s > 2F + 1.

    - group 0, s ≤ F, plane = parity: 2^(F − s), exact;
    - group 1, F < s ≤ 2F + 1 (p̂ < 2^−F·s_attn, codes of more than 4 bits), plane P: 2^(2F + 1 − c/m)
      (m = 2 for log√2, 1 for log2), odd codes rounded once, half up: (round(√2·2^F) + 2^(r−1)) >> r with
      r = s − F − 1. Its sum enters acc shifted right by F + 1 (`attn_term`).
    """
    if not 1 <= f <= ATTN_MAX_F or groups not in (1, 2):
        raise ValueError(f"F = {f} outside [1, {ATTN_MAX_F}] or {groups} groups")
    c = np.asarray(codes).astype(np.int64)
    alive = ~np.asarray(dead)
    s = (c + 1) >> 1 if sqrt2 else c
    odd = ((c & 1) == 1) if sqrt2 else np.zeros(c.shape, bool)
    w0 = np.where(alive & (s <= f), 1 << np.clip(f - s, 0, f), 0)
    planes = [np.where(odd == bool(p), w0, 0) for p in range(2 if sqrt2 else 1)]
    if groups == 2:
        r = np.clip(s - f - 1, 0, f + 1)
        w1 = np.where(odd, (sqrt2_weight(f) + ((1 << r) >> 1)) >> r, (1 << f) >> r)
        planes.append(np.where(alive & (s > f) & (s <= 2 * f + 1), w1, 0))
    return np.stack(planes, axis=-3).astype(np.int16)


def attn_term(s: np.ndarray, plane: int, parities: int, f: int) -> np.ndarray:
    """One plane's int64 share of acc (unit 2^−(F+G)): group 0 even S·2^G, odd the √2 product rounded to
    nearest; group 1 (plane P) S·2^(G − F − 1), its √2 already in the weights."""
    g, q = ATTN_EXTRA_BITS, SQRT2_Q - ATTN_EXTRA_BITS
    if plane >= parities:
        return s << (g - f - 1)
    if plane == 0:
        return s << g
    return (s * SQRT2_FIXED + (1 << (q - 1))) >> q


def attn_v_acc(weights: np.ndarray, v: np.ndarray, z_v: int, f: int, v_bits: int = 8,
               parities: int = 2) -> np.ndarray:
    """acc[..., m, d] (int64) for weights [..., groups·P, M, N] (`attn_weights`) and `v_bits`-bit V codes
    [..., N, D]: S = Σ_n w[..., plane, m, n]·(v[..., n, d] − z_v) per plane in int32, acc = Σ_planes
    `attn_term`; the float value is acc · s_attn·s_v / 2^(F+G) (G = ATTN_EXTRA_BITS)."""
    top = (1 << v_bits) - 1
    v = np.asarray(v)
    assert 0 <= z_v <= top and v.min(initial=0) >= 0 and v.max(initial=0) <= top, f"V codes exceed {v_bits} bits"
    s = np.asarray(weights).astype(np.int64) @ (v.astype(np.int64) - z_v)[..., None, :, :]
    assert np.abs(s).max(initial=0) < 2 ** 31, "int32 overflow"
    return sum(attn_term(s[..., pl, :, :], pl, parities, f) for pl in range(s.shape[-3]))
