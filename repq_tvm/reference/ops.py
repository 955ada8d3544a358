"""Integer semantics of every quantized op, in NumPy: the oracle the TVM kernels must match bit for bit.

The integer program (issue 3) computes exactly this:

- quantize (float → codes): q = clamp(round_half_even(x / s) + z, 0, 2^b − 1), as uint8.
- linear / patch embedding: int32 acc[m, n] = Σ_k (a[m, k] − z_a)·(w[n, k] − z_w[n]), evaluated as
  u8 × s8 with the weight offset by `weight_offset(...)` and the zero points folded into precomputed
  corrections; output float y = acc · (s_a·s_w[n]) + bias[n].
- q @ kᵀ: int32 Σ_d (q − z_q)·(k − z_k); logits = acc · (s_q·s_k·softmax_scale).
- post-Softmax log√2 codes: c = clamp(round(−2·log2(p / s)), 0, 2^b − 1), underflow (code > 2^b − 1
  or p = 0) marked as "no contribution".
- attn @ V as shifts: with b_v-bit V codes (|Vz| ≤ 2^b_v − 1 for Vz = v − z_v) and F = frac_bits(N, b_v)
  fractional bits, t_j = (Vz_j · 2^F) >> ⌈c_j/2⌉ (arithmetic shift, i.e. floor), S_even = Σ_{c_j even} t_j,
  S_odd = Σ_{c_j odd} t_j (int32), then one fixed-point √2 multiply per output, rounded to nearest:
  acc = S_even + ((S_odd · SQRT2_FIXED + 2^(Q−1)) >> Q) in int64 (int32 range); out = acc · s_attn·s_v / 2^F.
  Shifts past F + b_v would leave only the sign bit of t_j: those entries count as underflow too.
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
    """Codes of the log√2 quantizer and the mask of entries that contribute nothing."""
    p = np.asarray(p, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = np.round(np.float32(-2.0) * np.log2(p / np.float32(scale)))
    dead = ~(raw <= 2 ** bits - 1)  # also NaN / +inf for p == 0
    codes = np.clip(np.nan_to_num(raw, nan=0.0, posinf=0.0), 0, 2 ** bits - 1).astype(np.int32)
    return codes, dead


def frac_bits(tokens: int, v_bits: int = 8) -> int:
    """The largest F (fractional bits of the shifted V) for which no sum over `tokens` can overflow.

    With |Vz| ≤ 2^b − 1 (b = `v_bits`) the binding limit is the shift kernel's biased uint32 sums,
    Σ_n (Vz_n + 2^b)·2^F ≤ N·(2^(b+1) − 1)·2^F < 2^32; it implies every int32 quantity of `log2_attn_v`:
    Σ_n |Vz_n|·2^F ≤ N·(2^b − 1)·2^F < 2^31 − N·2^(F−1) bounds S_even, S_odd and, for F ≥ 1, also the
    rounded acc (each token adds at most |Vz|·2^F to |acc|, the √2 step at most 1 more).  Also F + b + 1 ≤ 31
    (the kernel's largest shift count, and 2^(F+b) in uint32).  N < 2 counts as 2.  F = 16 for (65, 8),
    21 for (65, 4), 15 for (197, 8).
    """
    n = max(int(tokens), 2)
    if not 1 <= v_bits <= 8:
        raise ValueError(f"V codes of {v_bits} bits")
    f = min(30 - v_bits, (((1 << 32) - 1) // (n * ((2 << v_bits) - 1))).bit_length() - 1)
    if f < 1:
        raise ValueError(f"{tokens} tokens of {v_bits}-bit V leave no fractional bit")
    return f


def log2_attn_v(codes: np.ndarray, dead: np.ndarray, v: np.ndarray, z_v: int, f: int,
                v_bits: int = 8) -> np.ndarray:
    """Integer attn @ V from log√2 codes [..., M, N] and V codes [..., N, D] of `v_bits` bits (v and z_v in
    [0, 2^v_bits − 1]); returns acc (int64 array of int32-range values) whose float value is
    acc · s_attn · s_v / 2^F."""
    top = (1 << v_bits) - 1
    v = np.asarray(v)
    assert 0 <= z_v <= top and v.min(initial=0) >= 0 and v.max(initial=0) <= top, f"V codes exceed {v_bits} bits"
    vz = (v.astype(np.int64) - z_v) << f  # [..., N, D]
    shift = (codes.astype(np.int64) + 1) // 2  # ⌈c/2⌉
    # |Vz|·2^F < 2^(F+b_v): larger shifts leave only the sign, so drop them
    dead = dead | (shift > f + v_bits)
    shift = np.minimum(shift, f + v_bits)
    odd = (codes % 2 == 1) & ~dead
    even = (codes % 2 == 0) & ~dead
    # t[..., m, n, d] = vz[..., n, d] >> shift[..., m, n]
    t = vz[..., None, :, :] >> shift[..., :, :, None]
    s_even = (t * even[..., None]).sum(-2)
    s_odd = (t * odd[..., None]).sum(-2)
    assert max(np.abs(s_even).max(initial=0), np.abs(s_odd).max(initial=0)) < 2 ** 31, "int32 overflow"
    acc = s_even + ((s_odd * SQRT2_FIXED + (1 << (SQRT2_Q - 1))) >> SQRT2_Q)
    assert np.abs(acc).max(initial=0) < 2 ** 31, "int32 overflow"
    return acc
