"""Small Relax helpers shared by the frontend normalization and the compiler passes."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax


def is_op(expr, name: str) -> bool:
    """True if `expr` is a call of the Relax operator `name` (e.g. "relax.matmul")."""
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


def const_array(expr) -> np.ndarray | None:
    """The value of a tensor constant, else None."""
    return expr.value.numpy() if isinstance(expr, tvm.ir.GenericConst) else None


def follow(mutator, expr):
    """Follow a variable to the expression bound to it in the function `mutator` is rewriting."""
    while isinstance(expr, relax.Var):
        bound = mutator.lookup_binding(expr)
        if bound is None:
            break
        expr = bound
    return expr


def rewrite_functions(mutator, mod: tvm.IRModule) -> tvm.IRModule:
    """Run a PyExprMutator over every Relax function of `mod` and return the new module."""
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def scheduled_kernel(sch, name: str):
    """The PrimFunc of a hand-made schedule, named `name` and marked scheduled so no default rule redoes it."""
    return sch.mod["main"].with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
