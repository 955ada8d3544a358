"""Lower attention logits ``q @ k^T`` of two layer-wise quantized activations to one integer kernel.

Matches, in the canonical form (see `repq_tvm.frontends`):

    k̂ᵀ = dequantize(clip(quantize(permute_dims(k, [.., -1, -2]), s_k, z_k)), s_k, z_k)   [.., D, N]
    q̂  = dequantize(q_codes, s_q, z_q)                                                  [.., M, D]
    y  = matmul(q̂, k̂ᵀ)  [· c]                                   scalar scales/zps, non-constant codes

and emits one call of the scheduled `repq_tvm.kernels.qbmm` kernel: acc = Σ_d (q − z_q)(k − z_k)
exactly in int32, y = float(acc)·(s_q·s_k·c).  The k side is followed back through its quantize/clip
to the transpose: they are elementwise with scalar parameters, so quantizing k itself gives the same
codes in row layout [.., N, D] (without a transpose the kernel reads the [.., D, N] codes as they are).
A following ``multiply(y, scalar const)`` (the softmax scale) is folded into the kernel's scale when y
has no other use.  attn @ V (its left operand is a log quantizer, not a dequantize) and linears
(constant codes) are left alone.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from ..relax_util import activation_dequant, batched_matmul_shapes, calls_only, emitted, var_uses
from ..relax_util import scalar_const as _scalar
from ..relax_util import static_shape as _static_shape


def qbmm_call(bb: relax.BlockBuilder, a, b, z_a: int, z_b: int, scale: float, target, kernels: dict,
              b_layout: str = "nd") -> relax.Expr:
    """Emit the kernel on uint8 codes a [.., M, D] and b [.., N, D] ("nd") or [.., D, N] ("dn").

    Returns the float32 [.., M, N] expression (not yet emitted).  `kernels` caches one PrimFunc per
    shape and layout: zero points and scale are run-time operands, so same-shape layers share it.
    """
    from ..kernels.qbmm import qbmm_primfunc

    a_shape, b_shape = _static_shape(a), _static_shape(b)
    lead, (m, d) = a_shape[:-2], a_shape[-2:]
    n = b_shape[-2] if b_layout == "nd" else b_shape[-1]
    bt = int(np.prod(lead, dtype=np.int64))
    key = (bt, m, n, d, b_layout)
    if key not in kernels:
        func, name = qbmm_primfunc(bt, m, n, d, target, b_layout=b_layout)
        kernels[key] = bb.add_func(func, name)
    if len(lead) != 1:
        a = bb.emit(relax.op.reshape(a, [bt, m, d]))
        b = bb.emit(relax.op.reshape(b, [bt, *b_shape[-2:]]))
    params = [relax.const(np.array([z_a, z_b], np.int32)), relax.const(np.array([scale], np.float32))]
    out = relax.call_tir(kernels[key], [a, b, *params], relax.TensorType((bt, m, n), "float32"))
    return out if len(lead) == 1 else relax.op.reshape(bb.emit(out), [*lead, m, n])


# matmul(dequantize(q_codes, s_q, z_q), dequantize(k_codes, s_k, z_k)) [· c]; k_codes may be
# [clip](quantize(permute_dims(k))), the canonical quantizer of a transposed k, which the kernel undoes
_K = wildcard()  # k in row layout [.., N, D]
_KT = is_op("relax.permute_dims")(_K)
_KQ = is_op("relax.quantize")(_KT, is_const(), is_const())
_KCLIP = is_op("relax.clip")(_KQ, wildcard(), wildcard())
_A = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
_B = is_op("relax.dequantize")(_KCLIP | _KQ | wildcard(), is_const(), is_const())
_QK = is_op("relax.matmul")(_A, _B)
_C = is_const()
_SCALED = is_op("relax.multiply")(_QK, _C) | is_op("relax.multiply")(_C, _QK)


def _parts(m):
    """((a, s_a, z_a), (b, s_b, z_b)) of a `_QK` match: float32 logits of two layer-wise dequantized
    non-constant uint8 codes with static batched shapes, else None (linears have constant codes)."""
    if m[_QK].ty.dtype != "float32":
        return None
    qa, qb = activation_dequant(m[_A]), activation_dequant(m[_B])
    if qa is None or qb is None or batched_matmul_shapes(qa[0], qb[0]) is None:
        return None
    return qa, qb


def _row_codes(bb, m, codes):
    """The k codes [.., N, D] quantized below the transpose (same quantize [and clip], on k), or None when
    `codes` are not that quantizer of a last-two-axes transpose with scalar parameters."""
    if _KT not in m or any(_scalar(p) is None for p in m[_KQ].args[1:]):
        return None
    transpose, rank = m[_KT], len(_static_shape(codes))
    if transpose.attrs.axes is None or [int(a) for a in transpose.attrs.axes] != [*range(rank - 2), rank - 1,
                                                                                   rank - 2]:
        return None
    out = transpose.args[0]
    for op in [m[_KQ], *([m[_KCLIP]] if _KCLIP in m else [])]:
        out = bb.emit(relax.Call(op.op, [out, *op.args[1:]], op.attrs))
    return out


def _emit(bb, target, kernels, m, parts, factor):
    """The kernel call replacing one q @ kᵀ [· factor]: k's codes as rows where they can be, `qbmm_call`."""
    (a, s_a, z_a), (b, s_b, z_b) = parts
    rows = _row_codes(bb, m, b)
    scale = s_a * s_b * (1.0 if factor is None else factor)
    return qbmm_call(bb, a, b if rows is None else rows, z_a, z_b, scale, target, kernels,
                     "dn" if rows is None else "nd")


@tvm.transform.module_pass(opt_level=0, name="LowerQuantizedQK")
class LowerQuantizedQK:
    """Quantized q @ kᵀ (dequantize · dequantize of activations) [· scalar] → integer `repq_qbmm` kernel.

    The attention logits of two fake-quantized activations are an exact integer product of their codes:
    this pass computes them so (int32, one float scale per output) instead of a float batched matmul on
    dequantized tensors.  Two `tvm.relax.dpl` rewrites per function: first `_SCALED`, logits whose only
    use is a multiply by a scalar constant (the softmax scale, folded into the kernel's scale; the
    multiply disappears), then `_QK`, every quantized q @ kᵀ left.  `.rewritten` counts the kernels.
    """

    def __init__(self, target):
        self.target, self.rewritten = target, 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        bb, kernels = relax.BlockBuilder(mod), {}
        self.rewritten = 0

        def lower(m, parts, factor):
            self.rewritten += 1
            return emitted(bb, lambda: _emit(bb, self.target, kernels, m, parts, factor))

        for gv, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function):
                continue
            uses = var_uses(func)

            def with_scale(mul, m):
                x, c = mul.args[0], mul.args[1]
                if _scalar(c) is None:  # multiply(c, logits)
                    x, c = c, x
                factor, parts = _scalar(c), _parts(m)
                if (factor is None or parts is None or mul.ty.dtype != "float32" or uses.get(x) != 1
                        or _static_shape(mul) != _static_shape(x)):
                    return mul  # the multiply stays; `without_scale` still lowers the matmul
                return lower(m, parts, float(factor))

            def without_scale(matmul, m):
                parts = _parts(m)
                return matmul if parts is None else lower(m, parts, None)

            func = rewrite_call(_SCALED, calls_only(with_scale), func)
            bb.update_func(gv, rewrite_call(_QK, calls_only(without_scale), func))
        return relax.transform.DeadCodeElimination()(bb.get())
