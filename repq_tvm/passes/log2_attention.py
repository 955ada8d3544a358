"""Lower ``attn @ V`` with a log-quantized attention to an integer dot product (`repq_tvm.kernels.attn_v`).

Matches, in the canonical form (see `repq_tvm.frontends`):

    â  = call_pure_packed("repq.log_sqrt2_fake_quant" | "repq.log2_fake_quant", p, s (f32 const), b)
    v̂  = dequantize(v_codes, s_v, z_v)                  layer-wise (scalar) s_v / z_v, non-constant uint8 codes
                                                         (v_codes = clip(quantize(..), 0, 2^b − 1) ⇒ b-bit V)
    y  = matmul(â, v̂)                                    float32, static shapes, rank ≥ 3, same leading dims

and emits

    w = int16 weights [.., planes, M, Np] (`reference.ops.attn_weights`): W = round(2^(2F + 1 − code/m)) as
        W >> (F + 1) in plane 0 and its low F + 1 bits in plane 1, code = round(−m·log2(p / s)) (m = 2 for
        log√2, 1 for log2), shift s = ⌈code/m⌉ (plane 0 alone when every W is a whole 2^(F − s): log2 codes
        with every shift ≤ F; 0 where the quantizer underflows), computed from p's exponent and mantissa bits
        with compile-time thresholds, or, where p is softmax(x), from the logits x with log2(s) a run-time
        operand (one kernel for every block)
    y = call_tir(repq_attn_v kernel, [w, v_codes, z_v, s·s_v/2^(F+G)])   leading dims folded into one batch,
        F = attn_frac_bits(N, b) ≤ 14: the fewer V bits or tokens, the more fractional bits fit int32

The kernel (`repq_tvm.kernels.attn_v`) computes `reference.ops.attn_v_acc` exactly: per plane an int16 dot
product Σ_n w·(v − z_v) in int32 (vpdpwssd on AVX-512 VNNI, vpmaddwd on AVX2, udot on two byte bands of w with
Arm's dot product, smlal on other NEON), the planes combined by shifts and one float multiply per output.
Other uses of the log quantizer (if any) keep the original call.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import ExternFuncPattern, is_const, is_op, rewrite_call, wildcard

from ..frontends.canonical import LOG_OPS, log_call_params
from ..reference.ops import ATTN_EXTRA_BITS, attn_frac_bits, attn_groups
from ..relax_util import activation_dequant, batched_matmul_shapes, calls_only, code_bits, emitted
from ..relax_util import static_shape as _static_shape


def log_weights(bb: relax.BlockBuilder, x: relax.Expr, scale: float, bits: int, sqrt2: bool, f: int,
                groups: int, target, softmax: bool) -> relax.Expr:
    """Emit `kernels.log_weights` on x [.., M, N] (the attention probabilities, or with `softmax` the logits
    they are the softmax of, the scale then a run-time operand: one kernel for every block); returns int16
    [Bt, planes, M, Np] (leading dims folded into Bt)."""
    from ..kernels.attn_v import padded_tokens
    from ..kernels.log_weights import log2_scale_operand, log_weights_primfunc

    shape = _static_shape(x)
    lead, (rows, n) = shape[:-2], shape[-2:]
    bt = int(np.prod(lead, dtype=np.int64))
    if len(lead) != 1:
        x = bb.emit(relax.op.reshape(x, [bt, rows, n]))
    func, name = log_weights_primfunc((bt, rows, n), bits, sqrt2, f, groups, target, softmax=softmax,
                                      scale=None if softmax else scale)
    gv = bb.add_func(func, name)  # deduplicated: the blocks' equal kernels are one function
    # float64 on purpose: relax.const would make it float32 (log2(s) rounded, codes moved)
    args = [x, relax.const(log2_scale_operand(scale), "float64")] if softmax else [x]
    return bb.emit(relax.call_tir(gv, args, relax.TensorType((bt, groups, rows, padded_tokens(n)), "int16")))


def v_code_bits(codes, z_v: int) -> int:
    """Bits b such that the V codes and z_v lie in [0, 2^b − 1]: from the canonical clip(q, lo, hi) on the
    codes (`frontends.canonical.uniform_qdq` emits one when b < 8), else 8 (any uint8)."""
    return max(code_bits(codes), int(z_v).bit_length())


def attn_v_call(bb: relax.BlockBuilder, weights: relax.Expr, v: relax.Expr, z_v: int, scale: float, f: int,
                target, kernels: dict, v_bits: int = 8) -> relax.Expr:
    """Emit the kernel on int16 weights [Bt, planes, M, Np] (`log_weights`) and `v_bits`-bit uint8 V codes
    [.., N, D] (Bt = the product of the leading dims); returns float32 [.., M, D].

    `kernels` caches one PrimFunc per (shape, planes, F, v_bits): zero point and scale are run-time operands.
    """
    from ..kernels.attn_v import attn_v_primfunc

    (bt, planes, m, _), v_shape = _static_shape(weights), _static_shape(v)
    lead, (n, d) = v_shape[:-2], v_shape[-2:]
    key = (bt, m, n, d, planes, f, v_bits)
    if key not in kernels:
        func, name = attn_v_primfunc(bt, m, n, d, target, groups=planes, f=f, v_bits=v_bits)
        kernels[key] = bb.add_func(func, name)
    if len(lead) != 1:
        v = bb.emit(relax.op.reshape(v, [bt, n, d]))
    params = [relax.const(np.array([z_v], np.int32)), relax.const(np.array([scale], np.float32))]
    out = relax.call_tir(kernels[key], [weights, v, *params], relax.TensorType((bt, m, d), "float32"))
    return out if len(lead) == 1 else relax.op.reshape(bb.emit(out), [*lead, m, d])


# matmul(call_pure_packed("repq.log[_sqrt]2_fake_quant", [softmax](x), s, b), dequantize(v_codes, s_v, z_v))
_SOFTMAX = is_op("relax.nn.softmax")(wildcard())
_LOG = is_op("relax.call_pure_packed")(ExternFuncPattern(LOG_OPS[True]) | ExternFuncPattern(LOG_OPS[False]),
                                       _SOFTMAX | wildcard(), is_const(), wildcard())
_V_CODES = wildcard()  # matched as the value bound to the codes: v_code_bits reads its clip
_V = is_op("relax.dequantize")(_V_CODES, is_const(), is_const())
_ATTN_V = is_op("relax.matmul")(_LOG, _V)


def _parts(m):
    """((p, s, bits, sqrt2), (v, s_v, z_v, v_bits)) of an `_ATTN_V` match: a float32 log quantizer of 1 to 8
    bits with a positive scale, layer-wise dequantized non-constant uint8 V, static batched shapes; else None."""
    lq, dq = log_call_params(m[_LOG]), activation_dequant(m[_V])
    if m[_ATTN_V].ty.dtype != "float32" or dq is None:
        return None
    if lq[0].ty.dtype != "float32" or not 1 <= lq[2] <= 8 or lq[1] <= 0:
        return None
    if batched_matmul_shapes(lq[0], dq[0]) is None:
        return None
    v, s_v, z_v = dq
    return lq, (v, s_v, z_v, v_code_bits(m[_V_CODES], z_v))


def _softmax_input(m):
    """x when the quantizer's input is softmax(x) over the last axis in float32 (the weights kernel then
    fuses the softmax), else None."""
    if _SOFTMAX not in m:
        return None
    softmax = m[_SOFTMAX]
    if softmax.ty.dtype != "float32":
        return None
    rank = len(_static_shape(softmax))
    return softmax.args[0] if int(softmax.attrs.axis) in (-1, rank - 1) else None


def _emit(bb, target, kernels, parts, logits):
    """The calls replacing one attn @ V: the weights kernel (on the logits when it fuses the softmax), `attn_v_call`."""
    (p, s_attn, bits, sqrt2), (v, s_v, z_v, v_bits) = parts
    f = attn_frac_bits(_static_shape(p)[-1], v_bits)
    x = p if logits is None else logits
    weights = log_weights(bb, x, s_attn, bits, sqrt2, f, attn_groups(bits, f, sqrt2), target,
                          softmax=logits is not None)
    scale = float(np.float32(np.float64(s_attn) * np.float64(s_v) / 2.0 ** (f + ATTN_EXTRA_BITS)))
    return attn_v_call(bb, weights, v, z_v, scale, f, target, kernels, v_bits)


@tvm.transform.module_pass(opt_level=0, name="LowerLog2Attention")
class LowerLog2Attention:
    """matmul(log-quantized attention, dequantized V) → int16 log√2 weights + integer dot product `repq_attn_v`.

    A log√2-quantized attention probability is a power of two (times √2 for odd codes): attn @ V is then
    a sum of shifted V codes, computed exactly in integers by the `kernels.attn_v` dot product, instead of
    a float matmul on dequantized values (and, where the quantizer reads a softmax, the weights kernel
    computes that softmax too).  One `tvm.relax.dpl` rewrite of `_ATTN_V`; other uses of the log quantizer
    keep the original call.  `.rewritten` counts the rewrites.
    """

    def __init__(self, target):
        self.target, self.rewritten = target, 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        bb, kernels = relax.BlockBuilder(mod), {}
        self.rewritten = 0

        def lower(matmul, m):
            parts = _parts(m)
            if parts is None:
                return matmul
            self.rewritten += 1
            return emitted(bb, lambda: _emit(bb, self.target, kernels, parts, _softmax_input(m)))

        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                bb.update_func(gv, rewrite_call(_ATTN_V, calls_only(lower), func))
        return relax.transform.DeadCodeElimination()(bb.get())
