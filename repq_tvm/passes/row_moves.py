"""Fold the row moves around a linear into its kernel's row reads: Swin's window partition and cyclic shift before
qkv, and their reverses between proj and the residual add.

A row move is a tree of reshape / permute_dims / strided_slice / concat that moves whole rows of the last
(channel) axis: its effect is a table ``rows`` (output row i holds input row ``rows[i]``), found by running the
ops on an index array at compile time (`row_table`).  Two rewrites, after the other integer passes:

    input side:   a = subtract(astype(quantize(moves(t)), int16), z) → qdense(a, …)
                  → qdense(subtract(astype(quantize(t), int16), z), …, rows)  (the casts as `quantized_linear` made them)
    output side:  add(x, moves(qdense(…)))                            → qdense(…, x, rows) adding x in its epilogue

The kernel reads A's row ``rows[m]`` for output row m (`kernels.qdense`, ``a_rows``): a tile's rows are copied
once, next to its products.  The quantizer is layer-wise (scalar scale and zero point), so it commutes with moving
rows, and the codes are the same bit for bit.  Why: Swin-T ran these moves as 24 kernels of their own
(partition, shift and quantize before qkv; reverse, unshift and the residual add after proj), reading and writing
float tensors; the input side's LayerNorm now fuses with its quantizer as it does before fc1.  Moves that mix
rows (patch merging's 2x2 gathers) or that the kernel cannot take (the AMX variant) are left alone.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard

from ..kernels.qdense import column_top
from ..relax_util import bound_values, calls_only, emitted, int_list, scalar_const, static_shape, var_uses
from ..relax_util import is_op as is_call
from .qdense_tail import FusedKernels, plain_qdense_spec

_COPIES = ("relax.permute_dims", "relax.strided_slice", "relax.concat")  # the moves that copy data
_MOVES = ("relax.reshape", *_COPIES)
# per-element ops with scalar constants: they commute with moving rows (the linears' activation quantizer and casts)
_ELEMENTWISE = ("relax.quantize", "relax.clip", "relax.astype", "relax.subtract")

_ADD = is_op("relax.add")(wildcard(), wildcard())
_KERNEL = is_op("relax.call_tir")(wildcard(), wildcard())


class _NotAMove(Exception):
    pass


def _inputs(value) -> list:
    """The tensor operands a move or elementwise op reads (concat: its tuple's fields)."""
    if is_call(value, "relax.concat"):
        return list(value.args[0].fields)
    return [value.args[0]]


def _elementwise(value) -> bool:
    """A per-element op whose other operands are scalar constants."""
    if not any(is_call(value, op) for op in _ELEMENTWISE):
        return False
    return all(scalar_const(a) is not None or isinstance(a, (tvm.tirx.IntImm, tvm.tirx.FloatImm))  # clip's bounds
               for a in value.args[1:])


def _apply(value, x: np.ndarray) -> np.ndarray:
    """A move op on the index array ``x`` (elementwise ops keep it)."""
    if _elementwise(value):
        return x
    if is_call(value, "relax.reshape"):
        return x.reshape(static_shape(value))
    if is_call(value, "relax.permute_dims"):
        axes = value.attrs.axes
        return x.transpose(None if axes is None else [int(a) for a in axes])
    if is_call(value, "relax.strided_slice"):
        axes, begin, end = (int_list(a) for a in value.args[1:4])
        strides = int_list(value.args[4]) if len(value.args) > 4 else None
        if None in (axes, begin, end):
            raise _NotAMove
        index = [slice(None)] * x.ndim
        for i, axis in enumerate(axes):
            index[axis] = slice(begin[i], end[i], strides[i] if strides else 1)
        return x[tuple(index)]
    raise _NotAMove


def _source(expr, bound: dict, elementwise: bool = False):
    """The one variable every path of the tree of `_MOVES` (with ``elementwise``, also `_ELEMENTWISE` ops) above
    ``expr`` ends in, else None."""
    leaves = set()

    def leaf(e):
        value = bound.get(e, e)
        if isinstance(value, relax.Var) and not value.same_as(e):  # an alias
            return leaf(value)
        if any(is_call(value, op) for op in _MOVES) or (elementwise and _elementwise(value)):
            for x in _inputs(value):
                leaf(x)
        elif isinstance(e, relax.Var):
            leaves.add(e)
        else:
            raise _NotAMove

    try:
        leaf(expr)
    except _NotAMove:
        return None
    return next(iter(leaves)) if len(leaves) == 1 else None


def row_table(expr, bound: dict, elementwise: bool = False):
    """(source variable, rows) if ``expr`` is one tensor's rows moved (`_MOVES`; with ``elementwise``, also through
    `_ELEMENTWISE` ops): row i of ``expr`` viewed as [M, C] is row ``rows[i]`` of the source viewed as [R, C], C the
    unchanged last axis.  None otherwise (another op, two sources, channels mixed across rows)."""
    source = _source(expr, bound, elementwise)
    if source is None:
        return None
    try:
        shape, out_shape = static_shape(source), static_shape(expr)
        if shape is None or out_shape is None or shape[-1] != out_shape[-1]:
            return None
        channels = shape[-1]
        base = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)

        def evaluate(e):
            if e.same_as(source):
                return base
            value = bound.get(e, e)
            if isinstance(value, relax.Var):  # an alias
                return evaluate(value)
            if is_call(value, "relax.concat"):
                return np.concatenate([evaluate(x) for x in value.args[0].fields], axis=int(value.attrs.axis))
            return _apply(value, evaluate(value.args[0]))

        moved = evaluate(expr).reshape(-1, channels)
    except _NotAMove:
        return None
    rows = moved[:, 0] // channels
    if not np.array_equal(moved, rows[:, None] * channels + np.arange(channels)):
        return None  # channels of one output row come from several input rows
    return source, rows.astype(np.int32)


def _copies(expr, source, bound: dict) -> int:
    """How many moves between ``source`` and ``expr`` copy data (transposes, slices, concats: not reshapes, and
    not the elementwise ops the input side keeps)."""
    if expr.same_as(source):
        return 0
    value = bound.get(expr, expr)
    if isinstance(value, relax.Var):  # an alias
        return _copies(value, source, bound)
    copies = any(is_call(value, op) for op in _COPIES)
    return int(copies) + sum(_copies(x, source, bound) for x in _inputs(value))


def _rebuild(value, data):
    """The elementwise op ``value`` on another data operand (same attributes and constants)."""
    return relax.Call(value.op, [data, *value.args[1:]], value.attrs, value.ty_args)


@tvm.transform.module_pass(opt_level=0, name="FoldRowMoves")
class FoldRowMoves:
    """Row moves before a qdense kernel's activation and between its output and a residual add → the kernel's
    row table (module docstring).  `.rewritten` counts the kernel calls rewritten: with a table, or (moves that
    keep the row order, e.g. transposes of unit axes) with their operand taken before the moves."""

    def __init__(self, target):
        self.target, self.rewritten = target, 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        bb = relax.BlockBuilder(mod)
        kernels = FusedKernels(bb, self.target, "rows")
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function):
                continue
            uses = var_uses(func)
            bound = bound_values(func)
            kernels_of = {g for g, _ in mod.functions_items()}

            def gatherable(call, codes: bool = False):
                """The spec of a qdense kernel call that takes no row table yet: a plain one, or with ``codes``
                also one storing column codes (a qkv projection, `qkv_column_codes`: its rows are gathered alike)."""
                if call.args[0] not in kernels_of:  # a kernel this pass made: it reads through a table already
                    return None
                spec = plain_qdense_spec(mod, call)
                if spec is None and codes:
                    spec = plain_qdense_spec(mod, call, column_codes=True)
                return spec if spec is not None and spec["variant"] != "amx" and "rows" not in spec else None

            def output_side(add, _m):
                shape, candidates = static_shape(add), []
                for i in (0, 1):  # which operand is a kernel's moved output (both: the one with real moves)
                    found = row_table(add.args[i], bound)
                    if found is None:
                        continue
                    source, rows = found
                    call, other = bound.get(source), add.args[1 - i]
                    spec = gatherable(call) if is_call(call, "relax.call_tir") else None
                    if spec is None or uses.get(source) != 1 or shape is None or static_shape(other) != shape \
                            or other.ty.dtype != "float32":
                        continue
                    identity = len(rows) == spec["M"] and np.array_equal(rows, np.arange(spec["M"]))
                    candidates.append(((not identity, _copies(add.args[i], source, bound)), call, spec, other,
                                       None if identity else rows))
                if not candidates:
                    return add
                _, call, spec, other, rows = max(candidates, key=lambda c: c[0])
                fused = kernels.get(call, spec, residual=True, a_rows=None if rows is None else spec["M"])
                self.rewritten += 1
                n_rows = spec["M"] if rows is None else len(rows)

                def emit():
                    res = bb.emit(relax.op.reshape(other, [n_rows, spec["N"]]))
                    table = [] if rows is None else [relax.const(rows)]
                    out = bb.emit(relax.call_tir(fused, relax.Tuple([*call.args[1].fields, res, *table]),
                                                 relax.TensorType((n_rows, spec["N"]), "float32")))
                    return relax.op.reshape(out, shape)

                return emitted(bb, emit)

            def input_side(call, _m):
                spec = gatherable(call, codes=True)
                if spec is None or not call.args[1].fields:
                    return call
                a = call.args[1].fields[0]
                ops, e = [], a  # the elementwise ops (and reshapes) above the moves, outermost first
                while True:
                    value = bound.get(e, e)
                    if _elementwise(value):
                        ops.append(value)
                    elif not is_call(value, "relax.reshape") and not (isinstance(value, relax.Var)
                                                                      and not value.same_as(e)):  # (an alias)
                        break
                    e = value if isinstance(value, relax.Var) else value.args[0]
                # below them only moves: an elementwise op between two moves would be left out of the rebuild
                below, found = _source(e, bound), row_table(a, bound, elementwise=True)
                if uses.get(a) != 1 or not ops or below is None or found is None or not below.same_as(found[0]):
                    return call
                source, rows = found
                src_shape = static_shape(source)
                r = int(np.prod(src_shape[:-1]))
                identity = len(rows) == r and np.array_equal(rows, np.arange(r))
                if len(rows) != spec["M"] or (identity and not _copies(a, source, bound)):
                    return call  # reshapes only: nothing to fold
                # moves that keep the order (transposes of unit axes): the same kernel, its operand from the source
                top = column_top(spec)
                fused = call.args[0] if identity else kernels.get(
                    call, spec, a_rows=r, **({} if top is None else {"column_codes": top}))
                dtype = "float32" if top is None else "uint8"
                self.rewritten += 1

                def emit():
                    x = source
                    for value in reversed(ops):
                        x = bb.emit(_rebuild(value, x))
                    x = bb.emit(relax.op.reshape(x, [r, src_shape[-1]]))
                    args = [x, *call.args[1].fields[1:], *([] if identity else [relax.const(rows)])]
                    return relax.call_tir(fused, relax.Tuple(args), relax.TensorType((spec["M"], spec["N"]), dtype))

                return emitted(bb, emit)

            func = rewrite_call(_ADD, calls_only(output_side), func)
            bb.update_func(gv, func)
            bound = bound_values(func)
            uses = var_uses(func)
            bb.update_func(gv, rewrite_call(_KERNEL, calls_only(input_side), func))
        return kernels.finish()
