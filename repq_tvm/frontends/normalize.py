"""Rewrites that bring either frontend's import to the one canonical form (see the package docstring).

Each rewrite undoes one way a frontend spells a canonical op:
- ONNX `Clip` on codes imports as `call_tir(maximum)`/`call_tir(minimum)` → `R.clip`;
- ONNX Q/DQ with a scalar scale carries axis=1 → axis=-1 (the axis is meaningless for a scalar);
- the documented ONNX log-quantizer pattern → `call_pure_packed("repq.log_sqrt2_fake_quant")` (or log2);
- torch `split` + tuple indexing (unbind) → the `strided_slice` ONNX gives; static `shape_of` → a constant;
- `take` in "fast" mode (no bounds) → "clip";
- spelling-only differences: `x + 0`, zero padding, reshape chains, `permute_dims(axes=None)`, matmul out_dtype;
then constants are folded (parameter-only arithmetic such as Swin's relative-position bias) while the
uint8 weight codes are kept out of reach of FoldConstant, so `dequantize(codes)` is not folded to floats.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..relax_util import follow, rewrite_functions
from ..relax_util import is_op as _is_op
from . import canonical

def _const_value(expr):
    """The scalar value of a tensor constant, else None."""
    if isinstance(expr, tvm.ir.GenericConst) and expr.value.numpy().size == 1:
        return expr.value.numpy().reshape(()).item()
    return None


def _dtype(expr) -> str:
    return str(expr.ty.dtype.dtype)


def _static_shape(expr):
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
        return None
    return [int(d) for d in shape]


@mutator
class _Canonicalize(PyExprMutator):
    def _value(self, expr):
        return follow(self, expr)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        for rewrite in (self._qdq_axis, self._clip, self._log_quant, self._shape, self._zero_add, self._out_dtype,
                        self._reshape, self._zero_pad, self._take_mode):
            new = rewrite(call)
            if new is not None:
                return new
        return call

    def _qdq_axis(self, call):
        if not (_is_op(call, "relax.quantize") or _is_op(call, "relax.dequantize")) or call.attrs.axis == -1:
            return None
        if isinstance(call.args[0], tvm.ir.GenericConst):  # weight codes keep axis 0 even with one channel
            return None
        if _static_shape(call.args[1]) not in ([], [1]):
            return None
        fn = relax.op.quantize if call.op.name == "relax.quantize" else relax.op.dequantize
        return fn(*call.args, axis=-1, out_dtype=call.attrs.out_dtype)

    def _tir_minmax(self, expr, name):
        """(x, bound) for `call_tir(<name>N, (x, const bound))`."""
        expr = self._value(expr)
        if not _is_op(expr, "relax.call_tir") or not expr.args[0].name_hint.rstrip("0123456789") == name:
            return None
        x, bound = expr.args[1].fields
        value = _const_value(bound)
        return None if value is None else (x, value)

    def _clip(self, call):
        hi = self._tir_minmax(call, "minimum")
        lo = hi and self._tir_minmax(hi[0], "maximum")
        if lo is None or _dtype(call) != "uint8":
            return None
        return relax.op.clip(lo[0], int(lo[1]), int(hi[1]))

    def _log_quant(self, call):
        """where(raw <= 2^b−1, s·2^(relu(raw)·(−1/m)), 0), raw = round(log(x/s)·(−m/ln2)) → named log op."""
        v = self._value
        if not _is_op(call, "relax.where") or _const_value(call.args[2]) != 0:
            return None
        cond, val = v(call.args[0]), v(call.args[1])
        if not (_is_op(cond, "relax.less_equal") and _is_op(val, "relax.multiply")):
            return None
        raw_var, qmax, scale = cond.args[0], _const_value(cond.args[1]), _const_value(val.args[1])
        power = v(val.args[0])
        if not (_is_op(power, "relax.power") and _const_value(power.args[0]) == 2):
            return None
        expo = v(power.args[1])
        if not _is_op(expo, "relax.multiply") or _const_value(expo.args[1]) is None:
            return None
        relu, m = v(expo.args[0]), -1.0 / _const_value(expo.args[1])
        raw = v(raw_var)
        if not (_is_op(relu, "relax.nn.relu") and v(relu.args[0]).same_as(raw) and _is_op(raw, "relax.round")):
            return None
        mul = v(raw.args[0])
        log = _is_op(mul, "relax.multiply") and v(mul.args[0])
        div = _is_op(log, "relax.log") and v(log.args[0])
        if not (_is_op(div, "relax.divide") and _const_value(div.args[1]) == scale and qmax is not None):
            return None
        bits = int(round(math.log2(qmax + 1)))
        if (round(m) not in (1, 2) or not math.isclose(_const_value(mul.args[1]), -m / math.log(2), rel_tol=1e-6)
                or 2 ** bits - 1 != qmax):
            return None
        x = div.args[0]
        return canonical.log_fake_quant(x, x.ty, scale, bits, sqrt2=round(m) == 2)

    def _shape(self, call):
        if _is_op(call, "relax.shape_of") and _static_shape(call.args[0]) is not None:
            return relax.ShapeExpr(_static_shape(call.args[0]))
        if _is_op(call, "relax.shape_to_tensor"):
            shape = self._value(call.args[0])
            if isinstance(shape, relax.ShapeExpr) and all(isinstance(d, tvm.tirx.IntImm) for d in shape.values):
                return relax.const(np.array([int(d) for d in shape.values]), "int64")
        return None

    def _zero_add(self, call):
        """x + 0 → x (the ONNX exporter drops an all-zero Gemm bias, torch keeps it)."""
        if not _is_op(call, "relax.add"):
            return None
        for keep, other in ((0, 1), (1, 0)):
            c = call.args[other]
            if (isinstance(c, tvm.ir.GenericConst) and not np.any(c.value.numpy())
                    and _static_shape(call.args[keep]) == _static_shape(call)):
                return call.args[keep]
        return None

    def _take_mode(self, call):
        """take(mode="fast") → take(mode="clip"): both frontends import an index op as "fast" take, which reads out of
        bounds on a bad index (TVM warns so at every legalization, once per Swin block while folding its relative
        position bias); clamped indices cost nothing on constants and keep a run-time gather in bounds."""
        if _is_op(call, "relax.take") and call.attrs.mode == "fast":
            return relax.op.take(*call.args, axis=call.attrs.axis, mode="clip")
        return None

    def _out_dtype(self, call):
        """Explicit attributes where the frontends differ only in spelling: permute axes, matmul/conv out_dtype."""
        if _is_op(call, "relax.permute_dims") and call.attrs.axes is None:
            return relax.op.permute_dims(call.args[0], list(range(len(_static_shape(call)) - 1, -1, -1)))
        if _is_op(call, "relax.matmul") and str(call.attrs.out_dtype) != _dtype(call):
            return relax.op.matmul(*call.args, out_dtype=_dtype(call))
        if _is_op(call, "relax.nn.conv2d") and str(call.attrs.out_dtype) != _dtype(call):
            a = call.attrs
            return relax.op.nn.conv2d(*call.args, strides=a.strides, padding=a.padding, dilation=a.dilation,
                                      groups=a.groups, data_layout=a.data_layout, kernel_layout=a.kernel_layout,
                                      out_layout=a.out_layout, out_dtype=_dtype(call))
        return None

    def _reshape(self, call):
        """reshape(reshape(x)) → reshape(x); a reshape to the same shape → x (ONNX export merges them)."""
        if not _is_op(call, "relax.reshape"):
            return None
        x = call.args[0]
        inner = self._value(x)
        if _is_op(inner, "relax.reshape"):
            x = inner.args[0]
        if _static_shape(x) is not None and _static_shape(x) == _static_shape(call):
            return x
        return None if x.same_as(call.args[0]) else relax.op.reshape(x, call.args[1])

    def _zero_pad(self, call):
        if _is_op(call, "relax.nn.pad") and not any(int(p) for p in call.attrs.pad_width):
            return call.args[0]
        return None

    def visit_tuple_getitem_(self, op):
        op = super().visit_tuple_getitem_(op)
        split = self._value(op.tuple_value)
        if not _is_op(split, "relax.split") or _static_shape(split.args[0]) is None:
            return op
        shape, axis = _static_shape(split.args[0]), int(split.attrs.axis)
        sections = split.attrs.indices_or_sections
        if isinstance(sections, (int, tvm.tirx.IntImm)):
            step = shape[axis] // int(sections)
            bounds = list(range(0, shape[axis] + 1, step))
        else:
            bounds = [0, *[int(i) for i in sections], shape[axis]]
        i = op.index
        return relax.op.strided_slice(split.args[0], axes=[axis], begin=[bounds[i]], end=[bounds[i + 1]])


def _rewrite(mod: tvm.IRModule) -> tvm.IRModule:
    return rewrite_functions(_Canonicalize(mod), mod)


@mutator
class _LiftCodes(PyExprMutator):
    """Replace the uint8 code constant of every `dequantize` by a fresh variable (remembered in `codes`)."""

    def __init__(self, mod):
        super().__init__(mod)
        self.codes = {}

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if _is_op(call, "relax.dequantize") and isinstance(call.args[0], tvm.ir.GenericConst):
            var = relax.Var(f"repq_codes_{len(self.codes)}", call.args[0].ty)
            self.codes[var] = call.args[0].value
            return relax.Call(call.op, [var, *call.args[1:]], call.attrs, call.ty_args)
        return call


def fold_constants(mod: tvm.IRModule, func: str = "main") -> tvm.IRModule:
    """FoldConstant on `func`, except that `dequantize(uint8 codes)` stays a dequantize."""
    lift = _LiftCodes(mod)
    f = mod[func]
    body = lift.visit_expr(f.body)
    names = {v.name: d for v, d in lift.codes.items()}
    mod = mod.clone()
    mod.update_func(mod.get_global_var(func),
                    relax.Function(list(f.params) + list(lift.codes), body, f.ret_ty, f.is_pure, f.attrs))
    mod = relax.transform.FoldConstant()(mod)
    return relax.transform.BindParams(func, names)(mod)


def normalize(mod: tvm.IRModule) -> tvm.IRModule:
    """Canonicalize an imported module: rewrites, constant folding, dead code removal."""
    mod = _rewrite(mod)
    mod = relax.transform.DeadCodeElimination()(mod)
    mod = fold_constants(mod)
    mod = relax.transform.CanonicalizeBindings()(mod)
    return relax.transform.DeadCodeElimination()(mod)
