"""The qkv projection stores the codes its fused vector attention reads: q, k and v are quantized in the qkv kernel's
epilogue, not in the attention kernel.

Matches, after `fused_attention` made a head's attention one vector kernel (AVX-512 VNNI, AVX2) reading the qkv
projection's float output:

    y = call_tir(repq_qdense_…, args)                                 float32 [B·T, 3·H·D], the float epilogue
   [y = reshape(y, [B·T, 3·H·D])]
    o = call_tir(repq_attention_…_qkv…, (y, qk_zp, qk_scale, v_zp, v_scale, [terms,] consts))

and replaces them by

    c = call_tir(repq_qdense_…_codes<i>, (*args, quant))              uint8 [B·T, 3·H·D]
    o = call_tir(repq_attention_…_qkv_codes…, (c, qk_zp, qk_scale, v_zp, v_scale, [terms,] consts))

``quant`` float32 [3, 3·H·D] is each column's quantizer, q's for the first third, then k's and v's (the attention's
``consts`` slots, `kernels.attention_consts`), the qdense kernel's ``column_codes`` tail (`kernels.qdense`): the
unfused quantizers' operations, so the codes and the attention's output are the same bit for bit.  The attention
kernel leaves its consts' q, k and v slots unread.  Where the three thirds' codes differ in width, or y has another
reader, the match is left alone.  Why: y was written as float32 (4 bytes a value) and read again by the attention,
which quantized each value there; the codes are 1 byte.  At batch 8 (DeiT-Small) the float output is 7.3 MB, past
the caches the two kernels share.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from ..kernels.attention_consts import SLOTS
from ..kernels.epilogue import QUANT
from ..relax_util import bound_values, calls_only, const_array, emitted, is_op as is_call, static_shape, var_uses
from .fused_attention import AttentionKernels
from .qdense_tail import FusedKernels, kernel_spec, plain_qdense_spec, without_replaced

_CALL = is_op("relax.call_tir")(wildcard(), wildcard())


def column_quantizers(consts: np.ndarray, hd: int) -> np.ndarray:
    """float32 [`QUANT`, 3·hd]: the q, k and v quantizers of an attention's ``consts`` (float64, `attention_consts`),
    each over its third of the qkv output's columns."""
    per_slot = [consts[1 + QUANT * SLOTS.index(slot):][:QUANT] for slot in ("q", "k", "v")]
    return np.ascontiguousarray(np.repeat(np.stack(per_slot, axis=1), hd, axis=1), np.float32)


@tvm.transform.module_pass(opt_level=0, name="FuseQKVColumnCodes")
class FuseQKVColumnCodes:
    """qkv qdense (float) → vector attention quantizing its thirds → qkv qdense storing the codes → the attention
    reading them (see the module).  `.rewritten` counts the attentions rewritten."""

    def __init__(self, target):
        self.target, self.rewritten = target, 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        self.rewritten = 0
        bb = relax.BlockBuilder(mod)
        linears, attentions = FusedKernels(bb, self.target, "codes"), AttentionKernels(bb)
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function):
                continue
            uses, bound = var_uses(func), bound_values(func)

            def fuse(call, _m, uses=uses, bound=bound):
                spec = kernel_spec(mod, call, "attention")
                qkv = (spec or {}).get("qkv")
                if spec is None or spec["variant"] == "amx" or qkv is None \
                        or qkv.get("codes") or len(set(qkv["tops"])) != 1:
                    return call
                y, *rest = call.args[1].fields
                source = bound.get(y)
                if is_call(source, "relax.reshape") and uses.get(y) == 1:
                    y, source = source.args[0], bound.get(source.args[0])
                linear = plain_qdense_spec(mod, source) if is_call(source, "relax.call_tir") else None
                consts, out_shape = const_array(rest[-1]), static_shape(call)
                rows, cols = spec["Bt"] // qkv["heads"] * spec["N"], 3 * qkv["heads"] * spec["D"]
                if linear is None or linear["variant"] == "amx" or uses.get(y) != 1 or consts is None \
                        or out_shape is None or static_shape(y) != [rows, cols] \
                        or [linear["M"], linear["N"]] != [rows, cols]:
                    return call
                quant = column_quantizers(consts.astype(np.float64), cols // 3)
                out_type = relax.TensorType(out_shape, call.ty.dtype)
                fused = linears.get(source, linear, column_codes=int(qkv["tops"][0]))
                attention = attentions.get({**spec, "qkv": {**qkv, "codes": True}})
                attentions.replaced.add(call.args[0])
                self.rewritten += 1

                def emit():
                    codes = bb.emit(relax.call_tir(fused, relax.Tuple([*source.args[1].fields, relax.const(quant)]),
                                                   relax.TensorType((rows, cols), "uint8")))
                    return relax.call_tir(attention, relax.Tuple([codes, *rest]), out_type)

                return emitted(bb, emit)

            bb.update_func(gv, rewrite_call(_CALL, calls_only(fuse), func))
        return without_replaced(bb.get(), linears.replaced | attentions.replaced)
