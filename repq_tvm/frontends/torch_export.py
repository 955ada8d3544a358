"""torch.export frontend: calibrated fake-quant model → canonical Relax module.

Quantizers are swapped for `torch.ops.repq.*` custom ops (`quant_ops.as_custom_ops`), exported, and
each custom op is converted by `custom_convert_map` straight into its canonical form. The program is
imported without `run_ep_decomposition`: decomposed `aten.linear` becomes reshape/addmm chains that the
ONNX route does not have, and the undecomposed ops all have TVM converters.
"""

from __future__ import annotations

import torch
import tvm
from tvm.relax.frontend.torch import from_exported_program

from ..errors import ReqError
from . import canonical
from .normalize import normalize
from .quant_ops import as_custom_ops


def _fake_quant(node, importer):
    x, scale, zp, bits = node.args
    return importer.block_builder.emit(canonical.uniform_qdq(importer.env[x], scale, zp, bits))


def _dequantize_weight(node, importer):
    codes, scale, zp = (importer.env[a] for a in node.args)
    return importer.block_builder.emit(canonical.weight_dq(codes, scale, zp))


def _log_fake_quant(node, importer):
    x, scale, bits, sqrt2 = node.args
    xe = importer.env[x]
    return importer.block_builder.emit(canonical.log_fake_quant(xe, xe.ty, scale, bits, sqrt2))


CONVERT_MAP = {
    "fake_quant.default": _fake_quant,
    "dequantize_weight.default": _dequantize_weight,
    "log_fake_quant.default": _log_fake_quant,
}


def export_program(model: torch.nn.Module, input_shape) -> torch.export.ExportedProgram:
    """The model as an ExportedProgram whose quantizers are `torch.ops.repq` nodes."""
    model.eval()
    with as_custom_ops(model), torch.no_grad():
        program = torch.export.export(model, (torch.zeros(tuple(input_shape)),))
    fused = [n.name for n in program.graph.nodes if "scaled_dot_product" in str(n.target)]
    if fused:  # fused attention hides both matmuls from the quantizers
        raise ReqError(f"the model still uses fused attention ({', '.join(fused)}): "
                       "quantize it with repq_tvm.quant first")
    return program


def export_relax(model: torch.nn.Module, input_shape) -> tvm.IRModule:
    """Import a calibrated model into the canonical Relax form (weights bound as constants)."""
    program = export_program(model, input_shape)
    try:
        mod = from_exported_program(program, keep_params_as_input=False, unwrap_unit_return_tuple=True,
                                    custom_convert_map=CONVERT_MAP, run_ep_decomposition=False)
    except AssertionError as e:  # TVM asserts on ops it has no converter for, and lists them
        if "Unsupported function types" not in str(e):
            raise
        ops = str(e).split("Unsupported function types", 1)[1].strip()
        raise ReqError(f"unsupported op in the graph: {ops} (no TVM Relax converter)") from None
    return normalize(mod)
