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


def code_bits(codes) -> int:
    """Bit width b of uint8 codes from the canonical `clip(q, 0, 2^b − 1)` that produced them (8 without one)."""
    if not is_op(codes, "relax.clip"):
        return 8
    bound = codes.args[2]
    try:
        hi = int(bound.value if hasattr(bound, "value") else bound)
    except (TypeError, ValueError):
        return 8
    return max(1, min(255, max(0, hi)).bit_length())


def int_list(expr) -> list[int] | None:
    """The ints of a constant tuple or shape argument (strided_slice's axes, begin, end), else None."""
    if isinstance(expr, relax.Tuple):
        return [int(f.value) for f in expr.fields]
    if isinstance(expr, relax.ShapeExpr):
        return [int(v) for v in expr.values]
    return None


def static_shape(expr) -> list[int] | None:
    """The shape of a tensor expression as ints, or None when it is not fully static."""
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
        return None
    return [int(d) for d in shape]


def scalar_const(expr) -> float | int | None:
    """The value of a one-element tensor constant, else None."""
    value = const_array(expr)
    return None if value is None or value.size != 1 else value.reshape(()).item()


def var_uses(func: relax.Function) -> dict:
    """How often each variable is read in `func` (its bindings and its result)."""
    uses: dict = {}

    def count(e):
        if isinstance(e, relax.Var):
            uses[e] = uses.get(e, 0) + 1

    for block in func.body.blocks:
        for b in block.bindings:
            relax.analysis.post_order_visit(b.value, count)
    relax.analysis.post_order_visit(func.body.body, count)
    return uses


def bound_values(func: relax.Function) -> dict:
    """The value bound to each variable of `func`'s binding blocks (to walk a pattern's operands back)."""
    return {b.var: b.value for block in func.body.blocks for b in block.bindings}


def activation_dequant(dq) -> tuple[relax.Expr, float, int] | None:
    """(codes, scale, zero point) if the call `dq` is a layer-wise float32 dequantize of non-constant uint8 codes.

    `dq` is the dequantize a pattern matched (`tvm.relax.dpl`: the call itself, its operands as bound)."""
    if not is_op(dq, "relax.dequantize") or const_array(dq.args[0]) is not None:
        return None
    s, z, codes = scalar_const(dq.args[1]), scalar_const(dq.args[2]), dq.args[0]
    if s is None or z is None or codes.ty.dtype != "uint8" or dq.ty.dtype != "float32":
        return None
    return codes, float(s), int(z)


def batched_matmul_shapes(a, b) -> tuple[list[int], list[int]] | None:
    """Static shapes of a [.., M, K] and b [.., K, N] with equal leading dims (rank ≥ 3), else None."""
    sa, sb = static_shape(a), static_shape(b)
    if sa is None or sb is None or len(sa) < 3 or len(sa) != len(sb) or sa[:-2] != sb[:-2] or sa[-1] != sb[-2]:
        return None
    return sa, sb


def calls_only(rewriter):
    """A `tvm.relax.dpl.rewrite_call` rewriter that leaves variable-to-variable bindings as they are.

    dpl matches `y = x` through the binding of `x`, so an alias of a call the rewriter refused reaches it
    again, as the alias; only the call itself is rewritten (an alias of a rewritten call follows it).
    """

    def rewrite(expr, matches):
        return rewriter(expr, matches) if isinstance(expr, relax.Call) else expr

    return rewrite


def emitted(bb: relax.BlockBuilder, emit) -> relax.Expr:
    """The expression `emit()` builds, with the bindings it emits through `bb` folded back into it.

    The emission functions of the passes write their bindings with `bb.emit`; a `tvm.relax.dpl` rewriter
    returns one expression instead. `emit()` runs in a scratch dataflow block of `bb` (which also collects
    the kernels it adds with `bb.add_func`), and each variable bound there is replaced by its value: the
    rewrite's caller normalizes the nested expression back into bindings of the block being rewritten
    (dataflow block or not): the same bindings, operands bound before their users in argument order.
    (A variable read twice would be computed twice; the emission functions read each one once.)
    """
    bb._begin_dataflow_block()  # pylint: disable=protected-access
    try:
        out = emit()
    finally:
        block = bb._end_block()  # pylint: disable=protected-access
    values = {b.var: b.value for b in block.bindings}

    def inline(expr):
        if isinstance(expr, relax.Var):
            return inline(values[expr]) if expr in values else expr
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([inline(f) for f in expr.fields])
        if isinstance(expr, relax.Call):
            return relax.Call(expr.op, [inline(a) for a in expr.args], expr.attrs, expr.ty_args)
        return expr

    return inline(out)


def lower_with_bias(mod: tvm.IRModule, biased, plain, parts, bias_of, emit) -> tuple[tvm.IRModule, int]:
    """Two `tvm.relax.dpl` rewrites per Relax function, for kernels that can absorb a constant bias add.

    First `biased` (an `add` of a `plain` match and a constant): where `parts(match)` accepts the match, the
    matched call has no other use, and `bias_of(add, parts)` returns the bias in the kernel's form (None: the
    add stays a float op), `emit(bb, parts, bias)` replaces the add; then `plain`, every match left, with no
    bias.  Returns the module (dead code dropped) and the number of kernels emitted.
    """
    from tvm.relax.dpl import rewrite_call

    bb, count = relax.BlockBuilder(mod), [0]

    def lower(found, bias):
        count[0] += 1
        return emitted(bb, lambda: emit(bb, found, bias))

    for gv, func in list(mod.functions_items()):
        if not isinstance(func, relax.Function):
            continue
        uses = var_uses(func)

        def with_bias(add, m):
            found = parts(m)
            bias = None if found is None or uses.get(add.args[0]) != 1 else bias_of(add, found)
            return add if bias is None else lower(found, bias)  # refused: `without_bias` still lowers the call

        def without_bias(call, m):
            found = parts(m)
            return call if found is None else lower(found, None)

        func = rewrite_call(biased, calls_only(with_bias), func)
        bb.update_func(gv, rewrite_call(plain, calls_only(without_bias), func))
    return relax.transform.DeadCodeElimination()(bb.get()), count[0]
