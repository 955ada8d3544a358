"""Elementwise tails a qdense kernel can apply to its float output before storing it: GELU → uint8 codes,
a residual add, the uint8 codes of a quantizer (q/k/v of a fused qkv projection, `qdense_amx`); and TVM's
`fast_exp` as a scalar expression, whose values on x − max the fused softmax of `log_weights` sums.

Why: fc1's float output (197 x 1536 x 4 bytes in DeiT-Small) went to memory, and a separate kernel read it back
for GELU and the next quantizer.  Fused, fc1 stores the 1-byte codes fc2 reads, straight from its accumulators.

The expressions are the unfused path's own: GELU is `passes.fast_math.gelu` (TVM's polynomial erf) and the
codes are TVM's legalization of ``relax.quantize`` (``clip(round(x / s) + z, 0, 255)``, then the canonical
``clip(q, 0, 2^b − 1)`` of b-bit codes), written as one scalar expression with the same operations in the
same order, so a fused kernel stores exactly the codes the unfused kernels did (checked bit for bit).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import tvm

# TVM's `fast_erf_float_expr` (topi.fast_erf, float32): erf(x) ~ x·P(x²)/Q(x²) on x clamped to [-4, 4]
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def _f32(v: float):
    return tvm.tirx.const(v, "float32")


# TVM's `fast_exp_float32` (topi.fast_exp): 2^n · P(f) with n = floor(x·log2 e + ½), f = x − n·ln 2
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def fast_exp(x):
    """TVM's polynomial exp as a scalar expression, operation for operation (checked against `topi.fast_exp` bit for
    bit in `tests/test_pass_qdense_epilogues.py`)."""
    xc = tvm.tirx.max(tvm.tirx.min(x, _f32(88.3762626647950)), _f32(-88.3762626647949))
    return tvm.tirx.max(_exp_of_clamped(xc), x)


def _exp_of_clamped(xc):
    """2^n · P(f) of `fast_exp` for its clamped argument ``xc``."""
    n = tvm.tirx.floor(xc * _f32(1.44269504088896341) + _f32(0.5))
    f = xc - n * _f32(0.6931471805599453)
    y = _f32(_EXP_P[0])
    for c in _EXP_P[1:]:
        y = y * f + _f32(c)
    y = y * f * f + f + _f32(1.0)
    scale = tvm.tirx.reinterpret("float32", (n + _f32(127.0)).astype("int32") << 23)
    return scale * y


def fast_exp_nonpositive(x):
    """`fast_exp` of an ``x`` ≤ 0 (a softmax's x − max), bit for bit, two operations fewer: its upper clamp
    min(x, 88.38) is x, and its last max(2^n·P, x) is 2^n·P (2^n ≥ 0 and P(f) ≈ e^f > 0.7 ≥ 0 ≥ x).

    Summed (the fused softmaxes of `log_weights`, and its unfused kernel alike), the product 2^n·P is no longer kept
    apart from the sum's add by the max: LLVM contracts the two into one FMA, one rounding where there were two (on
    every target here: all have FMA), so a row's sum can differ in its last bit from builds before this form and,
    rarely, a code with it; fused and unfused kernels still agree bit for bit (the same expression, contracted alike,
    `tests/test_pass_fused_attention.py`).  Why: DeiT-Small's fused AMX attention 0.183-0.192 → 0.166-0.174 ms per
    call (`benchmarks/kernel_attention.py`, Sapphire Rapids, 2 threads), the whole W8/A8 model 2-3% faster
    (`compare_artifacts.py`); with the product fenced (`as_stored`: the old sums exactly) 1%."""
    return _exp_of_clamped(tvm.tirx.max(x, _f32(-88.3762626647949)))


def as_stored(x):
    """``x`` rounded to float32 as if stored and read back: an arithmetic fence, so LLVM cannot fuse the multiply
    that made ``x`` into the add that takes it.  Why: TVM's LLVM backend contracts ``a · b + c`` into one FMA (one
    rounding) on x86 and aarch64 alike; where the unfused graph stores the product in one kernel and adds to it in
    the next (Swin's q @ kᵀ, then its relative position bias), a fused kernel must round the product on its own, or a
    logit moves by an ulp and, rarely, a code with it (seen on the Swin fixture at W8/A8)."""
    return tvm.tirx.call_llvm_pure_intrin(x.ty.dtype, "llvm.arithmetic.fence", x)


def fast_erf(x):
    """TVM's polynomial erf as a scalar expression, operation for operation (`tests/test_pass_qdense_epilogues.py` checks
    it against `topi.fast_erf` bit for bit)."""
    xc = tvm.tirx.max(tvm.tirx.min(x, _f32(4.0)), _f32(-4.0))

    def horner(coefficients):
        acc = xc * xc * _f32(coefficients[0]) + _f32(coefficients[1])
        for c in coefficients[2:]:
            acc = xc * xc * acc + _f32(c)
        return acc

    return xc * horner(_ERF_P) / horner(_ERF_Q)


def gelu(y):
    """`passes.fast_math.gelu` on a scalar expression: ``y · (½ + erf(y/√2)·½)``."""
    return y * (_f32(0.5) + fast_erf(y * _f32(1 / math.sqrt(2))) * _f32(0.5))


def reciprocal_f32(scale: float) -> float:
    """The float32 nearest 1 / float32(scale) (ties to even), from the exact rational: float64 1/s then float32
    would round twice."""
    s = np.float32(scale)
    if not np.isfinite(s) or s == 0:
        raise ValueError(f"no reciprocal of scale {scale}")
    exact = 1 / Fraction(float(s))
    r = np.float32(float(exact))
    candidates = [np.nextafter(r, np.float32(-np.inf)), r, np.nextafter(r, np.float32(np.inf))]
    return float(min(candidates, key=lambda c: (abs(Fraction(float(c)) - exact), int(c.view(np.int32)) & 1)))


def divide(y, scale: float):
    """float32 ``y / scale`` for a constant ``scale``, bit for bit the division, without the divider (`divide_by`)."""
    q = Quantizer.constant(scale, 0)
    return divide_by(y, q.s, q.r)


def divide_by(y, s, r):
    """float32 ``y / s`` with ``r`` the correctly rounded reciprocal of ``s`` (`reciprocal_f32`; both float32
    expressions: constants or loads), bit for bit the division, without the divider: q = y·r, then one correction
    q + fma(−q, s, y)·r (Markstein's theorem: with r within half an ulp of 1/s and q within an ulp of y/s, the fma
    residual is exact and the corrected quotient is the correctly rounded y/s).  Holds for finite y whose quotient
    and residual stay normal (|y| > 2^−100 or so; below, the two may differ in the last bit of a quotient far below
    any rounding step of a quantizer); y = ±inf gives NaN.  Why: `vdivps` is one per ~10 cycles per vector on the
    CPUs here, the three FMA-port operations are not: the u8 codes of a 197 x 1536 tensor took 28 → 16 us
    (Sapphire Rapids, 2 threads)."""
    q = y * r
    residual = tvm.tirx.call_intrin(q.ty.dtype, "tirx.fma", -q, s, y)
    return tvm.tirx.call_intrin(q.ty.dtype, "tirx.fma", residual, r, q)


class Quantizer(NamedTuple):
    """A layer-wise quantizer as float32 expressions: scale ``s``, its correctly rounded reciprocal ``r``
    (`reciprocal_f32`) and zero point ``z``; constants (`constant`) or loads of a kernel's run-time operand
    (`loaded`, filled with `quantizer_args`).  The codes take the same operations either way, so they are the same;
    why the operand: kernels that differ only in their quantizer (fc1 → GELU → codes of every block of a ViT) are
    then one kernel, compiled once instead of once per layer."""

    s: object
    r: object
    z: object

    @classmethod
    def constant(cls, scale: float, zp: int) -> Quantizer:
        """The values of `quantizer_args` as constants."""
        return cls(*(_f32(float(v)) for v in quantizer_args(scale, zp)))

    @classmethod
    def loaded(cls, quant, *row) -> Quantizer:
        """From a float32 [`QUANT`] buffer (a TE placeholder or a TIR buffer), or row ``row`` of one of several."""
        return cls(*(quant[(*row, i)] for i in range(QUANT)))

    @classmethod
    def column(cls, quant, n) -> Quantizer:
        """Column ``n``'s of a float32 [`QUANT`, N] buffer (row i: element i of every column's quantizer)."""
        return cls(*(quant[i, n] for i in range(QUANT)))


QUANT = 3  # elements of a kernel's run-time quantizer operand: (s, r, z)


def quantizer_args(scale: float, zp: int) -> np.ndarray:
    """The run-time quantizer operand of (``scale``, ``zp``): float32 [s, 1/s correctly rounded, z] (`Quantizer`)."""
    s = np.float32(scale)
    return np.array([s, reciprocal_f32(float(s)), zp], np.float32)


def quantize_codes(y, q: Quantizer, top: int):
    """uint8 code of ``y`` under the layer-wise quantizer ``q``, clipped to ``top``: TVM's legalization of
    ``relax.quantize`` (``clip(round(y / s) + z, 0, 255)``), then the canonical ``clip(code, 0, top)``."""
    v = tvm.tirx.max(tvm.tirx.min(tvm.tirx.round(divide_by(y, q.s, q.r)) + q.z, _f32(255.0)), _f32(0.0))
    code = v.astype("uint8")
    if top < 255:
        code = tvm.tirx.min(code, tvm.tirx.const(top, "uint8"))
    return code


def codes(y, scale: float, zp: int, top: int):
    """uint8 code of ``y`` under the constant layer-wise quantizer (``scale``, ``zp``), clipped to ``top``."""
    return quantize_codes(y, Quantizer.constant(scale, zp), top)


ZERO_POINT = "z"  # the ``minus`` of a codes operand that subtracts the quantizer's own zero point (`as_operand`)


def as_operand(code, operand: tuple[str, int | str] | None, zero=None):
    """A uint8 code as the next qdense kernel reads its activations (`kernels.qdense` variants): ``(dtype, minus)``
    = int16 ``code − minus`` (the int16 kernels' centred codes) or int8 ``code − minus`` (sdot's shifted codes); None:
    the code itself.  The same cast and subtraction as the ops `passes.quantized_linear` emits for it.  ``minus`` =
    `ZERO_POINT`: the zero point ``zero`` of the quantizer that made the code (a float32 expression holding an
    integer, `Quantizer.z`: read at run time, so the same kernel serves every layer's centred codes)."""
    if operand is None:
        return code
    dtype, minus = operand
    if minus == ZERO_POINT:
        if zero is None:
            raise ValueError("a codes operand that subtracts the zero point needs the quantizer's")
        sub = zero.astype("int16")
    else:
        sub = tvm.tirx.const(int(minus), "int16")
    value = code.astype("int16") - sub
    return value if dtype == "int16" else value.astype(dtype)


def tail(y, codes: tuple[Quantizer, int] | None = None, res=None, operand: tuple[str, int | str] | None = None):
    """What a qdense epilogue stores for its float result ``y``: ``res + y`` (a residual add: IEEE addition
    commutes, so either operand order of the add it replaces), the codes of GELU of ``y`` (``codes`` = (quantizer,
    top code), `quantize_codes`; ``operand``: as the next kernel reads them, `as_operand`), or ``y``."""
    if res is not None:
        return res + y
    return y if codes is None else as_operand(quantize_codes(gelu(y), *codes), operand, codes[0].z)
