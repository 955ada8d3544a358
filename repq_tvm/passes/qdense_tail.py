"""What the kernel-fusion passes (`gelu_codes_epilogue`, `residual_epilogue`, `attention_out_codes`,
`fused_attention`, `qkv_column_codes`, `row_moves`) share: the spec of the kernel a call runs, scheduling a qdense
kernel's fused twin, matching the quantizer (and the operand casts) whose codes a fused epilogue stores, and dropping
the kernels no call uses afterwards."""

from __future__ import annotations

import json

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from ..kernels.epilogue import ZERO_POINT
from ..relax_util import code_bits, scalar_const, scheduled_kernel
from ..tuning.spaces import spec_of


class CodesTail:
    """Patterns of a layer-wise quantizer over ``source`` and of what the next linear's kernel reads of its codes:

        q = quantize(source, s, z)                 scalar s and z, uint8 codes
       [q = clip(q, 0, 2^b − 1)]                   b-bit codes (`relax_util.code_bits`)
       [a = subtract(astype(q, int16), c)   |   astype(subtract(astype(q, int16), c), int8)   |   astype(q, int8)]

    the casts `quantized_linear` puts before an int16 (AVX2 `vpmaddwd`: ``q − z``) or sdot (``q − 128``) kernel.
    A fused epilogue stores ``a`` itself (``operand``, `epilogue.as_operand`), or q.  AVX2's ``q − z`` is the
    operand ("int16", `epilogue.ZERO_POINT`): the fused kernel subtracts the zero point of the quantizer it reads at
    run time, so the blocks' kernels stay one.
    """

    def __init__(self, source):
        self.codes = is_op("relax.quantize")(source, is_const(), is_const())
        self.clipped = is_op("relax.clip")(self.codes, wildcard(), wildcard())
        q = self.clipped | self.codes
        self.wide = is_op("relax.astype")(q)
        self.centred = is_op("relax.subtract")(self.wide, is_const())  # int16 operand, or sdot's before its int8 cast
        self.shifted = is_op("relax.astype")(self.centred)  # sdot: int8 of the centred int16
        self.narrow = is_op("relax.astype")(q)  # sdot, codes of at most 7 bits: int8 of the codes

    @property
    def patterns(self) -> tuple:
        """Every form, the largest match first (rewrite with each in turn)."""
        return self.shifted, self.centred, self.narrow, self.clipped, self.codes

    def _operand(self, root, m) -> tuple[str, int] | None:
        dtype = str(root.ty.dtype)
        if m.get(self.centred) is None:  # narrow: int8 of the codes
            return ("int8", 0) if dtype == "int8" else None
        c = scalar_const(m[self.centred].args[1])
        if c is None or c != int(c) or str(m[self.wide].ty.dtype) != "int16":
            return None
        want = "int8" if m.get(self.shifted) is not None else "int16"  # sdot's int8 of the centred codes, or those
        return (want, int(c)) if dtype == want else None

    def tail(self, root, m, uses: dict) -> dict | None:
        """{"codes": (s, z, 2^b − 1), "operand": (dtype, minus: an int or `ZERO_POINT`) or None} of a match rooted at ``root``, or None where
        an intermediate has another reader (the quantize's input included) or the casts are not `quantized_linear`'s."""
        quant, clip = m[self.codes], m.get(self.clipped)
        operand = None
        if not root.same_as(quant) and not root.same_as(clip):  # the next linear's kernel operand
            operand = self._operand(root, m)
            inner = [x.args[0] for x in (root, m.get(self.centred), m.get(self.wide)) if x is not None]  # the codes
            # and what the casts made of them: read by these casts only
            if operand is None or not all(uses.get(x) == 1 for x in inner):
                return None
        s, z = scalar_const(quant.args[1]), scalar_const(quant.args[2])
        if s is None or z is None or str(quant.attrs.out_dtype) != "uint8" or uses.get(quant.args[0]) != 1 \
                or (clip is not None and uses.get(clip.args[0]) != 1):
            return None
        top = 2 ** code_bits(clip if clip is not None else quant) - 1
        if operand == ("int16", int(z)):  # AVX2's centred codes: minus the quantizer's own zero point
            operand = ("int16", ZERO_POINT)
        return {"codes": (float(s), int(z), top), "operand": operand}


def kernel_spec(mod: tvm.IRModule, call: relax.Call, kind: str) -> dict | None:
    """The spec of the ``kind`` kernel (`tuning.spaces.spec_of`: "qdense", "attention", …) a ``call_tir`` of ``mod``
    runs; None for another kind, a kernel without a spec, or one not in ``mod`` (a pass's own, just added)."""
    gv = call.args[0]
    func = mod[gv] if isinstance(gv, tvm.ir.GlobalVar) and gv.name_hint in mod else None
    spec = spec_of(func) if isinstance(func, tvm.tirx.PrimFunc) else None
    return spec if spec is not None and spec.get("kind") == kind else None


def plain_qdense_spec(mod: tvm.IRModule, call: relax.Call, column_codes: bool = False) -> dict | None:
    """The spec of the qdense kernel ``call`` (a ``call_tir``) runs, if it has the float epilogue and no tail
    fused yet (`kernels.qdense`: ``gelu_codes``, ``residual``, ``qkv_codes``, ``column_codes``); else None.  With
    ``column_codes``: the spec of one whose only tail is ``column_codes``, else None."""
    spec = kernel_spec(mod, call, "qdense")
    plain = spec is not None and spec.get("epilogue") and not spec.get("gelu_codes") \
        and not spec.get("residual") and not spec.get("qkv_codes") and bool(spec.get("column_codes")) == column_codes
    return spec if plain else None


class FusedKernels:
    """The fused kernels a pass adds, one per (spec, tail): scheduled for ``target`` as `quantized_linear`
    scheduled the kernel they replace (`kernels.qdense.schedule_qdense`: same variant, compensation, tiles)."""

    def __init__(self, bb: relax.BlockBuilder, target, suffix: str):
        self.bb, self.target, self.suffix, self.cache, self.replaced = bb, target, suffix, {}, set()

    def get(self, call: relax.Call, spec: dict, **tail) -> tvm.ir.GlobalVar:
        from ..kernels import qdense

        self.replaced.add(call.args[0])
        key = json.dumps([spec, tail], sort_keys=True)
        if key not in self.cache:
            sch, _, _, _ = qdense.schedule_qdense(
                spec["M"], spec["N"], spec["K"], self.target, bits_a=spec["bits_a"], bits_w=spec["bits_w"],
                variant=spec["variant"], epilogue=True, compensate=spec["compensate"], **tail)
            name = f"{call.args[0].name_hint}_{self.suffix}{len(self.cache)}"
            self.cache[key] = self.bb.add_func(scheduled_kernel(sch, name), name)
        return self.cache[key]

    def finish(self, mod: tvm.IRModule | None = None) -> tvm.IRModule:
        """The builder's module (or ``mod``) without dead bindings and without the replaced kernels no call
        uses now."""
        return without_replaced(mod if mod is not None else self.bb.get(), self.replaced)


def without_replaced(mod: tvm.IRModule, replaced: set) -> tvm.IRModule:
    """``mod`` without dead bindings and without the kernels of ``replaced`` (GlobalVars) no call uses now."""
    out = relax.transform.DeadCodeElimination()(mod)
    for gv in replaced - _called(out):
        del out[gv]
    return out


def _called(mod: tvm.IRModule) -> set:
    seen = set()
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: seen.add(e) if isinstance(e, tvm.ir.GlobalVar) else None)
    return seen
