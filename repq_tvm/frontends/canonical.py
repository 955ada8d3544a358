"""Builders of the canonical quantizer forms, the log-quantizer runtime, `canonical_ops` and `lower_log_quant`.

Both frontends emit quantizers only through these builders, so the two imports cannot drift apart.
The log quantizer is an opaque `call_pure_packed` to a named global function: later passes match it
by name, and a plain `tvm.compile` runs it through the NumPy implementation registered on import of
this module. `lower_log_quant` replaces it by plain Relax ops where Python is not available at run time.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..relax_util import rewrite_functions

LOG_OPS = {True: "repq.log_sqrt2_fake_quant", False: "repq.log2_fake_quant"}


def uniform_qdq(x: relax.Expr, scale: float, zero_point: int, bits: int) -> relax.Expr:
    """dequantize(clip(quantize(x, s, z, uint8), 0, 2^b − 1), s, z) — the clip only when b < 8."""
    s, z = relax.const(scale, "float32"), relax.const(zero_point, "uint8")
    q = relax.op.quantize(x, s, z, axis=-1, out_dtype="uint8")
    if bits < 8:
        q = relax.op.clip(q, 0, 2 ** bits - 1)
    return relax.op.dequantize(q, s, z, axis=-1, out_dtype="float32")


def weight_dq(codes: relax.Expr, scale: relax.Expr, zero_point: relax.Expr) -> relax.Expr:
    """dequantize(uint8 codes[N, ...], scale[N] f32, zero_point[N] u8, axis=0)."""
    return relax.op.dequantize(codes, scale, zero_point, axis=0, out_dtype="float32")


def log_fake_quant(x: relax.Expr, ty, scale: float, bits: int, sqrt2: bool = True) -> relax.Expr:
    """call_pure_packed("repq.log_sqrt2_fake_quant", x, scale (f32 scalar const), bits (int64 PrimValue))."""
    return relax.op.call_pure_packed(LOG_OPS[sqrt2], x, relax.const(scale, "float32"),
                                     relax.prim_value(int(bits)), ty_args=ty)


def log_fake_quant_np(x: np.ndarray, scale, bits: int, sqrt2: bool) -> np.ndarray:
    """x̂ = s·2^(−q/m), q = clamp(round(−m·log2(x/s)), 0, 2^b − 1); 0 for codes past 2^b − 1 and x ≤ 0.

    Written like `quant.quantizers.log_codes/log_dequant` (float32, same operation order) so it gives the
    same bits as the PyTorch fake quantizer.
    """
    m, scale = (2.0 if sqrt2 else 1.0), np.float32(scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = np.round(np.float32(-m) * np.log2(x / scale))
        under = ~(raw <= 2 ** bits - 1)
        q = np.clip(np.nan_to_num(raw, nan=0.0), 0, 2 ** bits - 1)
        if sqrt2:
            odd = np.mod(q, 2)
            val = np.power(np.float32(2), -np.ceil(q / 2)) * (1 + np.float32(math.sqrt(2) - 1) * odd) * scale
        else:
            val = np.power(np.float32(2), -q) * scale
    return np.where(under, np.float32(0), val).astype(np.float32)


def _register(sqrt2: bool) -> None:
    def run(x, scale, bits):
        return tvm.runtime.tensor(log_fake_quant_np(x.numpy(), scale.numpy(), int(bits), sqrt2))

    tvm.register_global_func(LOG_OPS[sqrt2], run, override=True)


for _sqrt2 in LOG_OPS:
    _register(_sqrt2)


def log_fake_quant_ops(x: relax.Expr, scale: float, bits: int, sqrt2: bool = True) -> relax.Expr:
    """The log quantizer in plain Relax ops (the ONNX pattern; `normalize` folds it back to the named call):
    where(raw <= 2^b − 1, s·2^(relu(raw)·(−1/m)), 0), raw = round(log(x/s)·(−m/ln 2))."""
    m, s = (2.0 if sqrt2 else 1.0), relax.const(scale, "float32")
    op = relax.op
    raw = op.round(op.multiply(op.log(op.divide(x, s)), relax.const(-m / math.log(2), "float32")))
    keep = op.less_equal(raw, relax.const(2 ** bits - 1, "float32"))
    val = op.multiply(op.power(relax.const(2.0, "float32"),
                               op.multiply(op.nn.relu(raw), relax.const(-1 / m, "float32"))), s)
    return op.where(keep, val, relax.const(0.0, "float32"))


def log_call_params(call) -> tuple[relax.Expr, float, int, bool] | None:
    """(x, scale, bits, sqrt2) of a canonical log-quantizer call, else None."""
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)
            and call.op.name == "relax.call_pure_packed"):
        return None
    name = call.args[0].global_symbol
    if name not in LOG_OPS.values():
        return None
    x, scale, bits = call.args[1:]
    return x, float(scale.value.numpy()), int(bits.value), name == LOG_OPS[True]


@mutator
class _LowerLog(PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        params = log_call_params(call)
        return call if params is None else log_fake_quant_ops(*params)


def lower_log_quant(mod: tvm.IRModule) -> tvm.IRModule:
    """Replace every named log-quantizer call by plain Relax ops (no Python needed at run time)."""
    return rewrite_functions(_LowerLog(mod), mod)


def canonical_ops(mod: tvm.IRModule, func: str = "main") -> collections.Counter:
    """Count the calls in `mod[func]` by op name (`relax.matmul`, ...; packed calls by their global symbol)."""
    counts: collections.Counter = collections.Counter()

    def visit(expr):
        if isinstance(expr, relax.Call):
            if isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.call_pure_packed":
                counts[expr.args[0].global_symbol] += 1
            elif isinstance(expr.op, tvm.ir.Op):
                counts[expr.op.name] += 1
            elif isinstance(expr.op, tvm.ir.GlobalVar):
                counts[expr.op.name_hint] += 1

    relax.analysis.post_order_visit(mod[func].body, visit)
    return counts
