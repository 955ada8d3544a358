"""Move the weight unpacking out of the inference: computed once when the artifact is loaded.

Matches, in ``main`` after the integer passes and the log-quant lowering (`pipeline.lower_to_kernels`):

    w = call_tir(repq_unpack_…, (const, const))     a PrimFunc with the `kernels.narrow_weights.LOAD_TIME` attribute

and rewrites the module to

    main(x, w_0, …, w_n)         each such w becomes a parameter (in binding order)
    unpack_weights() → (w_0, …)  the calls, on the constants, in a function of their own

so the library stores the narrow weights (`kernels.narrow_weights`: 4-bit ones two per byte, 8-bit ones of int16
kernels a byte each) and the runtime calls ``unpack_weights`` once at load and hands its results to every
``main`` call (`deploy.runtime.Runner`).  Why not per inference: unpacking DeiT-Small's 4-bit weights writes
22 MB, milliseconds per run.  Runs
before legalization, whose constant folding skips ``unpack_weights`` (`FoldConstantsAtRunTime`): TVM's
would evaluate the calls at compile time and store the unpacked bytes again.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..kernels.narrow_weights import LOAD_TIME
from ..relax_util import is_op

FUNCTION = "unpack_weights"  # the load-time function's name in the library (and in the artifact's manifest)


def _load_time_calls(mod: tvm.IRModule, func: relax.Function) -> list[relax.VarBinding]:
    """The bindings of ``func`` that call a load-time PrimFunc on constants only."""
    found = []
    for block in func.body.blocks:
        for b in block.bindings:
            call = b.value
            if not is_op(call, "relax.call_tir") or not isinstance(call.args[0], tvm.ir.GlobalVar):
                continue
            attrs = getattr(mod[call.args[0]], "attrs", None)
            if attrs is not None and LOAD_TIME in attrs \
                    and all(isinstance(a, tvm.ir.GenericConst) for a in call.args[1].fields):
                found.append(b)
    return found


@mutator
class _AsParameters(PyExprMutator):
    """Drops the given bindings and reads their variables' values from new function parameters instead."""

    def __init__(self, mod, bindings: list[relax.VarBinding]):
        super().__init__(mod)
        self.params = {b.var: relax.Var(f"w{i}", b.var.ty) for i, b in enumerate(bindings)}

    def visit_var_binding_(self, binding):
        param = self.params.get(binding.var)
        if param is None:
            super().visit_var_binding_(binding)
        else:
            self.set_var_remap(binding.var, param)


@tvm.transform.module_pass(opt_level=0, name="HoistLoadTimeWeights")
class HoistLoadTimeWeights:
    """Load-time calls of ``main`` → parameters of ``main`` + the function ``unpack_weights`` that computes them.

    `.hoisted` counts the calls moved (0: the module is returned unchanged, with no ``unpack_weights``).
    """

    def __init__(self, func: str = "main"):
        self.func, self.hoisted = func, 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        main = mod[self.func]
        bindings = _load_time_calls(mod, main)
        self.hoisted = len(bindings)
        if not bindings:
            return mod
        rewrite = _AsParameters(mod, bindings)
        body = rewrite.visit_expr(main.body)
        extra = list(rewrite.params.values())
        new_main = relax.Function(list(main.params) + extra, body, main.ret_ty, main.is_pure, main.attrs)
        # a new module: the builder's is the caller's own object, which a pass must not change
        out = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != self.func}, attrs=mod.attrs)
        out[self.func] = new_main

        bb = relax.BlockBuilder(out)
        with bb.function(FUNCTION, []):
            with bb.dataflow():
                values = [bb.emit(b.value) for b in bindings]
                result = bb.emit_output(relax.Tuple(values))
            bb.emit_func_output(result)
        return bb.get()


@tvm.transform.module_pass(opt_level=0, name="FoldConstantsAtRunTime")
class FoldConstantsAtRunTime:
    """TVM's `FoldConstant` on every function except ``unpack_weights``, which is kept as it is."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        keep = mod[FUNCTION] if any(gv.name_hint == FUNCTION for gv in mod.get_global_vars()) else None
        out = relax.transform.FoldConstant()(mod)
        if keep is not None:
            out[FUNCTION] = keep
        return out
