"""Fuse the output projection's quantizer into the fused attention kernel: it stores proj's input codes.

Matches, after `fused_attention` has made each attention one kernel call:

    o = call_tir(repq_attention_…, args)                        float32 [B·H, T, D], the heads
    x = reshape(permute_dims(reshape(o, [B, H, T, D]), [0, 2, 1, 3]), [B, T, H·D])   back to token order
    q = quantize(x, s, z) [→ clip] [→ the casts proj's kernel reads]                  (`qdense_tail.CodesTail`)

and replaces q by ``call_tir(repq_attention_…_out_codes, args)`` [→ reshape]: the same kernel spec with
``out_codes`` (`attention_amx.Output`: the unfused quantizer's and casts' operations, so the same codes), one
kernel per distinct spec; the quantizer goes into the call's ``consts`` (`kernels.attention_consts`, the last
argument), so the blocks' calls share the kernel (AVX2's centred int16 codes subtract that quantizer's zero point,
`CodesTail`).  Why: the float heads went to memory and a kernel per
block read them back, moved them to token order and quantized them (DeiT-Small: 12 calls; the last float round
trip between two integer kernels of a block).  Where an intermediate has another reader the match is left alone.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from ..kernels.attention_consts import CONSTS, with_quantizer
from ..relax_util import calls_only, const_array, emitted, static_shape, var_uses
from .fused_attention import AttentionKernels, consts_arg
from .qdense_tail import CodesTail, kernel_spec

_ATTENTION = is_op("relax.call_tir")(wildcard(), wildcard())
_HEADS = is_op("relax.reshape")(_ATTENTION, wildcard())
_TOKENS = is_op("relax.permute_dims")(_HEADS)
_ROWS = is_op("relax.reshape")(_TOKENS, wildcard())
_TAIL = CodesTail(_ROWS)


def _tokens(m) -> tuple[int, int, int, int] | None:
    """(B, T, H, D) when the match moves heads [B·H, T, D] of the attention's output to token order [B, T, H·D],
    else None."""
    heads, tokens, rows = (static_shape(m[p]) for p in (_HEADS, _TOKENS, _ROWS))
    src = static_shape(m[_ATTENTION])
    axes = m[_TOKENS].attrs.axes
    if None in (heads, rows, src) or len(heads) != 4 or len(src) != 3 or axes is None \
            or [int(a) for a in axes] != [0, 2, 1, 3]:
        return None
    b, h, t, d = heads
    ok = [b * h, t, d] == list(src) and list(tokens) == [b, t, h, d] and list(rows) in ([b, t, h * d], [b * t, h * d])
    return (b, t, h, d) if ok else None


@tvm.transform.module_pass(opt_level=0, name="FuseAttentionOutputCodes")
class FuseAttentionOutputCodes:
    """fused attention → heads to tokens → quantize [→ clip] [→ casts] → one attention kernel storing the codes.

    `.rewritten` counts the fused calls.
    """

    def __init__(self, target):
        self.target, self.rewritten = target, 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        self.rewritten = 0

        def rewrite(func: relax.Function, kernels: AttentionKernels) -> relax.Function:
            uses, bb = var_uses(func), kernels.bb

            def fuse(root, m):
                call = m[_ATTENTION]
                spec = kernel_spec(mod, call, "attention")
                tail = _TAIL.tail(root, m, uses)
                tokens = _tokens(m)
                shape = static_shape(root)
                if spec is None or spec.get("out_codes") or tail is None \
                        or tokens is None or shape is None \
                        or not all(uses.get(m[p].args[0]) == 1 for p in (_HEADS, _TOKENS, _ROWS)):
                    return root
                b, t, h, d = tokens
                (s, z, top), operand = tail["codes"], tail["operand"]
                consts = const_array(call.args[1].fields[-1]) if isinstance(call.args[1], relax.Tuple) else None
                if consts is None or consts.shape != (CONSTS,) or consts.dtype != np.float64:
                    return root
                spec = {**spec, "out_codes": {"heads": h, "top": top, "operand": list(operand) if operand else None}}
                args = relax.Tuple([*call.args[1].fields[:-1], consts_arg(with_quantizer(consts, "out", s, z))])
                kernel = kernels.get(spec)
                kernels.replaced.add(call.args[0])
                self.rewritten += 1
                dtype = str(root.ty.dtype)

                def emit():
                    out = bb.emit(relax.call_tir(kernel, args, relax.TensorType((b, t, h * d), dtype)))
                    return out if list(shape) == [b, t, h * d] else relax.op.reshape(out, shape)

                return emitted(bb, emit)

            for pattern in _TAIL.patterns[:-1]:  # the largest match first
                func = rewrite_call(pattern, calls_only(fuse), func)
            return rewrite_call(_TAIL.codes, calls_only(fuse), func)

        return AttentionKernels.rewrite(mod, rewrite)
