"""What the epilogue-fusion passes (`gelu_codes_epilogue`, `residual_epilogue`) share: finding the qdense
kernel a call runs, scheduling its fused twin, and dropping the kernels no call uses afterwards."""

from __future__ import annotations

import json

import tvm
from tvm import relax

from ..relax_util import scheduled_kernel


def plain_qdense_spec(mod: tvm.IRModule, call: relax.Call) -> dict | None:
    """The spec of the qdense kernel ``call`` (a ``call_tir``) runs, if it has the float epilogue and no tail
    fused yet (`kernels.qdense`: ``gelu_codes``, ``residual``, ``qkv_codes``); else None."""
    func = mod[call.args[0]] if isinstance(call.args[0], tvm.ir.GlobalVar) else None
    attrs = getattr(func, "attrs", None)
    if attrs is None or "repq.kernel" not in attrs:
        return None
    spec = json.loads(str(attrs["repq.kernel"]))
    plain = spec.get("kind") == "qdense" and spec.get("epilogue") and not spec.get("gelu_codes") \
        and not spec.get("residual") and not spec.get("qkv_codes")
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
        out = relax.transform.DeadCodeElimination()(mod if mod is not None else self.bb.get())
        for gv in self.replaced - _called(out):
            del out[gv]
        return out


def _called(mod: tvm.IRModule) -> set:
    seen = set()
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: seen.add(e) if isinstance(e, tvm.ir.GlobalVar) else None)
    return seen
