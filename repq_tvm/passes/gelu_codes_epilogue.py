"""Fuse GELU and the next layer's quantizer into the qdense kernel before them: fc1 stores fc2's uint8 codes.

Matches, after `quantized_linear` has made fc1 a kernel call:

    y = call_tir(repq_qdense_…, args)              float32 [M, N], a qdense kernel with the float epilogue
    q = quantize(gelu(reshape(y, S)), s, z)        layer-wise: scalar s and z, uint8 codes
   [q = clip(q, 0, 2^b − 1)]                       b-bit codes (`relax_util.code_bits`)

and replaces q by ``reshape(call_tir(repq_qdense_…_gelu<i>, args), S)``: the same kernel spec with
``gelu_codes = (s, z, 2^b − 1)`` (`kernels.epilogue`: the same GELU and rounding as the unfused ops, so the
codes are the same), one kernel per distinct (spec, s, z, b).  Why: the unfused path wrote fc1's float32
output to memory and a separate kernel read it back (in DeiT-Small, 1.2 MB per block each way) to store
1 byte per element.  Where y, its reshape or the GELU has another reader the match is left alone.
"""

from __future__ import annotations

import json

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from ..relax_util import calls_only, code_bits, emitted, scalar_const, scheduled_kernel, static_shape, var_uses

_KERNEL = is_op("relax.call_tir")(wildcard(), wildcard())
_SHAPED = is_op("relax.reshape")(_KERNEL, wildcard())
_GELU = is_op("relax.nn.gelu")(_SHAPED)
_CODES = is_op("relax.quantize")(_GELU, is_const(), is_const())
_CLIPPED = is_op("relax.clip")(_CODES, wildcard(), wildcard())


def _qdense_spec(mod: tvm.IRModule, call: relax.Call) -> dict | None:
    """The spec of the qdense kernel ``call`` calls, if it has the float epilogue and no tail yet."""
    func = mod[call.args[0]] if isinstance(call.args[0], tvm.ir.GlobalVar) else None
    attrs = getattr(func, "attrs", None)
    if attrs is None or "repq.kernel" not in attrs:
        return None
    spec = json.loads(str(attrs["repq.kernel"]))
    ok = spec.get("kind") == "qdense" and spec.get("epilogue") and "gelu_codes" not in spec
    return spec if ok else None


@tvm.transform.module_pass(opt_level=0, name="FuseGeluCodesEpilogue")
class FuseGeluCodesEpilogue:
    """qdense → GELU → quantize [→ clip] → one qdense kernel whose epilogue stores the codes.

    The fused kernel is scheduled for ``target`` as `quantized_linear` scheduled the one it replaces
    (`kernels.qdense.schedule_qdense`: same variant, compensation and default tiles).  `.rewritten` counts
    the fused calls.
    """

    def __init__(self, target):
        self.target, self.rewritten = target, 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        from ..kernels import qdense

        bb, kernels, replaced = relax.BlockBuilder(mod), {}, set()

        def kernel(spec: dict, codes: tuple, name: str) -> tvm.ir.GlobalVar:
            key = json.dumps([spec, codes], sort_keys=True)
            if key not in kernels:
                sch, _, _, _ = qdense.schedule_qdense(
                    spec["M"], spec["N"], spec["K"], self.target, bits_a=spec["bits_a"], bits_w=spec["bits_w"],
                    variant=spec["variant"], epilogue=True, compensate=spec["compensate"], gelu_codes=codes)
                fused_name = f"{name}_gelu{len(kernels)}"
                kernels[key] = bb.add_func(scheduled_kernel(sch, fused_name), fused_name)
            return kernels[key]

        for gv, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function):
                continue
            uses = var_uses(func)

            def fuse(root, m):
                quant, gelu, reshape, call = m[_CODES], m[_GELU], m[_SHAPED], m[_KERNEL]
                single = all(uses.get(x) == 1 for x in (quant.args[0], gelu.args[0], reshape.args[0]))
                s, z = scalar_const(quant.args[1]), scalar_const(quant.args[2])
                spec = _qdense_spec(mod, call)
                shape = static_shape(root)
                if not single or spec is None or s is None or z is None or shape is None \
                        or str(quant.attrs.out_dtype) != "uint8":
                    return root
                if root is not quant and uses.get(root.args[0]) != 1:
                    return root
                top = 2 ** code_bits(root) - 1
                fused = kernel(spec, (float(s), int(z), top), call.args[0].name_hint)
                replaced.add(call.args[0])
                self.rewritten += 1

                def emit():
                    out = bb.emit(relax.call_tir(fused, call.args[1],
                                                 relax.TensorType((spec["M"], spec["N"]), "uint8")))
                    return relax.op.reshape(out, shape)

                return emitted(bb, emit)

            func = rewrite_call(_CLIPPED, calls_only(fuse), func)
            bb.update_func(gv, rewrite_call(_CODES, calls_only(fuse), func))
        out = relax.transform.DeadCodeElimination()(bb.get())
        for gv in replaced - _called(out):  # the float-output kernels no call uses any more
            del out[gv]
        return out


def _called(mod: tvm.IRModule) -> set:
    """GlobalVars the Relax functions of ``mod`` refer to."""
    seen = set()
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: seen.add(e) if isinstance(e, tvm.ir.GlobalVar) else None)
    return seen
