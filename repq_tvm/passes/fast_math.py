"""Legalize GELU and softmax with TVM's polynomial erf / exp, so their loops vectorize; quantize with a constant
scale without the divider (`kernels.epilogue.divide`: the same float32 quotient, bit for bit).

TVM's default legalization calls libm's `erff` / `expf` per element: LLVM cannot vectorize those
calls, and GELU alone was ~8 ns per element. `topi.fast_erf` / `topi.fast_exp` are rational and
polynomial approximations within a few float32 ulps of libm, written in plain arithmetic that
vectorizes. The values differ from PyTorch's in the last bits only; like any float op order change,
that can move a value across a quantizer's rounding midpoint (bounded and asserted in the model tests).
"""

from __future__ import annotations

import math

from tvm import relax, te, tirx, topi
from tvm.relax.transform.legalize_ops.common import _try_convert_to_scalar_const
from tvm.relax.transform.legalize_ops.qdq import _quantize as _tvm_quantize

from ..kernels.epilogue import divide
from .load_time_weights import FoldConstantsAtRunTime


def gelu(x: te.Tensor) -> te.Tensor:
    """GELU with TVM's polynomial erf (also inlined into qdense epilogues: `kernels.epilogue`)."""
    half = 0.5
    erf = topi.fast_erf(topi.multiply(x, 1 / math.sqrt(2)))
    return topi.multiply(x, topi.add(half, topi.multiply(erf, half)))


def _gelu(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    return bb.call_te(gelu, call.args[0], primfunc_name_hint="gelu")


def _softmax(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    return bb.call_te(topi.nn.fast_softmax, call.args[0], int(call.attrs.axis), primfunc_name_hint="softmax")


def quantize(data: te.Tensor, scale: float, zp, out_dtype: str) -> te.Tensor:
    """TVM's legalization of ``relax.quantize`` (``clip(round(x / s) + z)`` to the output type's range) for one
    constant float32 scale, the division by `divide`."""
    lo, hi = tirx.min_value(out_dtype), tirx.max_value(out_dtype)

    def compute(*i):
        q = te.round(divide(data[i], scale)) + zp
        return te.max(te.min(q, hi), lo).astype(out_dtype)

    return te.compute(data.shape, compute, name="quantized")


def _quantize(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    scale, zp = (_try_convert_to_scalar_const(a) for a in call.args[1:])
    out_dtype = call.attrs.out_dtype
    if (isinstance(scale, tirx.FloatImm) and str(scale.ty.dtype) == "float32" and str(call.args[0].ty.dtype) == "float32"
            and "int" in out_dtype and isinstance(zp, tirx.IntImm | tirx.FloatImm)):
        return bb.call_te(quantize, call.args[0], float(scale.value), zp, out_dtype, primfunc_name_hint="quantize")
    return _tvm_quantize(bb, call)


LEGALIZE = {"relax.nn.gelu": _gelu, "relax.nn.softmax": _softmax, "relax.quantize": _quantize}


def legalize_passes() -> list:
    """TVM's CPU legalize + fuse passes, with GELU and softmax legalized by `LEGALIZE`."""
    return [
        relax.transform.LegalizeOps(customize_legalize_map=LEGALIZE),
        relax.transform.AnnotateTIROpPattern(),
        FoldConstantsAtRunTime(),  # TVM's FoldConstant everywhere but the load-time function
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
