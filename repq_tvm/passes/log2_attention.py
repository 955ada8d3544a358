"""Lower ``attn @ V`` with a log-quantized attention to an integer dot product (`repq_tvm.kernels.attn_v`).

Matches, in the canonical form (see `repq_tvm.frontends`):

    â  = call_pure_packed("repq.log_sqrt2_fake_quant" | "repq.log2_fake_quant", p, s (f32 const), b)
    v̂  = dequantize(v_codes, s_v, z_v)                  layer-wise (scalar) s_v / z_v, non-constant uint8 codes
                                                         (v_codes = clip(quantize(..), 0, 2^b − 1) ⇒ b-bit V)
    y  = matmul(â, v̂)                                    float32, static shapes, rank ≥ 3, same leading dims

and emits

    w = int16 weights [.., P, M, Np] (`reference.ops.attn_weights`): 2^(F − s) in the plane of the code's
        parity, code = round(−m·log2(p / s)) (m = 2, P = 2 for log√2; m = 1, P = 1 for log2), shift
        s = ⌈code/m⌉ (0 in the other planes, and where the quantizer underflows), computed from p's
        exponent and mantissa bits with compile-time thresholds
    y = call_tir(repq_attn_v kernel, [w, v_codes, z_v, s·s_v/2^(F+G)])   leading dims folded into one batch,
        F = attn_frac_bits(N, b) ≤ 14: the fewer V bits or tokens, the more fractional bits fit int32

The kernel (`repq_tvm.kernels.attn_v`) computes `reference.ops.attn_v_acc` exactly: per parity an int16 dot
product Σ_n w·(v − z_v) in int32 (vpdpwssd on AVX-512 VNNI, vpmaddwd on AVX2, smlal on NEON), one √2
fixed-point multiply and one float multiply per output.
Other uses of the log quantizer (if any) keep the original call.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..frontends.canonical import log_call_params
from ..reference.ops import ATTN_EXTRA_BITS, attn_frac_bits, attn_groups, attn_planes
from ..relax_util import activation_dequant, batched_matmul_shapes, code_bits, follow, rewrite_pass
from ..relax_util import is_op as _is_op
from ..relax_util import static_shape as _static_shape


def log_weights(bb: relax.BlockBuilder, x: relax.Expr, scale: float, bits: int, sqrt2: bool, f: int,
                groups: int, target, softmax: bool) -> relax.Expr:
    """Emit `kernels.log_weights` on x [.., M, N] (the attention probabilities, or with `softmax` the logits
    they are the softmax of); returns int16 [Bt, planes, M, Np] (leading dims folded into Bt)."""
    from ..kernels.attn_v import padded_tokens
    from ..kernels.log_weights import log_weights_primfunc

    shape = _static_shape(x)
    lead, (rows, n) = shape[:-2], shape[-2:]
    bt = int(np.prod(lead, dtype=np.int64))
    if len(lead) != 1:
        x = bb.emit(relax.op.reshape(x, [bt, rows, n]))
    func, name = log_weights_primfunc((bt, rows, n), scale, bits, sqrt2, f, groups, target, softmax=softmax)
    gv = bb.add_func(func, name)
    planes = attn_planes(2 if sqrt2 else 1, groups)
    return bb.emit(relax.call_tir(gv, [x], relax.TensorType((bt, planes, rows, padded_tokens(n)), "int16")))


def v_code_bits(codes, z_v: int) -> int:
    """Bits b such that the V codes and z_v lie in [0, 2^b − 1]: from the canonical clip(q, lo, hi) on the
    codes (`frontends.canonical.uniform_qdq` emits one when b < 8), else 8 (any uint8)."""
    return max(code_bits(codes), int(z_v).bit_length())


def attn_v_call(bb: relax.BlockBuilder, weights: relax.Expr, v: relax.Expr, z_v: int, scale: float, f: int,
                parities: int, target, kernels: dict, v_bits: int = 8) -> relax.Expr:
    """Emit the kernel on int16 weights [Bt, planes, M, Np] (`log_weights`) and `v_bits`-bit uint8 V codes
    [.., N, D] (Bt = the product of the leading dims); returns float32 [.., M, D].

    `kernels` caches one PrimFunc per (shape, parities, F, v_bits): zero point and scale are run-time operands.
    """
    from ..kernels.attn_v import attn_v_primfunc

    (bt, planes, m, _), v_shape = _static_shape(weights), _static_shape(v)
    lead, (n, d) = v_shape[:-2], v_shape[-2:]
    key = (bt, m, n, d, parities, planes, f, v_bits)
    if key not in kernels:
        func, name = attn_v_primfunc(bt, m, n, d, target, parities=parities, groups=planes - parities + 1, f=f,
                                     v_bits=v_bits)
        kernels[key] = bb.add_func(func, name)
    if len(lead) != 1:
        v = bb.emit(relax.op.reshape(v, [bt, n, d]))
    params = [relax.const(np.array([z_v], np.int32)), relax.const(np.array([scale], np.float32))]
    out = relax.call_tir(kernels[key], [weights, v, *params], relax.TensorType((bt, m, d), "float32"))
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

    def _softmax_input(self, p):
        """x when p = softmax(x) over the last axis in float32 (the kernel then fuses the softmax), else None."""
        expr = follow(self, p)
        if not _is_op(expr, "relax.nn.softmax") or expr.ty.dtype != "float32":
            return None
        rank = len(_static_shape(expr))
        return expr.args[0] if int(expr.attrs.axis) in (-1, rank - 1) else None

    def visit_call_(self, call):
        call = super().visit_call_(call)
        parts = self._match(call)
        if parts is None:
            return call
        (p, s_attn, bits, sqrt2), (v, s_v, z_v, v_bits) = parts
        f = attn_frac_bits(_static_shape(p)[-1], v_bits)
        logits = self._softmax_input(p)
        x = p if logits is None else logits
        weights = log_weights(self.builder_, x, s_attn, bits, sqrt2, f, attn_groups(bits, f, sqrt2), self.target,
                              softmax=logits is not None)
        scale = float(np.float32(np.float64(s_attn) * np.float64(s_v) / 2.0 ** (f + ATTN_EXTRA_BITS)))
        self.rewritten += 1
        return attn_v_call(self.builder_, weights, v, z_v, scale, f, 2 if sqrt2 else 1, self.target, self.kernels,
                           v_bits)


LowerLog2Attention = rewrite_pass(
    "LowerLog2Attention", _Rewriter,
    "matmul(log-quantized attention, dequantized V) → int16 log√2 weights + integer dot product `repq_attn_v`.")
