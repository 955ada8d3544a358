"""Operand layouts of the quantized dense and the constants its epilogue reads.

Why packed: one ``[lanes, kpack]`` weight tile must be one contiguous vector register load (64 bytes
for VNNI, 32 bytes for AVX2).  ``lanes`` is the int32 lane count (16 = zmm, 8 = ymm), ``kpack`` the
number of consecutive k per lane of one instruction (4 for u8 x s8 bytes, 2 for int16 words).
All padding is zeros, so it never changes a result.
"""

from __future__ import annotations

import numpy as np

INT16_PAIR_MAX = 32767  # vpmaddubsw saturates its int16 pair sums above this


def ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def code_bounds(bits_a: int, bits_w: int) -> tuple[int, int]:
    """(max activation code, max |weight|) of the project's codes (`repq_tvm.reference.ops`).

    Activations are unsigned ``[0, 2^b - 1]``; weights are ``w - z_w`` (``|.| <= 2^b - 1``) below
    8 bits and ``w - z_w - d`` (``[-128, 127]``, `weight_offset`) at 8 bits.
    """
    for bits in (bits_a, bits_w):
        if not 1 <= int(bits) <= 8:
            raise ValueError(f"bit widths must be in 1..8, got {bits_a=}, {bits_w=}")
    return 2**bits_a - 1, (128 if bits_w >= 8 else 2**bits_w - 1)


def u8s8_is_exact(bits_a: int, bits_w: int, depth: int = 1) -> bool:
    """True if u8 x s8 through int16 cannot saturate: ``2 * depth * max(a) * max|w| <= 32767``.

    ``depth`` vpmaddubsw results (2 products each) are summed in int16 before widening.  At depth 1
    it fails only for 8-bit activations with 7/8-bit weights; 4/6-bit codes allow depth 4.
    """
    a_max, w_max = code_bounds(bits_a, bits_w)
    return 2 * depth * a_max * w_max <= INT16_PAIR_MAX


def weight_offset(w: np.ndarray) -> np.ndarray:
    """Per-row offset d[n] that makes the centred weights ``w - d`` fit int8, zero where they already do.

    Why: an 8-bit asymmetric weight minus its zero point spans up to +-255, outside the s8 operand of
    vpdpbusd / vpmaddubsw / sdot.  A row's codes span at most 255, so some integer d moves it into
    [-128, 127]; the kernel then adds back ``d[n] * sum_k a[m, k]`` in its epilogue (oneDNN's
    compensation), which is exact: ``sum_k a*(w8 + d) = sum_k a*w8 + d*sum_k a``.
    """
    w = np.asarray(w).astype(np.int64)
    if w.ndim != 2:
        raise ValueError(f"weight_offset wants a 2-D array, got shape {w.shape}")
    if not w.size:
        return np.zeros(w.shape[0], np.int32)
    hi, lo = w.max(axis=1), w.min(axis=1)
    if (hi - lo > 255).any():
        raise ValueError(f"a weight row spans {int((hi - lo).max())} > 255: no int8 offset exists")
    d = np.where(hi > 127, hi - 127, np.where(lo < -128, lo + 128, 0))
    return d.astype(np.int32)


def needs_offset(w: np.ndarray) -> bool:
    """True if the centred weights do not fit int8 (8-bit codes), so an int8 kernel needs compensation."""
    w = np.asarray(w)
    return bool(w.size) and (int(w.min()) < -128 or int(w.max()) > 127)


def pack_weight(w: np.ndarray, lanes: int = 16, kpack: int = 4, dtype=np.int8) -> np.ndarray:
    """``[N, K]`` -> ``[Np/lanes, Kp/kpack, lanes, kpack]`` of ``dtype``; N, K zero-padded.

    ``packed[nb, kb, i, j] = w[nb*lanes + i, kb*kpack + j]``.  Zero rows give zero outputs (dropped),
    zero columns add 0.  Values must fit ``dtype`` (checked: a silent wrap would be a wrong answer).
    """
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype.kind not in "iu":
        raise ValueError(f"pack_weight wants a 2-D integer array, got {w.dtype} {w.shape}")
    info = np.iinfo(dtype)
    if w.size and (w.min() < info.min or w.max() > info.max):
        raise ValueError(f"weights in [{w.min()}, {w.max()}] do not fit {np.dtype(dtype).name}")
    n, k = w.shape
    n_p, k_p = ceil_to(n, lanes), ceil_to(k, kpack)
    padded = np.zeros((n_p, k_p), dtype)
    padded[:n, :k] = w
    packed = padded.reshape(n_p // lanes, lanes, k_p // kpack, kpack).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(packed)


def unpack_weight(packed: np.ndarray, n: int | None = None, k: int | None = None) -> np.ndarray:
    """Inverse of `pack_weight`; ``n``/``k`` drop the padding (default: keep it)."""
    nb, kb, lanes, kpack = packed.shape
    w = packed.transpose(0, 2, 1, 3).reshape(nb * lanes, kb * kpack)
    return np.ascontiguousarray(w[:n, :k])


def pad_activation(a: np.ndarray, kpack: int = 4) -> np.ndarray:
    """uint8 ``[M, K]`` -> ``[M, Kp]`` with zero columns (a plain copy when K % kpack == 0)."""
    a = np.asarray(a)
    if a.dtype != np.uint8 or a.ndim != 2:
        raise ValueError(f"pad_activation wants a 2-D uint8 array, got {a.dtype} {a.shape}")
    out = np.zeros((a.shape[0], ceil_to(a.shape[1], kpack)), np.uint8)
    out[:, : a.shape[1]] = a
    return out


def center_activation(a: np.ndarray, a_zp: int, kpack: int = 2) -> np.ndarray:
    """uint8 codes ``[M, K]`` -> int16 ``a - a_zp`` ``[M, Kp]`` (padding stays 0, not ``-a_zp``).

    The int16 kernel reads centered activations, so its epilogue needs no zero-point correction.
    """
    a = np.asarray(a)
    if a.ndim != 2 or a.dtype.kind not in "iu":
        raise ValueError(f"center_activation wants a 2-D integer array, got {a.dtype} {a.shape}")
    out = np.zeros((a.shape[0], ceil_to(a.shape[1], kpack)), np.int16)
    out[:, : a.shape[1]] = a.astype(np.int32) - int(a_zp)
    return out


def activation_shift(bits_a: int, a_dtype: str = "int8") -> int:
    """What a kernel subtracts from the u8 activation codes to get its operand A.

    Only s8 activation operands (sdot: s8 x s8) shift: 8-bit codes (0..255) go in as ``a - 128``;
    codes of at most 7 bits already fit s8 and go in unchanged.  u8 and centered int16 kernels: 0.
    """
    code_bounds(bits_a, 8)  # validates
    return 128 if a_dtype == "int8" and int(bits_a) >= 8 else 0


def shift_activation(a: np.ndarray, shift: int, kpack: int = 4) -> np.ndarray:
    """uint8 codes ``[M, K]`` -> int8 ``a - shift`` ``[M, Kp]`` (padding stays 0); values must fit int8."""
    a = np.asarray(a)
    if a.dtype != np.uint8 or a.ndim != 2:
        raise ValueError(f"shift_activation wants a 2-D uint8 array, got {a.dtype} {a.shape}")
    shifted = a.astype(np.int16) - int(shift)
    if shifted.size and (shifted.min() < -128 or shifted.max() > 127):
        raise ValueError(f"activation codes minus {shift} span [{shifted.min()}, {shifted.max()}], outside int8")
    out = np.zeros((a.shape[0], ceil_to(a.shape[1], kpack)), np.int8)
    out[:, : a.shape[1]] = shifted
    return out


def epilogue_params(w, w_scale, a_scale: float, a_zp: int, bias=None, a_shift: int = 0):
    """Fold the static quantization constants into the 3 per-channel vectors the kernel reads.

    Returns ``(zp_wsum int32[N], scale float32[N], bias float32[N])`` with
    ``zp_wsum[n] = (a_zp - a_shift) * sum_k w[n, k]`` (exact) and ``scale[n] = a_scale * w_scale[n]``,
    so the kernel computes ``(acc - zp_wsum[n]) * scale[n] + bias[n]``: one int subtract per output.
    Pass ``a_zp=0`` for kernels fed centered activations (`center_activation`), and the ``a_shift``
    of kernels fed ``a - a_shift`` (`shift_activation`): their acc is ``sum_k (a - a_shift) * w``.
    """
    w = np.asarray(w)
    if not 0 <= int(a_zp) <= 255:
        raise ValueError(f"activation zero point must be in [0, 255], got {a_zp}")
    if not 0 <= int(a_shift) <= 255:
        raise ValueError(f"activation shift must be in [0, 255], got {a_shift}")
    zp_wsum = (int(a_zp) - int(a_shift)) * w.astype(np.int64).sum(axis=1)
    if np.abs(zp_wsum).max(initial=0) >= 2**31:
        raise OverflowError("a_zp * sum(w) does not fit in int32")
    n = w.shape[0]
    scale = float(a_scale) * np.broadcast_to(np.asarray(w_scale, np.float64), (n,))
    b = np.zeros(n, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(n)
    return zp_wsum.astype(np.int32), scale.astype(np.float32), np.ascontiguousarray(b)


def row_sums(a: np.ndarray) -> np.ndarray:
    """int32 ``sum_k a[m, k]`` (what the compensated kernels compute in-kernel)."""
    return np.asarray(a).astype(np.int64).sum(axis=1).astype(np.int32)


def reference(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """NumPy int64 ``a @ w.T`` (unpadded or padded operands; padding contributes zeros)."""
    k = min(a.shape[1], w.shape[1])
    return a[:, :k].astype(np.int64) @ w[:, :k].astype(np.int64).T
