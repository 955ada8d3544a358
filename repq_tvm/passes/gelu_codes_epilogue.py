"""Fuse GELU and the next layer's quantizer into the qdense kernel before them: fc1 stores fc2's codes.

Matches, after `quantized_linear` has made fc1 a kernel call:

    y = call_tir(repq_qdense_…, args)              float32 [M, N], a qdense kernel with the float epilogue
    q = quantize(gelu(reshape(y, S)), s, z)        layer-wise: scalar s and z, uint8 codes
   [q = clip(q, 0, 2^b − 1)]                       b-bit codes (`relax_util.code_bits`)

and replaces q by ``reshape(call_tir(repq_qdense_…_gelu<i>, args), S)``: the same kernel spec with
``gelu_codes = (s, z, 2^b − 1)`` (`kernels.epilogue`: the same GELU and rounding as the unfused ops, so the
codes are the same), one kernel per distinct (spec, s, z, b).  Why: the unfused path wrote fc1's float32
output to memory and a separate kernel read it back (in DeiT-Small, 1.2 MB per block each way) to store
1 byte per element.  Where y, its reshape or the GELU has another reader the match is left alone.

Where fc2 reads its activations as int16 or int8 (AVX2's `vpmaddwd` kernels: ``q − z``; sdot: ``q − 128``), the
ops `quantized_linear` put after q for that

    a = subtract(astype(q, int16), c)   |   astype(subtract(astype(q, int16), c), int8)   |   astype(q, int8)

are matched with it, and fc1 stores ``a`` itself (``codes_operand``, `epilogue.as_operand`): the cast was a kernel
of its own (TVM's fusion stops at the reshape), reading fc1's output once more.
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
_Q = _CLIPPED | _CODES
_WIDE = is_op("relax.astype")(_Q)
_CENTRED = is_op("relax.subtract")(_WIDE, is_const())  # int16 operand, or sdot's before its int8 cast
_SHIFTED = is_op("relax.astype")(_CENTRED)  # sdot: int8 of the centred int16
_NARROW = is_op("relax.astype")(_Q)  # sdot, codes of at most 7 bits: int8 of the codes


def _operand(root, m) -> tuple[str, int] | None:
    """(dtype, minus) of the kernel operand a match of `_SHIFTED`, `_CENTRED` or `_NARROW` computes
    (`epilogue.as_operand`), None where its casts are not the ones `quantized_linear` emits."""
    dtype = str(root.ty.dtype)
    if m.get(_CENTRED) is None:  # _NARROW: int8 of the codes
        return ("int8", 0) if dtype == "int8" else None
    c = scalar_const(m[_CENTRED].args[1])
    if c is None or c != int(c) or str(m[_WIDE].ty.dtype) != "int16":
        return None
    want = "int8" if m.get(_SHIFTED) is not None else "int16"  # sdot's int8 of the centred codes, or those
    return (want, int(c)) if dtype == want else None


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
                operand = None
                if not root.same_as(quant) and root.op.name != "relax.clip":  # the next linear's kernel operand
                    operand = _operand(root, m)
                    inner = [x.args[0] for x in (root, m.get(_CENTRED), m.get(_WIDE)) if x is not None]  # the codes
                    # and what the casts made of them: read by these casts only
                    if operand is None or not all(uses.get(x) == 1 for x in inner):
                        return root
                s, z = scalar_const(quant.args[1]), scalar_const(quant.args[2])
                spec = plain_qdense_spec(mod, call)
                shape = static_shape(root)
                if not single or spec is None or s is None or z is None or shape is None \
                        or str(quant.attrs.out_dtype) != "uint8":
                    return root
                clip = m.get(_CLIPPED)
                if clip is not None and uses.get(clip.args[0]) != 1:
                    return root
                top = 2 ** code_bits(clip if clip is not None else quant) - 1
                tail = {} if operand is None else {"codes_operand": operand}
                fused = kernels.get(call, spec, gelu_codes=(float(s), int(z), top), **tail)
                self.rewritten += 1
                dtype = "uint8" if operand is None else operand[0]

                def emit():
                    out = bb.emit(relax.call_tir(fused, call.args[1],
                                                 relax.TensorType((spec["M"], spec["N"]), dtype)))
                    return relax.op.reshape(out, shape)

                return emitted(bb, emit)

            for pattern in (_SHIFTED, _CENTRED, _NARROW, _CLIPPED):  # the largest match first
                func = rewrite_call(pattern, calls_only(fuse), func)
            bb.update_func(gv, rewrite_call(_CODES, calls_only(fuse), func))
        return kernels.finish()
