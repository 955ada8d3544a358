"""Fuse GELU and the next layer's quantizer into the qdense kernel before them: fc1 stores fc2's codes.

Matches, after `quantized_linear` has made fc1 a kernel call:

    y = call_tir(repq_qdense_…, args)              float32 [M, N], a qdense kernel with the float epilogue
    q = quantize(gelu(reshape(y, S)), s, z)        layer-wise: scalar s and z, uint8 codes
   [q = clip(q, 0, 2^b − 1)]                       b-bit codes (`relax_util.code_bits`)

and replaces q by ``reshape(call_tir(repq_qdense_…_gelu<i>, (*args, quant)), S)``: the same kernel spec with
``gelu_codes`` = {"top": 2^b − 1} and the quantizer as one more operand, ``quant`` = (s, 1/s, z) (a constant,
`kernels.epilogue.quantizer_args`; the same GELU and rounding as the unfused ops, so the codes are the same), one
kernel per distinct (spec, b): the fc1 kernels of all blocks of a ViT are one, compiled once.  Why the fusion: the
unfused path wrote fc1's float32 output to memory and a separate kernel read it back (in DeiT-Small, 1.2 MB per
block each way) to store 1 byte per element.  Where y, its reshape or the GELU has another reader the match is left
alone.

Where fc2 reads its activations as int16 or int8 (AVX2's `vpmaddwd` kernels: ``q − z``; sdot: ``q − 128``), the
casts `quantized_linear` put after q for that are matched with it (`qdense_tail.CodesTail`), and fc1 stores them
itself (``codes_operand``, `epilogue.as_operand`): the cast was a kernel of its own (TVM's fusion stops at the
reshape), reading fc1's output once more.  AVX2's centred codes subtract the quantizer's zero point, which the kernel
reads from its ``quant`` operand too (``codes_operand`` = ("int16", `epilogue.ZERO_POINT`)).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from ..kernels.epilogue import quantizer_args
from ..relax_util import calls_only, emitted, static_shape, var_uses
from .qdense_tail import CodesTail, FusedKernels, plain_qdense_spec

_KERNEL = is_op("relax.call_tir")(wildcard(), wildcard())
_SHAPED = is_op("relax.reshape")(_KERNEL, wildcard())
_GELU = is_op("relax.nn.gelu")(_SHAPED)
_TAIL = CodesTail(_GELU)


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

            def fuse(root, m, uses=uses):
                gelu, reshape, call = m[_GELU], m[_SHAPED], m[_KERNEL]
                tail = _TAIL.tail(root, m, uses)
                spec = plain_qdense_spec(mod, call)
                shape = static_shape(root)
                if tail is None or spec is None or shape is None \
                        or not all(uses.get(x) == 1 for x in (gelu.args[0], reshape.args[0])):
                    return root
                operand, (s, z, top) = tail["operand"], tail["codes"]
                fused = kernels.get(call, spec, gelu_codes=top,
                                    **({} if operand is None else {"codes_operand": operand}))
                self.rewritten += 1
                dtype = "uint8" if operand is None else operand[0]
                args = relax.Tuple([*call.args[1].fields, relax.const(quantizer_args(s, z))])

                def emit():
                    out = bb.emit(relax.call_tir(fused, args, relax.TensorType((spec["M"], spec["N"]), dtype)))
                    return relax.op.reshape(out, shape)

                return emitted(bb, emit)

            for pattern in _TAIL.patterns[:-1]:  # the largest match first
                func = rewrite_call(pattern, calls_only(fuse), func)
            bb.update_func(gv, rewrite_call(_TAIL.codes, calls_only(fuse), func))
        return kernels.finish()
