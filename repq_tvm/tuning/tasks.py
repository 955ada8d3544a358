"""The tuning tasks of a compiled model: one per distinct kernel, with its definition and hand default.

`compile` lowers a model to a module whose integer kernels are hand-scheduled (each carrying its spec,
`spaces.spec_of`) and whose float kernels (LayerNorm, GELU, quantize, layout) are fused but not yet
scheduled (`passes.pipeline.lower_to_kernels`).  A task is keyed on the kernel's *definition*
(MetaSchedule's normalized unscheduled module): integer kernels rebuild it from their spec, float
kernels are their fused PrimFunc.  Its default is what `compile` would run without a log: the hand
schedule, or the float rules (`passes.float_schedules`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import tvm
import tvm_ffi
from tvm.relax.expr_functor import PyExprVisitor, visitor
from tvm.s_tir import Schedule
from tvm.s_tir.meta_schedule.tune_context import _normalize_mod

from ..passes.float_schedules import SCHEDULED, schedule_float_ops
from . import spaces


@dataclass
class Task:
    """One kernel to tune: ``name`` (its symbol in the model), ``calls`` per model run, ``mod`` its
    definition (normalized IRModule, the database's workload), ``default`` the schedule `compile` uses
    without a log, ``spec`` the integer kernel's spec (None for float kernels), ``members`` the
    definitions of every kernel that shares its structure (`group_key`) and so its tuned schedule."""

    name: str
    calls: int
    mod: tvm.IRModule
    default: Schedule
    spec: dict | None
    members: list[tvm.IRModule]

    @property
    def integer(self) -> bool:
        return self.spec is not None


def call_counts(mod: tvm.IRModule) -> dict[str, int]:
    """How often `main` calls each PrimFunc (by name)."""
    counts: dict[str, int] = {}

    @visitor
    class _Count(PyExprVisitor):
        def visit_call_(self, call):
            for arg in call.args:
                if isinstance(arg, tvm.ir.GlobalVar) and isinstance(mod[arg], tvm.tirx.PrimFunc):
                    counts[arg.name_hint] = counts.get(arg.name_hint, 0) + 1
            super().visit_call_(call)

    _Count().visit_expr(mod["main"])
    return counts


def definition_of(func: tvm.tirx.PrimFunc) -> tvm.IRModule:
    """The workload key: the integer kernel's unscheduled definition from its spec, else the func itself."""
    spec = spaces.spec_of(func)
    return _normalize_mod(spaces.definition(spec) if spec is not None else func)


def group_key(definition: tvm.IRModule) -> int:
    """Kernels equal up to their float constants share a task and a schedule: e.g. the twelve LayerNorm →
    quantize kernels of a ViT differ only in their quantizer's scale, which no schedule depends on.  Kernels
    built from a spec: equal `spaces.schedule_key` (the log√2 weights of every layer, whatever their scale)."""
    spec = spaces.spec_of(definition["main"])
    if spec is not None:
        digest = hashlib.sha256(json.dumps(spaces.schedule_key(spec), sort_keys=True).encode()).hexdigest()
        return int(digest[:16], 16)
    func = tvm_ffi.structural_map(definition["main"], [(tvm.tirx.FloatImm, lambda x: tvm.tirx.FloatImm(str(x.ty), 1.0))])
    return tvm_ffi.structural_hash(func)


def _is_load(x) -> bool:
    return type(x).__name__ in ("BufferLoad", "TensorLoad")


def indirect_loads(func: tvm.tirx.PrimFunc) -> bool:
    """True if the kernel indexes a buffer by values it loads (e.g. `take` of the class / position tokens):
    on random inputs it reads out of bounds, which kills the process that times it (and a board's RPC server)."""
    found = []

    def visit(x):
        if _is_load(x):
            for index in x.indices:
                tvm_ffi.structural_walk(index, lambda y: found.append(y) if _is_load(y) else None)

    tvm_ffi.structural_walk(func.body, visit)
    return bool(found)


def tunable(func: tvm.tirx.PrimFunc) -> bool:
    """Kernels with a spec and a search space (not the plain-loop fallbacks: `spaces.searchable`) and float
    kernels not yet scheduled, except those with data-dependent indexing (`indirect_loads`)."""
    spec = spaces.spec_of(func)
    if spec is not None:
        return spaces.searchable(spec)
    return (func.attrs is None or SCHEDULED not in func.attrs) and not indirect_loads(func)


def extract(mod: tvm.IRModule, target: tvm.target.Target) -> list[Task]:
    """Every kernel of ``mod`` (from `lower_to_kernels`) as a task; kernels shared by several call sites once."""
    counts = call_counts(mod)
    with target:  # on a copy: dlight's pass updates the module it is given in place
        floats = schedule_float_ops()(mod.clone())
    tasks, seen = [], {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or gv.name_hint not in counts:
            continue
        if not tunable(func):
            continue
        spec = spaces.spec_of(func)
        definition = definition_of(func)
        if spec is not None:
            default = spaces.default_schedule(spec)
        else:
            default = Schedule(_normalize_mod(floats[gv.name_hint]))
        key = group_key(definition)
        if key in seen:
            seen[key].calls += counts[gv.name_hint]
            seen[key].members.append(definition)
            continue
        seen[key] = Task(gv.name_hint, counts[gv.name_hint], definition, default, spec, [definition])
        tasks.append(seen[key])
    return tasks

