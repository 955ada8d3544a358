"""Legalize GELU and softmax with TVM's polynomial erf / exp, so their loops vectorize; quantize with a constant
scale without the divider (`kernels.epilogue.divide_by`: the same float32 quotient, bit for bit).

A quantizer with a scalar scale and zero point, and an integer tensor minus a scalar (the centred codes an AVX2
linear reads), take those scalars as a run-time tensor operand (`quantizer_args`; a [1] tensor), not as constants
in the code: the LayerNorm → codes kernels TVM fuses for each layer are then one kernel per shape (FuseOps shares
structurally equal groups; DeiT-Small: 24 compiled kernels → 1).  The operations are the constants' own, so the
codes are the same.  Marked elementwise (`ELEMENTWISE`): TVM's pattern analysis calls a kernel reading a small
operand at fixed indices injective, and would not fuse it into the LayerNorm.

TVM's default legalization calls libm's `erff` / `expf` per element: LLVM cannot vectorize those
calls, and GELU alone was ~8 ns per element. `topi.fast_erf` / `topi.fast_exp` are rational and
polynomial approximations within a few float32 ulps of libm, written in plain arithmetic that
vectorizes. The values differ from PyTorch's in the last bits only; like any float op order change,
that can move a value across a quantizer's rounding midpoint (bounded and asserted in the model tests).
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax, te, tirx, topi
from tvm.relax.transform.legalize_ops.common import _try_convert_to_scalar_const
from tvm.relax.transform.legalize_ops.qdq import _quantize as _tvm_quantize

from ..kernels.epilogue import Quantizer, divide_by, quantizer_args
from .load_time_weights import FoldConstantsAtRunTime

ELEMENTWISE = "repq.elementwise"  # attribute of the PrimFuncs `Elementwise` marks as such after TVM's analysis


def gelu(x: te.Tensor) -> te.Tensor:
    """GELU with TVM's polynomial erf (also inlined into qdense epilogues: `kernels.epilogue`)."""
    half = 0.5
    erf = topi.fast_erf(topi.multiply(x, 1 / math.sqrt(2)))
    return topi.multiply(x, topi.add(half, topi.multiply(erf, half)))


def _gelu(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    return bb.call_te(gelu, call.args[0], primfunc_name_hint="gelu")


def _softmax(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    return bb.call_te(topi.nn.fast_softmax, call.args[0], int(call.attrs.axis), primfunc_name_hint="softmax")


def quantize(data: te.Tensor, quant: te.Tensor, out_dtype: str) -> te.Tensor:
    """TVM's legalization of ``relax.quantize`` (``clip(round(x / s) + z)`` to the output type's range) for a
    float32 scale and zero point read from ``quant`` = `quantizer_args` (s, 1/s, z), the division by `divide_by`."""
    lo, hi = tirx.min_value(out_dtype), tirx.max_value(out_dtype)

    s, r, z = Quantizer.loaded(quant)

    def compute(*i):
        q = te.round(divide_by(data[i], s, r)) + z
        return te.max(te.min(q, hi), lo).astype(out_dtype)

    return te.compute(data.shape, compute, name="quantized")


def _elementwise(bb: relax.BlockBuilder, compute, args: list, operand: relax.Constant, name: str, ty) -> relax.Expr:
    """``call_tir`` of the PrimFunc ``compute(*args placeholders, operand placeholder)`` marked `ELEMENTWISE`."""
    holders = [te.placeholder(list(a.ty.shape.values), str(a.ty.dtype), name=f"x{i}") for i, a in enumerate(args)]
    value = operand.value.numpy()
    operand_holder = te.placeholder(value.shape, str(value.dtype), name="operand")
    out = compute(*holders, operand_holder)
    func = te.create_prim_func([*holders, operand_holder, out]).without_attr("global_symbol").with_attr(ELEMENTWISE, 1)
    return relax.call_tir(bb.add_func(func, name), relax.Tuple([*args, operand]), ty)


def _static(expr: relax.Expr) -> bool:
    shape = getattr(expr.ty, "shape", None)
    return isinstance(shape, relax.ShapeExpr) and all(isinstance(d, tirx.IntImm) for d in shape.values)


def _quantize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    scale, zp = (_try_convert_to_scalar_const(a) for a in call.args[1:])
    out_dtype = call.attrs.out_dtype
    if (isinstance(scale, tirx.FloatImm) and str(scale.ty.dtype) == "float32" and str(call.args[0].ty.dtype) == "float32"
            and "int" in out_dtype and isinstance(zp, tirx.IntImm | tirx.FloatImm) and float(zp.value).is_integer()
            and _static(call.args[0])):
        quant = relax.const(quantizer_args(float(scale.value), int(zp.value)))
        return _elementwise(bb, lambda x, q: quantize(x, q, out_dtype), [call.args[0]], quant, "quantize", call.ty)
    return _tvm_quantize(bb, call)


def _subtract(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    """x − c for an int8 / int16 tensor x and a scalar constant c of its type (the centred codes an AVX2 linear
    reads) with c a [1] operand; else TVM's legalization."""
    minus = _try_convert_to_scalar_const(call.args[1])
    dtype = str(call.args[0].ty.dtype)
    if dtype in ("int8", "int16") and isinstance(minus, tirx.IntImm) and str(minus.ty.dtype) == dtype \
            and _static(call.args[0]) and str(call.ty.dtype) == dtype:
        operand = relax.const(np.array([int(minus.value)], dtype))
        return _elementwise(bb, lambda x, c: te.compute(x.shape, lambda *i: x[i] - c[0], name="centred"),
                            [call.args[0]], operand, "subtract", call.ty)
    return tvm.ir.Op.get("relax.subtract").get_attr("FLegalize")(bb, call)


LEGALIZE = {"relax.nn.gelu": _gelu, "relax.nn.softmax": _softmax, "relax.quantize": _quantize,
            "relax.subtract": _subtract}


@tvm.transform.module_pass(opt_level=0, name="MarkElementwise")
class Elementwise:
    """Set ``op_pattern`` elementwise (0) on the PrimFuncs marked `ELEMENTWISE`, after TVM's analysis
    (`AnnotateTIROpPattern`) called them injective for their operand's fixed-index reads."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        for gv, func in list(mod.functions_items()):
            if isinstance(func, tirx.PrimFunc) and func.attrs is not None and func.attrs.get(ELEMENTWISE):
                mod[gv] = func.with_attr("op_pattern", 0)
        return mod


def legalize_passes() -> list:
    """TVM's CPU legalize + fuse passes, with GELU and softmax legalized by `LEGALIZE`."""
    return [
        relax.transform.LegalizeOps(customize_legalize_map=LEGALIZE),
        relax.transform.AnnotateTIROpPattern(),
        Elementwise(),
        FoldConstantsAtRunTime(),  # TVM's FoldConstant everywhere but the load-time function
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
