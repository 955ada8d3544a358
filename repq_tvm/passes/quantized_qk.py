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
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..relax_util import activation_dequant, batched_matmul_shapes, follow, rewrite_pass, var_uses
from ..relax_util import is_op as _is_op
from ..relax_util import scalar_const as _scalar
from ..relax_util import static_shape as _static_shape

_ELEMENTWISE = ("relax.clip", "relax.quantize")  # commute with a transpose when their parameters are scalars


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


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target):
        super().__init__(mod)
        self.target, self.rewritten = target, 0
        self.mult_of, self.mult_source, self.fused, self.kernels = {}, {}, set(), {}

    def _match(self, call):
        if not _is_op(call, "relax.matmul") or call.ty.dtype != "float32":
            return None
        qa, qb = activation_dequant(self, call.args[0]), activation_dequant(self, call.args[1])
        if qa is None or qb is None or batched_matmul_shapes(qa[0], qb[0]) is None:
            return None
        return qa, qb

    def _row_codes(self, codes):
        """k codes [.., N, D] rebuilt below the transpose, or None if there is no transpose to undo."""
        chain, expr = [], follow(self, codes)
        while any(_is_op(expr, name) for name in _ELEMENTWISE):
            if _is_op(expr, "relax.quantize") and any(_scalar(p) is None for p in expr.args[1:]):
                return None
            chain.append(expr)
            expr = follow(self, expr.args[0])
        if not chain or not _is_op(expr, "relax.permute_dims") or expr.attrs.axes is None:
            return None
        rank = len(_static_shape(codes))
        if [int(a) for a in expr.attrs.axes] != [*range(rank - 2), rank - 1, rank - 2]:
            return None
        out = expr.args[0]
        for op in reversed(chain):
            out = self.builder_.emit(relax.Call(op.op, [out, *op.args[1:]], op.attrs))
        return out

    def plan_scale_fusion(self, func: relax.Function) -> None:
        """Find `multiply(matmul_var, scalar const)` whose matmul has no other use: its factor goes into the kernel."""
        values = {b.var: b.value for block in func.body.blocks for b in block.bindings}
        uses = var_uses(func)
        for var, value in values.items():
            if not _is_op(value, "relax.multiply") or value.ty.dtype != "float32":
                continue
            for x, c in (value.args, value.args[::-1]):
                factor = _scalar(c)
                if (isinstance(x, relax.Var) and _is_op(values.get(x), "relax.matmul") and uses.get(x) == 1
                        and factor is not None and _static_shape(value) == _static_shape(x)):
                    self.mult_of[x], self.mult_source[var] = float(factor), x
                    break

    def visit_var_binding_(self, binding):
        self._current = binding.var
        super().visit_var_binding_(binding)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        current = getattr(self, "_current", None)
        if self.mult_source.get(current) in self.fused and _is_op(call, "relax.multiply"):
            return next(a for a in call.args if _scalar(a) is None)  # the kernel already scaled it
        parts = self._match(call)
        if parts is None:
            return call
        (a, s_a, z_a), (b, s_b, z_b) = parts
        factor = self.mult_of.get(current)
        if factor is not None:
            self.fused.add(current)
        rows = self._row_codes(b)
        scale = s_a * s_b * (1.0 if factor is None else factor)
        self.rewritten += 1
        return qbmm_call(self.builder_, a, b if rows is None else rows, z_a, z_b, scale, self.target,
                         self.kernels, "dn" if rows is None else "nd")


LowerQuantizedQK = rewrite_pass(
    "LowerQuantizedQK", _Rewriter,
    "Quantized q @ kᵀ (dequantize · dequantize of activations) [· scalar] → integer `repq_qbmm` kernel.",
    plan="plan_scale_fusion")
