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

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from ..relax_util import calls_only, code_bits, emitted, scalar_const, static_shape, var_uses
from .qdense_tail import FusedKernels, plain_qdense_spec

_KERNEL = is_op("relax.call_tir")(wildcard(), wildcard())
_SHAPED = is_op("relax.reshape")(_KERNEL, wildcard())
_GELU = is_op("relax.nn.gelu")(_SHAPED)
_CODES = is_op("relax.quantize")(_GELU, is_const(), is_const())
_CLIPPED = is_op("relax.clip")(_CODES, wildcard(), wildcard())


@tvm.transform.module_pass(opt_level=0, name="FuseGeluCodesEpilogue")
class FuseGeluCodesEpilogue:
    """qdense → GELU → quantize [→ clip] → one qdense kernel whose epilogue stores the codes.

    `.rewritten` counts the fused calls (their kernels: `qdense_tail.FusedKernels`).
    """

    def __init__(self, target):
        self.target, self.rewritten = target, 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        bb = relax.BlockBuilder(mod)
        kernels = FusedKernels(bb, self.target, "gelu")
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function):
                continue
            uses = var_uses(func)

            def fuse(root, m):
                quant, gelu, reshape, call = m[_CODES], m[_GELU], m[_SHAPED], m[_KERNEL]
                single = all(uses.get(x) == 1 for x in (quant.args[0], gelu.args[0], reshape.args[0]))
                s, z = scalar_const(quant.args[1]), scalar_const(quant.args[2])
                spec = plain_qdense_spec(mod, call)
                shape = static_shape(root)
                if not single or spec is None or s is None or z is None or shape is None \
                        or str(quant.attrs.out_dtype) != "uint8":
                    return root
                if root is not quant and uses.get(root.args[0]) != 1:
                    return root
                top = 2 ** code_bits(root) - 1
                fused = kernels.get(call, spec, gelu_codes=(float(s), int(z), top))
                self.rewritten += 1

                def emit():
                    out = bb.emit(relax.call_tir(fused, call.args[1],
                                                 relax.TensorType((spec["M"], spec["N"]), "uint8")))
                    return relax.op.reshape(out, shape)

                return emitted(bb, emit)

            func = rewrite_call(_CLIPPED, calls_only(fuse), func)
            bb.update_func(gv, rewrite_call(_CODES, calls_only(fuse), func))
        return kernels.finish()
