"""Fuse a head's whole log√2 attention into one kernel: q @ kᵀ → softmax → codes → weights → attn @ V.

Matches, after `quantized_qk` and `log2_attention` have lowered the attention to three kernel calls:

    y = call_tir(repq_qbmm_…, (q, k, qk_zp, qk_scale))            float32 [Bt, M, N], k in rows ("nd")
   [y = add(reshape*(y), bias) [, add(reshape*(y), mask)]]        Swin: constants added to the logits
    w = call_tir(repq_log_weights_softmax_…, (y [→ reshape]*, log2s))  int16 weight planes, the softmax fused
    o = call_tir(repq_attn_v_…, (w, v, v_zp, v_scale))            float32 [Bt, M, D]

and replaces o by ``call_tir(repq_attention_…, (q, k, qk_zp, qk_scale, v, v_zp, v_scale[, terms], consts))``, the
three kernels' arithmetic bit for bit: `kernels.attention_amx` on targets with AMX-INT8 (and AVX-512 VBMI, which every AMX CPU
has) for shapes its tiles block, `kernels.attention_vector` on x86 targets without AMX (AVX-512 VNNI or AVX2).  Why:
the three kernels wrote and read their intermediates (float32 logits, int16 weight planes) through memory.
aarch64 keeps the three kernels; where y or w has another reader the match is left alone.  The constants added to
the logits (Swin's relative position bias per head, its shifted windows' mask per window) become the vector
kernel's logit terms (`logit_terms`: one table per head or window, added in the graph's order); the AMX kernel
takes none, so there they keep the three kernels.

The vector kernel also takes the model's q, k and v from the qkv projection's float output when they are its
three thirds under their quantizers (what `qkv_head_split` would otherwise turn into three slice → head transpose
→ quantize kernels; on AMX the qkv kernel's epilogue stores the codes, `qkv_codes_epilogue`):

    p  = permute_dims(reshape*(x, [B, T, 3, H, D]), [2, 0, 3, 1, 4])
    q  = reshape*(clip?(quantize(squeeze(strided_slice(p, [0], [0], [1]), [0]), s_q, z_q)))     k: 1, v: 2

and calls the kernel on ``x`` as [B·T, 3·H·D] with the three quantizers in its ``consts`` (below;
`epilogue.quantize_codes`, the unfused quantize's operations).

The kernel's spec holds the structure only: the log quantizer's log2(s) (the weights call's ``log2s``) and the q, k, v
quantizers go into its ``consts`` operand, a constant argument of each call (`kernels.attention_consts`), so all blocks
of a model with the same shapes call one kernel (DeiT-Small: one, where twelve were compiled).
"""

from __future__ import annotations

import json
import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, is_tuple, rewrite_call, wildcard

from ..kernels.attention_consts import SLOTS, attention_consts
from ..relax_util import (
    bound_values,
    calls_only,
    code_bits,
    const_array,
    int_list,
    scalar_const,
    static_shape,
    var_uses,
)
from ..relax_util import is_op as is_call
from ..targets import target_has
from .qdense_tail import kernel_spec, without_replaced


def _reshaped(pattern):
    """``pattern`` under up to two reshapes."""
    once = is_op("relax.reshape")(pattern, wildcard())
    return pattern | once | is_op("relax.reshape")(once, wildcard())


_QK = is_op("relax.call_tir")(wildcard(), wildcard())
_BIASED = is_op("relax.add")(_reshaped(_QK), is_const())  # Swin: the relative position bias
_MASKED = is_op("relax.add")(_reshaped(_BIASED), is_const())  # and the shifted windows' mask
_LOGITS = _reshaped(_MASKED) | _reshaped(_BIASED) | _reshaped(_QK)
_LOG2S = is_const()
_WEIGHTS = is_op("relax.call_tir")(wildcard(), is_tuple([_LOGITS, _LOG2S]))
_ATTN_V = is_op("relax.call_tir")(wildcard(), is_tuple([_WEIGHTS, wildcard(), is_const(), is_const()]))


def attention_spec_of(qk: dict, lw: dict, av: dict, target, terms: int = 0) -> dict | None:
    """The fused kernel's spec from the three kernels' specs, or None when they are not one attention a fused
    kernel of ``target`` takes (k not in rows, the softmax not fused, shapes or quantizers that disagree, no
    variant for the target or the shape, ``terms`` logit terms on AMX, whose kernel takes none)."""
    from ..kernels import attention_amx, attention_vector

    bt, m, n, d = qk["Bt"], qk["M"], qk["N"], qk["D"]
    if (qk["b_layout"] != "nd" or not lw["softmax"] or lw["shape"] != [bt, m, n]
            or [av["Bt"], av["M"], av["N"], av["D"]] != [bt, m, n, d] or not av["epilogue"]
            or av["groups"] != lw["groups"] or av["f"] != lw["f"]):
        return None
    quantizer = {"bits": lw["bits"], "sqrt2": lw["sqrt2"], "f": lw["f"], "groups": lw["groups"],
                 "v_bits": av["v_bits"]}
    if target_has(target, "amx-int8"):  # the tile products and the vpermb byte table; where the AMX kernel does
        # not fit (head dim 32: Swin, the ViT fixture) attn @ V alone stays on AMX tiles (`attn_v_amx`), unmeasured
        # against the vector kernel
        fits = target_has(target, "avx512vbmi") and attention_amx.fits(m, n, d) and not terms
        return attention_amx.attention_spec(bt, m, n, d, **quantizer) if fits else None
    variant = attention_vector.variant_for(target)
    if variant is None or not attention_vector.fits(m, n, d, variant):
        return None
    return attention_vector.attention_spec(bt, m, n, d, **quantizer, variant=variant)


def _chain(var, stop, bound: dict, uses: dict) -> list[relax.Call] | None:
    """The calls other than reshapes from ``var`` back to the call ``stop`` (var's value first), where every value on
    the way, var's included, is read once; None where the chain breaks (another reader, no binding)."""
    calls = []
    while isinstance(var, relax.Var) and uses.get(var) == 1:
        value = bound.get(var)
        if value is None:
            return None
        if value.same_as(stop):
            return calls
        if not is_call(value, "relax.reshape"):
            calls.append(value)
        var = value.args[0] if isinstance(value, relax.Call) else None
    return None


def logit_terms(var, stop, bound: dict, uses: dict, shape: tuple[int, int, int]):
    """([(div, mod)], [table]) of the constants added to q @ kᵀ's logits (the call ``stop``) on their way to the
    softmax ``var`` (reshapes and adds of a constant, each value read once), in the order they are added, or None.

    Each term, broadcast to the logits [Bt, M, N], must be a table row per head b of index (b // div) % mod (the
    smallest such table: Swin's bias repeats every H heads (1, H), its mask every window (H, windows));
    tables [mod, M, N] with the keys padded by zeros to the kernel's vectors (`attention_vector.logit_term_shape`)."""
    from ..kernels.attention_vector import logit_term_shape

    adds = _chain(var, stop, bound, uses)
    if adds is None or len(adds) > 2 or not all(  # the kernel adds at most two (`attention_vector`)
            is_call(a, "relax.add") and const_array(a.args[1]) is not None for a in adds):
        return None
    bt, m, n = shape
    keys = [], []
    for add in reversed(adds):
        lhs, term = static_shape(add.args[0]), const_array(add.args[1])
        if lhs is None or term.dtype != np.float32 or static_shape(add) != lhs or math.prod(lhs) != bt * m * n:
            return None
        try:
            full = np.broadcast_to(term, lhs).reshape(bt, m, n)
        except ValueError:
            return None
        found = _periodic(full)
        if found is None:
            return None
        div, mod = found
        table = np.zeros(logit_term_shape(mod, m, n), np.float32)
        table[:, :, :n] = full[[j * div for j in range(mod)]]
        keys[0].append([div, mod])
        keys[1].append(table)
    return keys


def _periodic(full: np.ndarray) -> tuple[int, int] | None:
    """The (div, mod) of fewest tables with full[b] = full[((b // div) % mod) · div] for every b, if any."""
    bt = full.shape[0]
    for mod in (d for d in range(1, bt + 1) if bt % d == 0):
        for div in (d for d in range(1, bt // mod + 1) if (bt // mod) % d == 0):
            index = (np.arange(bt) // div) % mod * div
            if np.array_equal(full[:, 0], full[index, 0]) and np.array_equal(full, full[index]):
                return div, mod
    return None


def _unreshaped(var, bound: dict, uses: dict):
    """The value under var's reshapes (each read once), and that value's variable."""
    while is_call(bound.get(var), "relax.reshape") and uses.get(var) == 1:
        var = bound[var].args[0]
    return var, bound.get(var)


def qkv_third(codes, bound: dict, uses: dict):
    """(p, i, (scale, zero point, top)) when the variable ``codes`` is bound to

        clip?(quantize(squeeze(strided_slice(p, [0], [i], [i + 1]), [0]), scale, zero point))    i = 0, 1, 2

    with scalar quantizer constants, uint8 codes and each value between p and codes read once, else None.  The
    one check of a qkv third that both qkv passes use: this one walks back to it from the attention's inputs,
    `qkv_codes_epilogue` forward from the AMX qkv kernel; codes' own readers are the caller's concern."""
    value = bound.get(codes)
    if value is None:
        return None
    top = 2 ** code_bits(value) - 1
    if is_call(value, "relax.clip"):
        if uses.get(value.args[0]) != 1:
            return None
        value = bound.get(value.args[0])
    if not is_call(value, "relax.quantize") or str(value.attrs.out_dtype) != "uint8":
        return None
    scale, zp = scalar_const(value.args[1]), scalar_const(value.args[2])
    sq = bound.get(value.args[0])
    if scale is None or zp is None or not is_call(sq, "relax.squeeze") or uses.get(value.args[0]) != 1 \
            or [int(a) for a in (sq.attrs.axis or [])] != [0]:
        return None
    sl = bound.get(sq.args[0])
    if not is_call(sl, "relax.strided_slice") or uses.get(sq.args[0]) != 1:
        return None
    axes, begin, end = (int_list(a) for a in sl.args[1:4])
    strides = int_list(sl.args[4]) if len(sl.args) > 4 else [1]
    if axes != [0] or strides != [1] or begin is None or len(begin) != 1 or end != [begin[0] + 1] \
            or begin[0] not in (0, 1, 2):
        return None
    return sl.args[0], begin[0], (float(scale), int(zp), top)


def _qkv_third(var, bound: dict, uses: dict):
    """`qkv_third` of the codes under var's reshapes, when nothing else reads them (else the quantizer stays and
    the kernel would redo it)."""
    root, _ = _unreshaped(var, bound, uses)
    return qkv_third(root, bound, uses) if uses.get(root) == 1 else None


def qkv_source(q, k, v, bound: dict, uses: dict, spec: dict, zps: tuple[list[int], list[int]]):
    """(x as [B·T, 3·H·D], the spec's ``qkv``) when q, k and v are the thirds 0, 1, 2 of one qkv output under
    their quantizers (the zero points the kernels were given, ``zps``), else None."""
    thirds = [_qkv_third(x, bound, uses) for x in (q, k, v)]
    if any(t is None for t in thirds) or [t[1] for t in thirds] != [0, 1, 2] \
            or not all(t[0].same_as(thirds[0][0]) for t in thirds):
        return None
    p = bound.get(thirds[0][0])
    if not is_call(p, "relax.permute_dims") or p.attrs.axes is None or [int(a) for a in p.attrs.axes] != [2, 0, 3, 1, 4]:
        return None
    shape = static_shape(p.args[0])
    x, _ = _unreshaped(p.args[0], bound, uses)
    x_shape = static_shape(x)
    if shape is None or len(shape) != 5 or x_shape is None or not x_shape:
        return None
    b, t, three, h, d = shape
    if three != 3 or [b * h, t, t, d] != [spec["Bt"], spec["M"], spec["N"], spec["D"]] \
            or x_shape[-1] != 3 * h * d or math.prod(x_shape) != b * t * 3 * h * d \
            or list(zps[0]) != [thirds[0][2][1], thirds[1][2][1]] or list(zps[1]) != [thirds[2][2][1]]:
        return None
    rows = x if list(x_shape) == [b * t, 3 * h * d] else relax.op.reshape(x, [b * t, 3 * h * d])
    return rows, {"heads": h, "codes": [list(t[2]) for t in thirds]}


def consts_arg(consts: np.ndarray) -> relax.Constant:
    """A fused attention's ``consts`` (`kernels.attention_consts`) as a call argument: float64, as the kernel reads
    it (`relax.const` would make a float64 array float32: log2(s) rounded, the softmax codes moved)."""
    return relax.const(consts, "float64")


class AttentionKernels:
    """The fused attention kernels a pass adds to ``bb``, one per spec (`kernels.attention_vector.attention_func`:
    AMX or vector by the spec's variant), and the kernels whose calls it replaced (`finish` drops those left
    unused)."""

    def __init__(self, bb: relax.BlockBuilder):
        self.bb, self.cache, self.replaced = bb, {}, set()

    def get(self, spec: dict) -> tvm.ir.GlobalVar:
        from ..kernels.attention_vector import attention_func, kernel_name

        key = json.dumps(spec, sort_keys=True)
        if key not in self.cache:
            name = kernel_name(spec)
            kernel = attention_func(spec).with_attr("global_symbol", name).with_attr(
                "tirx.is_scheduled", True).with_attr("op_pattern", 8)  # opaque: hand-written TIR
            self.cache[key] = self.bb.add_func(kernel, name)
        return self.cache[key]

    def finish(self) -> tvm.IRModule:
        return without_replaced(self.bb.get(), self.replaced)

    @staticmethod
    def rewrite(mod: tvm.IRModule, rewrite) -> tvm.IRModule:
        """``mod`` with each Relax function f replaced by ``rewrite(f, kernels)`` (which adds its fused kernels
        through ``kernels``, an `AttentionKernels` of a builder on ``mod``), then `finish`ed: both attention passes'
        walk over the module."""
        kernels = AttentionKernels(relax.BlockBuilder(mod))
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                kernels.bb.update_func(gv, rewrite(func, kernels))
        return kernels.finish()


@tvm.transform.module_pass(opt_level=0, name="FuseAttention")
class FuseAttention:
    """qbmm → log weights (softmax fused) → attn @ V → one attention kernel per shape (see the module).

    `.rewritten` counts the fused attentions.
    """

    def __init__(self, target):
        self.target, self.rewritten = target, 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        self.rewritten = 0

        def rewrite(func: relax.Function, kernels: AttentionKernels) -> relax.Function:
            uses = var_uses(func)
            bound = bound_values(func)

            def fuse(av_call, m):
                qk_call, lw_call = m[_QK], m[_WEIGHTS]
                specs = (kernel_spec(mod, qk_call, "qbmm"), kernel_spec(mod, lw_call, "log_weights"),
                         kernel_spec(mod, av_call, "attn_v"))
                if None in specs or _chain(av_call.args[1].fields[0], lw_call, bound, uses) != []:
                    return av_call
                qk = specs[0]
                terms = logit_terms(lw_call.args[1].fields[0], qk_call, bound, uses, (qk["Bt"], qk["M"], qk["N"]))
                spec = None if terms is None else attention_spec_of(*specs, self.target, len(terms[0]))
                if spec is None:
                    return av_call
                if terms[0]:
                    spec = {**spec, "logit_terms": terms[0]}
                q, k, qk_zp, qk_scale = qk_call.args[1].fields
                _, v, v_zp, v_scale = av_call.args[1].fields
                zps = [const_array(qk_zp), const_array(v_zp)]
                source = None if spec["variant"] == "amx" or any(z is None for z in zps) else qkv_source(
                    q, k, v, bound, uses, spec, [[int(z) for z in a.reshape(-1)] for a in zps])
                quantizers = {}
                if source is not None:
                    spec = {**spec, "qkv": {"heads": source[1]["heads"], "tops": [t for *_, t in source[1]["codes"]]}}
                    quantizers = {slot: (s, z) for slot, (s, z, _) in zip(SLOTS, source[1]["codes"])}
                kernel = kernels.get(spec)
                kernels.replaced.update(c.args[0] for c in (qk_call, lw_call, av_call))
                self.rewritten += 1
                args = [source[0], qk_zp, qk_scale, v_zp, v_scale] if source else [q, k, qk_zp, qk_scale, v, v_zp, v_scale]
                args += [relax.const(table) for table in terms[1]]
                log2s = float(const_array(m[_LOG2S]).reshape(-1)[0])
                args.append(consts_arg(attention_consts(log2s, quantizers)))
                return relax.call_tir(kernel, relax.Tuple(args),
                                      relax.TensorType((spec["Bt"], spec["M"], spec["D"]), "float32"))

            return rewrite_call(_ATTN_V, calls_only(fuse), func)

        return AttentionKernels.rewrite(mod, rewrite)
