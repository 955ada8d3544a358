"""Fuse the q/k/v split and their quantizers into the qkv projection (AMX kernels): it stores the codes the
attention kernels read, in their layout.

Matches, after `quantized_linear` has made the qkv projection an AMX kernel call:

    y  = call_tir(repq_qdense_amx_…, args)                  float32 [B·T, 3·H·D]
    p  = permute_dims(reshape(reshape(y, [B, T, 3·H·D]), [B, T, 3, H, D]), [2, 0, 3, 1, 4])
    qᵢ = quantize(squeeze(strided_slice(p, [0], [i], [i + 1]), [0]), sᵢ, zᵢ)   i = 0, 1, 2 (q, k, v) [→ clip]

and replaces it by one call of the kernel with ``qkv_codes`` (`kernels.qdense_amx`: three outputs [B, H, T, D]
uint8, each of q, k, v under its own quantizer, the same operations as the unfused quantize), whose outputs are
bound to the variables the quantizes were bound to.  The quantizers are a constant argument of the call (the
kernel's ``quant``, `kernels.epilogue.quantizer_args` of q's, k's and v's), so the blocks' qkv projections of one
shape call one kernel.  (Views into one [3, B, H, T, D] output would save nothing and the kernels downstream
require offset-free buffers.)  Why: the unfused path wrote the float32 qkv output (1.2 MB per image), moved it with a transpose kernel and read it again three
times to quantize; at batch 8 the transpose alone took 10 of DeiT-Small's 122 ms on Sapphire Rapids.
Only AMX kernels have this tail (the tensorized TE kernels of the other variants store one [M, N] output).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..kernels.epilogue import quantizer_args
from ..relax_util import is_op, rewrite_functions, static_shape
from .fused_attention import qkv_third
from .qdense_tail import FusedKernels, plain_qdense_spec


def _chains(func: relax.Function, mod: tvm.IRModule) -> list[dict]:
    """Every qkv projection whose whole float output goes to the three quantizers (the plans `_Fuse` carries out)."""
    bound, users = {}, {}
    for block in func.body.blocks:
        for b in block.bindings:
            bound[b.var] = b.value
            relax.analysis.post_order_visit(
                b.value, lambda e, v=b.var: users.setdefault(e, []).append(v) if isinstance(e, relax.Var) else None)
    relax.analysis.post_order_visit(func.body.body,
                                    lambda e: users.setdefault(e, []).append(None) if isinstance(e, relax.Var) else None)
    uses = {v: len(u) for v, u in users.items()}  # `relax_util.var_uses`, from the same walk

    def only_user(var, op):
        u = users.get(var, [])
        return u[0] if len(u) == 1 and u[0] is not None and is_op(bound[u[0]], op) else None

    plans = []
    for y, call in bound.items():
        if not is_op(call, "relax.call_tir"):
            continue
        spec = plain_qdense_spec(mod, call)
        if spec is None or spec["variant"] != "amx" or not isinstance(call.args[1], relax.Tuple):
            continue
        v, skip = y, [y]
        while (nxt := only_user(v, "relax.reshape")) is not None:
            v = nxt
            skip.append(v)
        shape = static_shape(v)
        perm = only_user(v, "relax.permute_dims")
        if perm is None or shape is None or len(shape) != 5 or shape[2] != 3 \
                or [int(a) for a in bound[perm].attrs.axes] != [2, 0, 3, 1, 4]:
            continue
        B, T, _, H, D = shape
        if B * T != spec["M"] or 3 * H * D != spec["N"] or D % 32:
            continue
        slices = users.get(perm, [])
        roots, codes, chain = [None] * 3, [None] * 3, [perm]
        for s in slices:
            sq = only_user(s, "relax.squeeze") if s is not None else None
            qz = only_user(sq, "relax.quantize") if sq is not None else None
            clip = only_user(qz, "relax.clip") if qz is not None else None
            root = clip if clip is not None else qz
            third = qkv_third(root, bound, uses) if root is not None else None  # axes, strides, quantizer
            if third is None or not third[0].same_as(perm) or roots[third[1]] is not None:
                break
            roots[third[1]], codes[third[1]] = root, third[2]
            chain += [s, sq] + ([qz] if root is not qz else [])
        else:
            if len(slices) == 3 and all(r is not None for r in roots):
                plans.append({"y": y, "call": call, "spec": spec, "skip": skip + chain, "roots": roots,
                              "qkv": {"tokens": T, "heads": H, "tops": [top for *_, top in codes]},
                              "quant": np.stack([quantizer_args(s, z) for s, z, _ in codes]), "shape": (B, H, T, D)})
    return plans


@mutator
class _Fuse(PyExprMutator):
    def __init__(self, mod, plans: dict, target):
        super().__init__(mod)
        self.plans, self.kernels = plans, FusedKernels(self.builder_, target, "qkv")  # plans: by y, every function
        self.skip = {v for p in plans.values() for v in p["skip"] + p["roots"]}

    def visit_var_binding_(self, binding):
        plan = self.plans.get(binding.var)
        if plan is None:
            if binding.var not in self.skip:
                super().visit_var_binding_(binding)
            return
        B, H, T, D = plan["shape"]
        gv = self.kernels.get(plan["call"], plan["spec"], qkv_codes=plan["qkv"])
        args = relax.Tuple([*plan["call"].args[1].fields, relax.const(plan["quant"])])
        out = self.builder_.emit(relax.call_tir(gv, args, [relax.TensorType((B, H, T, D), "uint8")] * 3),
                                 name_hint="qkv_codes")
        for i, root in enumerate(plan["roots"]):
            self.builder_.emit_normalized(relax.VarBinding(root, self.builder_.normalize(relax.TupleGetItem(out, i))))


@tvm.transform.module_pass(opt_level=0, name="FuseQKVCodesEpilogue")
class FuseQKVCodesEpilogue:
    """qkv (AMX qdense) → split → quantize ×3 → one kernel storing the three code tensors (see the module)."""

    def __init__(self, target):
        self.target, self.rewritten = target, 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        plans = {}
        for _, func in mod.functions_items():
            if isinstance(func, relax.Function):
                plans.update({p["y"]: p for p in _chains(func, mod)})
        if not plans:
            return mod
        self.rewritten = len(plans)
        fuse = _Fuse(mod, plans, self.target)
        return fuse.kernels.finish(rewrite_functions(fuse, mod))

