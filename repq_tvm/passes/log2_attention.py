"""Lower ``attn @ V`` with a log-quantized attention to integer shifts (`repq_tvm.kernels.shift_attention`).

Matches, in the canonical form (see `repq_tvm.frontends`):

    â  = call_pure_packed("repq.log_sqrt2_fake_quant" | "repq.log2_fake_quant", p, s (f32 const), b)
    v̂  = dequantize(v_codes, s_v, z_v)                  layer-wise (scalar) s_v / z_v, non-constant uint8 codes
                                                         (v_codes = clip(quantize(..), 0, 2^b − 1) ⇒ b-bit V)
    y  = matmul(â, v̂)                                    float32, static shapes, rank ≥ 3, same leading dims

and emits

    code = round(−m·log2(p / s)), or −1 where it exceeds 2^b − 1 (m = 2 for log√2, 1 for log2), int32,
           from p's exponent and mantissa bits with compile-time thresholds (`code_thresholds`)
    y    = call_tir(shift kernel, [code, v_codes, z_v, s·s_v/2^F])   leading dims folded into one batch,
           F = frac_bits(N, b): the fewer V bits, the more fractional bits fit the kernel's 32-bit sums

The code computation is one elementwise TE function (TVM fuses it into the softmax loop); −1 marks entries the
quantizer sends to 0 (underflow, p = 0).  The kernel computes `reference.ops.log2_attn_v` exactly: right
shifts of integer V, even and odd codes summed apart in int32, one √2 fixed-point multiply and one float
multiply per output.  Other uses of the log quantizer (if any) keep the original call.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax, te
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..frontends.canonical import log_call_params
from ..reference.ops import frac_bits
from ..relax_util import activation_dequant, batched_matmul_shapes, code_bits, follow, rewrite_pass
from ..relax_util import is_op as _is_op
from ..relax_util import static_shape as _static_shape


def code_thresholds(scale: float, sqrt2: bool) -> tuple[int, list[int]]:
    """(offset, mantissa thresholds) so that for a normal float32 p = 2^(e−127)·(1 + mant/2^23):

        round(−m·log2(p/s)) = −m·(e − 127) + offset + #{k : mant ≤ thresholds[k]}

    With A = m·log2(s) = Li + Lf (Li integer, 0 ≤ Lf < 1) and t = −m·log2(1 + mant/2^23) ∈ (−m, 0],
    round(Lf + t) = −m + #{k ∈ {−m + ½, …, ½} : Lf + t ≥ k}, and Lf + t ≥ k ⇔ 1 + mant/2^23 ≤ 2^((Lf − k)/m).
    Computed in float64 at compile time; exact except where float32 log2 itself rounds across a boundary.
    """
    m = 2 if sqrt2 else 1
    a = m * math.log2(float(np.float32(scale)))
    li = math.floor(a)
    lf = a - li
    thresholds = []
    for i in range(m + 1):
        k = -m + 0.5 + i
        bound = (2.0 ** ((lf - k) / m) - 1.0) * 2 ** 23
        thresholds.append(int(min(max(math.floor(bound), -1), 2 ** 23)))
    return li - m, thresholds


def log_codes(bb: relax.BlockBuilder, p: relax.Expr, scale: float, bits: int, sqrt2: bool) -> relax.Expr:
    """int32 log codes of p (−1 where the quantizer outputs 0) from p's float32 exponent and mantissa bits.

    No log per element (libm's logf does not vectorize and cost ~15 ns per attention entry): integer
    shifts, masks and compares (`code_thresholds`). Zero, negative and subnormal p count as dead: their
    codes are past every shift the kernel keeps.
    """
    m = 2 if sqrt2 else 1
    offset, thresholds = code_thresholds(scale, sqrt2)
    top = 2 ** bits - 1

    def compute(x: te.Tensor) -> te.Tensor:
        def code(*i):
            b = tvm.tirx.reinterpret("int32", x[i])
            mant = b & 0x7FFFFF
            raw = -m * ((b >> 23) - 127) + offset
            for t in thresholds:
                raw = raw + tvm.tirx.Select(mant <= t, 1, 0)
            dead = tvm.tirx.Or(b <= 0x7FFFFF, raw > top)
            return tvm.tirx.Select(dead, -1, tvm.tirx.max(raw, 0))

        return te.compute(x.shape, code, name="log_codes")

    return bb.emit_te(compute, p, primfunc_name_hint="log_codes")


def v_code_bits(codes, z_v: int) -> int:
    """Bits b such that the V codes and z_v lie in [0, 2^b − 1]: from the canonical clip(q, lo, hi) on the
    codes (`frontends.canonical.uniform_qdq` emits one when b < 8), else 8 (any uint8)."""
    return max(code_bits(codes), int(z_v).bit_length())


def shift_attention_call(bb: relax.BlockBuilder, codes: relax.Expr, v: relax.Expr, z_v: int, s_attn: float,
                         s_v: float, sqrt2: bool, target, kernels: dict, v_bits: int = 8) -> relax.Expr:
    """Emit the kernel on int32 codes [.., M, N] and `v_bits`-bit uint8 V codes [.., N, D]; returns float32
    [.., M, D].

    `kernels` caches one PrimFunc per (shape, sqrt2, v_bits): zero point and scale are run-time operands.
    """
    from ..kernels.shift_attention import shift_attention_primfunc

    c_shape, v_shape = _static_shape(codes), _static_shape(v)
    lead, (m, n), d = c_shape[:-2], c_shape[-2:], v_shape[-1]
    bt = int(np.prod(lead, dtype=np.int64))
    f = frac_bits(n, v_bits)
    key = (bt, m, n, d, sqrt2, v_bits)
    if key not in kernels:
        func, name = shift_attention_primfunc(bt, m, n, d, target, sqrt2=sqrt2, f=f, v_bits=v_bits)
        kernels[key] = bb.add_func(func, name)
    if len(lead) != 1:
        codes = bb.emit(relax.op.reshape(codes, [bt, m, n]))
        v = bb.emit(relax.op.reshape(v, [bt, n, d]))
    scale = np.float32(np.float64(s_attn) * np.float64(s_v) / 2.0 ** f)
    params = [relax.const(np.array([z_v], np.int32)), relax.const(np.array([scale], np.float32))]
    out = relax.call_tir(kernels[key], [codes, v, *params], relax.TensorType((bt, m, d), "float32"))
    return out if len(lead) == 1 else relax.op.reshape(bb.emit(out), [*lead, m, d])


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target):
        super().__init__(mod)
        self.target, self.rewritten, self.kernels = target, 0, {}

    def _log_quant(self, expr):
        """(p, s, bits, sqrt2) of a canonical log-quantizer call on float32, else None."""
        params = log_call_params(follow(self, expr))
        if params is None or params[0].ty.dtype != "float32" or not 1 <= params[2] <= 8 or params[1] <= 0:
            return None
        return params

    def _dequant(self, expr):
        """(codes, s_v, z_v, v_bits) of a layer-wise dequantize of non-constant uint8 codes, else None."""
        parts = activation_dequant(self, expr)
        if parts is None:
            return None
        codes, s, z = parts
        return codes, s, z, v_code_bits(follow(self, codes), z)

    def _match(self, call):
        if not _is_op(call, "relax.matmul") or call.ty.dtype != "float32":
            return None
        lq, dq = self._log_quant(call.args[0]), self._dequant(call.args[1])
        if lq is None or dq is None:
            return None
        if batched_matmul_shapes(lq[0], dq[0]) is None:
            return None
        return lq, dq

    def visit_call_(self, call):
        call = super().visit_call_(call)
        parts = self._match(call)
        if parts is None:
            return call
        (p, s_attn, bits, sqrt2), (v, s_v, z_v, v_bits) = parts
        codes = log_codes(self.builder_, p, s_attn, bits, sqrt2)
        self.rewritten += 1
        return shift_attention_call(self.builder_, codes, v, z_v, s_attn, s_v, sqrt2, self.target, self.kernels,
                                    v_bits)


LowerLog2Attention = rewrite_pass(
    "LowerLog2Attention", _Rewriter,
    "matmul(log-quantized attention, dequantized V) → log codes + integer shift kernel `repq_shift_attn`.")
