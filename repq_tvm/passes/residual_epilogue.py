"""Fuse the residual add after a linear into its qdense kernel: proj and fc2 store x + y, not y.

Matches, after `quantized_linear` has made the linear a kernel call:

    y = call_tir(repq_qdense_…, args)       float32 [M, N], a qdense kernel with the float epilogue
    z = add(x, reshape(y, S))               or add(reshape(y, S), x); x float32 of shape S

and replaces z by ``reshape(call_tir(repq_qdense_…_res, (*args, reshape(x, [M, N]))), S)``: the kernel's
epilogue adds ``x[m, n]`` to its float result before storing it (`kernels.qdense`, ``residual``), the same
IEEE addition the add did.  Why: the add was a kernel of its own that read y back from memory (0.34 ms of
DeiT-Small's run on Sapphire Rapids, 24 calls).  Where y or its reshape has another reader, or the kernel
already has a tail, the match is left alone.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from ..relax_util import bound_values, calls_only, emitted, static_shape, var_uses
from .qdense_tail import FusedKernels, plain_qdense_spec

_KERNEL = is_op("relax.call_tir")(wildcard(), wildcard())
_SHAPED = is_op("relax.reshape")(_KERNEL, wildcard())
_OTHER = wildcard()
_ADD = is_op("relax.add")(_OTHER, _SHAPED) | is_op("relax.add")(_SHAPED, _OTHER)


@tvm.transform.module_pass(opt_level=0, name="FuseResidualEpilogue")
class FuseResidualEpilogue:
    """qdense → reshape → add(x, ·) → one qdense kernel whose epilogue adds x.

    `.rewritten` counts the fused calls (their kernels: `qdense_tail.FusedKernels`).
    """

    def __init__(self, target):
        self.target, self.rewritten = target, 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        bb = relax.BlockBuilder(mod)
        kernels = FusedKernels(bb, self.target, "res")
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function):
                continue
            uses = var_uses(func)
            bound = bound_values(func)

            def fuse(add, m):
                reshape, call = m[_SHAPED], m[_KERNEL]
                # which operand is the reshaped kernel output (dpl hands over bound values, not variables)
                i = next((i for i, a in enumerate(add.args) if bound.get(a, a).same_as(reshape)), None)
                spec = plain_qdense_spec(mod, call)
                shape = static_shape(add)
                if i is None or spec is None or shape is None:
                    return add
                other = add.args[1 - i]
                if static_shape(other) != shape or other.ty.dtype != "float32" or uses.get(add.args[i]) != 1 \
                        or uses.get(reshape.args[0]) != 1:
                    return add
                fused = kernels.get(call, spec, residual=True)
                self.rewritten += 1

                def emit():
                    res = bb.emit(relax.op.reshape(other, [spec["M"], spec["N"]]))
                    out = bb.emit(relax.call_tir(fused, relax.Tuple([*call.args[1].fields, res]),
                                                 relax.TensorType((spec["M"], spec["N"]), "float32")))
                    return relax.op.reshape(out, shape)

                return emitted(bb, emit)

            bb.update_func(gv, rewrite_call(_ADD, calls_only(fuse), func))
        return kernels.finish()
