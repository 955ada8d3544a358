"""Legalize GELU and softmax with TVM's polynomial erf / exp, so their loops vectorize.

TVM's default legalization calls libm's `erff` / `expf` per element: LLVM cannot vectorize those
calls, and GELU alone was ~8 ns per element. `topi.fast_erf` / `topi.fast_exp` are rational and
polynomial approximations within a few float32 ulps of libm, written in plain arithmetic that
vectorizes. The values differ from PyTorch's in the last bits only; like any float op order change,
that can move a value across a quantizer's rounding midpoint (bounded and asserted in the model tests).
"""

from __future__ import annotations

import math

from tvm import relax, te, topi

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


LEGALIZE = {"relax.nn.gelu": _gelu, "relax.nn.softmax": _softmax}


def legalize_passes() -> list:
    """TVM's CPU legalize + fuse passes, with GELU and softmax legalized by `LEGALIZE`."""
    return [
        relax.transform.LegalizeOps(customize_legalize_map=LEGALIZE),
        relax.transform.AnnotateTIROpPattern(),
        FoldConstantsAtRunTime(),  # TVM's FoldConstant everywhere but the load-time function
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
