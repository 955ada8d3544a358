"""ONNX frontend: calibrated fake-quant model → standard QDQ ONNX file (runs in ONNX Runtime) → canonical Relax.

Export (`torch.onnx.export`, dynamo, with a custom translation of the `torch.ops.repq` ops):
- uniform activation: QuantizeLinear(x, s, z:uint8) → Clip(q, 0, 2^b − 1) [b < 8] → DequantizeLinear(q, s, z);
- weight: uint8 code initializer → DequantizeLinear(codes, s[N], z[N]:uint8, axis=0);
- log quantizer (m = 2 for log√2, 1 for log2; s scale, b bits), standard ops only::

      raw = Round(Mul(Log(Div(x, s)), −m/ln 2))        # round(−m·log2(x/s))
      y   = Where(LessOrEqual(raw, 2^b − 1),            # false also for x = 0 (raw = +inf) and NaN
                  Mul(Pow(2, Mul(Relu(raw), −1/m)), s), 0)

Every node keeps the exporter's `namespace` metadata (the module path of its layer). The file is
cleaned with constant folding only (`_cleanup`).
Import: all-zero Pads dropped, `tvm.relax.frontend.onnx.from_onnx`, then `normalize.normalize` folds these
patterns back into the canonical form.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.numpy_helper
import torch
import tvm
from onnxscript import ir
from onnxscript import opset21 as op
from tvm.relax.frontend.onnx import from_onnx

from ..atomic import atomic_file
from ..errors import ReqError
from .normalize import normalize
from .quant_ops import as_custom_ops

OPSET = 21


def _const(value, dtype):
    return op.Constant(value=ir.tensor(np.array(value, dtype=dtype)))


def _fake_quant(x, scale: float, zero_point: int, bits: int):
    s, z = _const(scale, np.float32), _const(zero_point, np.uint8)
    q = op.QuantizeLinear(x, s, z)
    if bits < 8:
        q = op.Clip(q, _const(0, np.uint8), _const(2 ** bits - 1, np.uint8))
    return op.DequantizeLinear(q, s, z)


def _dequantize_weight(codes, scale, zero_point):
    return op.DequantizeLinear(codes, scale, zero_point, axis=0)


def _log_fake_quant(x, scale: float, bits: int, sqrt2: bool):
    m = 2.0 if sqrt2 else 1.0
    s = _const(scale, np.float32)
    raw = op.Round(op.Mul(op.Log(op.Div(x, s)), _const(-m / math.log(2), np.float32)))
    keep = op.LessOrEqual(raw, _const(2 ** bits - 1, np.float32))
    val = op.Mul(op.Pow(_const(2, np.float32), op.Mul(op.Relu(raw), _const(-1 / m, np.float32))), s)
    return op.Where(keep, val, _const(0, np.float32))


TRANSLATIONS = {
    torch.ops.repq.fake_quant.default: _fake_quant,
    torch.ops.repq.dequantize_weight.default: _dequantize_weight,
    torch.ops.repq.log_fake_quant.default: _log_fake_quant,
}


def _cleanup(model) -> None:
    """Constant folding and dead-node removal, in place. Not the full onnxscript optimizer: its rewrite rules
    take ~6 s per model here and change the graph (e.g. drop an all-zero Gemm bias) for no benefit."""
    import onnx_ir.passes.common as passes
    from onnxscript.optimizer import fold_constants

    fold_constants(model, onnx_shape_inference=True)
    for p in (passes.RemoveUnusedNodesPass(),
              passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
              passes.DeduplicateInitializersPass(), passes.CommonSubexpressionEliminationPass(),
              passes.RemoveUnusedNodesPass(), passes.NameFixPass()):
        p(model)


def _drop_zero_pads(model: onnx.ModelProto) -> onnx.ModelProto:
    """Pad nodes with all-zero constant pads become Identity (TVM would import them as a call_tir copy)."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Pad" and node.input[1] in inits and not inits[node.input[1]].any():
            node.op_type = "Identity"
            del node.input[1:]
            del node.attribute[:]
    return model


def export_onnx(model: torch.nn.Module, input_shape, path: str) -> str:
    """Write the calibrated model as a QDQ ONNX file (opset 21, input `x`, output `y`); returns `path`."""
    model.eval()
    with as_custom_ops(model), torch.no_grad():
        prog = torch.onnx.export(model, (torch.zeros(tuple(input_shape)),), dynamo=True, opset_version=OPSET,
                                 custom_translation_table=TRANSLATIONS, input_names=["x"], output_names=["y"],
                                 external_data=False, verbose=False, optimize=False)
    _cleanup(prog.model)
    with atomic_file(path) as tmp:  # an interrupted export keeps the previous file
        prog.save(tmp, external_data=False)
    return path


def import_onnx(path: str) -> tvm.IRModule:
    """Import an exported file into the canonical Relax form."""
    model = _drop_zero_pads(onnx.load(path))
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    try:
        mod = from_onnx(model, shape_dict=shapes)
    except tvm.error.OpNotImplemented as e:  # names the ops TVM has no converter for
        ops = str(e).split("frontend ONNX:", 1)[-1].strip().splitlines()[0]
        raise ReqError(f"unsupported op in the graph: {ops} (no TVM Relax ONNX converter)") from None
    return normalize(mod)
