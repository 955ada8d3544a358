"""MetaSchedule search spaces of the hand-scheduled integer kernels.

Every integer kernel the passes emit carries its definition as a JSON spec (PrimFunc attribute
``repq.kernel``: `kernels.qdense.qdense_func`, `kernels.attn_v.attn_v_func`, `kernels.qbmm.qbmm_func`).  From the spec this module rebuilds

- `definition`: the unscheduled PrimFunc (what the tuning database keys a workload on),
- `default_schedule`: the hand schedule `compile` uses without a tuning log,
- `design_spaces`: the same schedule with its tile sizes as sampled decisions (`sample_categorical`),
  one design space per structural choice (loop order, parallel loop, int16 pre-accumulation depth; the
  lane blocks of a tile for attn @ V and q @ kᵀ).

The tensor intrinsic stays the tensorized core of every candidate: tuning moves tiles and loops around
it, never the arithmetic.  Sizes are sampled among those that tile the kernel's padded extents
exactly (tensorize cannot take a ragged tile) and fit the register file.
"""

from __future__ import annotations

import json

import tvm
import tvm_ffi
from tvm.s_tir import Schedule

from ..kernels import attn_v as av
from ..kernels import log_weights as lw
from ..kernels import qbmm as qb
from ..kernels import qdense as qd
from ..kernels.packing import ceil_to

ATTR = "repq.kernel"
# accumulator registers a tile may use (rows x lane blocks): zmm / q registers less operands, ymm on AVX2
_ACCUMULATORS = {"vnni": 24, "avx2_u8s8": 12, "avx2_i16": 12, "neon_sdot": 20, "fallback": 8}
_MAX_ROWS = 8


def spec_of(func: tvm.tirx.PrimFunc) -> dict | None:
    """The kernel spec a PrimFunc carries, or None for kernels without one (the float kernels)."""
    attrs = func.attrs
    if attrs is None or ATTR not in attrs:
        return None
    return json.loads(str(attrs[ATTR]))


def _kind(spec: dict):
    kinds = {"qdense": _QDense, "attn_v": _AttnV, "qbmm": _QBmm, "log_weights": _LogWeights, "attention": _Attention}
    if spec.get("kind") not in kinds:
        raise ValueError(f"no search space for kernel kind {spec.get('kind')!r}")
    return kinds[spec["kind"]]


def definition(spec: dict) -> tvm.tirx.PrimFunc:
    return _kind(spec).definition(spec)


def default_schedule(spec: dict, ref: bool = False) -> Schedule:
    return _kind(spec).default(spec, ref)


def searchable(spec: dict) -> bool:
    """Whether the kernel of this spec has a search space (else it keeps its hand schedule)."""
    return _kind(spec).searchable(spec)


def exact(spec: dict) -> bool:
    """Whether every candidate must equal the definition bit for bit (else: on all but a few outputs)."""
    return _kind(spec).exact


def schedule_key(spec: dict) -> dict:
    """The spec less what no schedule depends on: kernels with equal keys share a task and its schedule.
    A kind's ``free`` entries are dropped; its ``constants`` (entries that only set constants of the compute,
    such as a fused quantizer's scale) are kept as present, whatever their value."""
    kind = _kind(spec)
    return {k: ("constants" if k in getattr(kind, "constants", ()) else v) for k, v in spec.items()
            if k not in kind.free}


def design_spaces(sch: Schedule) -> list[Schedule]:
    """The ScheduleFn of `tuning.tasks`: ``sch`` holds a definition; one traced schedule per structure."""
    spec = spec_of(sch.mod["main"])
    return _kind(spec).spaces(sch, spec)


def _divisors(n: int, cap: int) -> list[int]:
    return [d for d in range(1, min(n, cap) + 1) if n % d == 0]


def _sampled_rows(sch: Schedule, rows: list[int], apply) -> Schedule:
    """A copy of ``sch`` scheduled by ``apply(copy, mi)``, ``mi`` the rows per tile drawn uniformly from ``rows``
    (a traced decision: the search redraws it)."""
    s = sch.copy()
    apply(s, s.sample_categorical(rows, [1 / len(rows)] * len(rows)))
    return s


class _QDense:
    """`kernels.qdense`: rows and lane blocks per register tile, tile order (rows or columns outer, and the blocks of
    column tiles where the hand schedule takes them), parallel loop, depth.  The twelve
    fc1 → GELU → codes kernels of a ViT take their quantizer as an operand: one kernel, one task (``gelu_codes``
    stays a constants entry: logs recorded when it held the quantizer keep their key); the form their codes are
    stored in (``codes_operand``: the next kernel's int16 or int8) sets no loop."""

    exact, free, constants = True, ("codes_operand",), ("gelu_codes",)

    @staticmethod
    def definition(spec: dict) -> tvm.tirx.PrimFunc:
        return qd.qdense_func(spec)

    @staticmethod
    def default(spec: dict, ref: bool = False) -> Schedule:
        return qd.default_schedule(spec, ref)

    @staticmethod
    def spaces(sch: Schedule, spec: dict) -> list[Schedule]:
        v = qd.VARIANTS[spec["variant"]]
        m_p = ceil_to(spec["M"], spec["m_tile"])
        n_blocks = ceil_to(spec["N"], v.lanes) // v.lanes
        k_tiles = ceil_to(spec["K"], v.kpack) // v.kpack
        budget = _ACCUMULATORS[v.name]
        depths = [d for d in v.depths if k_tiles % d == 0 and v.exact(spec["bits_a"], spec["bits_w"], d)]
        structures = [("rows", "outer")] if spec["compensate"] else [
            (o, p) for o in ("rows", "cols") for p in ("tiles", "outer")]
        out = []
        for nbi in _divisors(n_blocks, budget):
            rows = _divisors(m_p, min(_MAX_ROWS, budget // nbi))
            if not rows:
                continue
            # where the hand schedule runs L2-sized blocks of column tiles (`qdense.column_block`), that order too
            block = qd.column_block(spec["M"], spec["N"], spec["K"], v, nbi, spec["compensate"], bool(spec.get("rows")))
            for depth in depths:
                for order, parallel in structures + ([("blocks", "outer")] if block else []):
                    out.append(_sampled_rows(sch, rows, lambda s, mi: qd.apply_tensorized(
                        s, v, mi, nbi, depth, False, spec["compensate"], order, parallel,
                        block if order == "blocks" else None)))
        return out

    @staticmethod
    def searchable(spec: dict) -> bool:
        """The plain-loop fallback (aarch64 without dotprod) has no intrinsic core to tile around, the AMX kernel
        is one fixed blocking of all eight tile registers (`kernels.qdense_amx`): neither is searched.  Nor are
        kernels that read their rows through a table (``rows``, `passes.row_moves`): on random inputs they would
        read out of bounds (`tasks.indirect_loads`)."""
        return qd.VARIANTS[spec["variant"]].tensorized and spec["variant"] != "amx" and not spec.get("rows")


class _AttnV:
    """`kernels.attn_v` (log√2 attention's attn @ V): rows per register tile among the divisors of the padded
    rows within the register budget (planes x rows x blocks accumulators), one design space per lane-block
    count dividing the padded D's blocks (the compute's padded D depends on the spec's ``d_tile`` only)."""

    exact, free = True, ()

    @staticmethod
    def definition(spec: dict) -> tvm.tirx.PrimFunc:
        return av.attn_v_func(spec)

    @staticmethod
    def default(spec: dict, ref: bool = False) -> Schedule:
        return av.default_schedule(spec, ref)

    @staticmethod
    def spaces(sch: Schedule, spec: dict) -> list[Schedule]:
        lanes = av.VARIANTS[spec["variant"]][0]
        planes = spec["groups"]
        m_p = ceil_to(spec["M"], spec["m_tile"])
        d_blocks = ceil_to(spec["D"], spec["d_tile"]) // lanes
        budget = av.ACCUMULATORS[spec["variant"]]
        out = []
        for nbi in _divisors(d_blocks, budget // planes):
            rows = _divisors(m_p, budget // (planes * nbi))
            out.append(_sampled_rows(sch, rows, lambda s, mi: av.apply_schedule(s, spec["variant"], mi, nbi)))
        return out

    @staticmethod
    def searchable(spec: dict) -> bool:
        """The plain-loop fallback (aarch64) has no intrinsic core to tile around: not searched."""
        return av.VARIANTS[spec["variant"]][1] is not None


class _QBmm:
    """`kernels.qbmm` (q @ kᵀ): rows per register tile among the divisors of the padded rows within the register
    budget, one design space per lane-block count dividing the padded N's blocks (the compute's padded N
    depends on ``n_tile`` only) and, for the Arm "neon_sdot", per tile order (row or column tiles outer)."""

    exact, free = True, ()

    @staticmethod
    def definition(spec: dict) -> tvm.tirx.PrimFunc:
        return qb.qbmm_func(spec)

    @staticmethod
    def default(spec: dict, ref: bool = False) -> Schedule:
        return qb.default_schedule(spec, ref)

    @staticmethod
    def spaces(sch: Schedule, spec: dict) -> list[Schedule]:
        lanes = qb.spec_lanes(spec["variant"])
        m_p = ceil_to(spec["M"], spec["m_tile"])
        n_blocks = ceil_to(spec["N"], spec["n_tile"]) // lanes
        budget = _ACCUMULATORS[spec["variant"]]
        orders = ("rows", "cols") if spec["variant"] == "neon_sdot" else (None,)
        out = []
        for nbi in _divisors(n_blocks, budget):
            rows = _divisors(m_p, min(_MAX_ROWS, budget // nbi))
            for order in orders:
                out.append(_sampled_rows(sch, rows, lambda s, mi: qb.apply_schedule(s, spec, mi, nbi, order=order)))
        return out

    @staticmethod
    def searchable(spec: dict) -> bool:
        """The plain-loop fallback has no intrinsic core to tile around: not searched."""
        return spec["variant"] != "fallback"


class _LogWeights:
    """`kernels.log_weights` (the fused softmax → log√2 codes → power-of-two weights): rows per parallel task and
    the task loop's unroll limit sampled, one design space per vector width of the codes and weights (the
    spec's lanes, twice that).  Not bit for bit against the definition: the hand schedule already sums the
    softmax in `lanes` partial sums, which moves a code that sits at a rounding midpoint.  The quantizer's
    scale only sets constants (the integer thresholds of the kernel from p; the fused softmax's kernel reads it
    at run time and has none in its spec), so the kernels of all layers share one schedule."""

    exact, free = False, ("scale",)

    @staticmethod
    def definition(spec: dict) -> tvm.tirx.PrimFunc:
        return lw.log_weights_func(spec)

    @staticmethod
    def default(spec: dict, ref: bool = False) -> Schedule:
        return lw.default_schedule(spec)

    @staticmethod
    def spaces(sch: Schedule, spec: dict) -> list[Schedule]:
        bt, rows, _ = spec["shape"]
        counts, unrolls = _divisors(bt * rows, _MAX_ROWS), [0, 16, 64]
        out = []
        for vector in (spec["lanes"], 2 * spec["lanes"]):
            s = sch.copy()
            r = s.sample_categorical(counts, [1 / len(counts)] * len(counts))
            u = s.sample_categorical(unrolls, [1 / len(unrolls)] * len(unrolls))
            out.append(lw.apply_schedule(s, spec, r, vector, u))
        return out

    @staticmethod
    def searchable(spec: dict) -> bool:
        return True


class _Attention:
    """The fused attention (`kernels.attention_amx`, `kernels.attention_vector`): hand-written TIR, one fixed
    blocking (the AMX one of the eight tile registers, as the AMX qdense): not searched."""

    exact, free = True, ()

    @staticmethod
    def definition(spec: dict) -> tvm.tirx.PrimFunc:
        from ..kernels.attention_vector import attention_func

        return attention_func(spec)

    @staticmethod
    def default(spec: dict, ref: bool = False) -> Schedule:
        from ..kernels.attention_vector import attention_func

        return Schedule(attention_func(spec, emulate=ref))

    @staticmethod
    def spaces(sch: Schedule, spec: dict) -> list[Schedule]:
        return []

    @staticmethod
    def searchable(spec: dict) -> bool:
        return False


def replay(func: tvm.tirx.PrimFunc, trace, ref: bool) -> Schedule:
    """Apply ``trace`` to ``func`` with every repq tensor intrinsic swapped for its plain-loop twin
    (``ref``) or back to the real one: a tuned kernel then runs bit for bit on any CPU (`verify`)."""
    from ..kernels.intrinsics_arm import register_intrinsics as register_arm
    from ..kernels.intrinsics_x86 import ref_name, register_intrinsics, register_named

    register_intrinsics()
    register_arm()
    suffix = ref_name("")

    def swap(x):  # the trace's JSON form: nested FFI arrays of strings, numbers and IR nodes
        if isinstance(x, str):
            if not x.startswith("repq_"):
                return x
            register_named(x)
            base = x[: -len(suffix)] if x.endswith(suffix) else x
            return ref_name(base) if ref else base
        if isinstance(x, (list, tuple, tvm_ffi.Array)):
            return [swap(y) for y in x]
        return x

    data = swap(trace.as_json(remove_postproc=False))

    sch = Schedule(tvm.IRModule({"main": func}))
    tvm.s_tir.schedule.Trace.apply_json_to_schedule(swap(data), sch)
    return sch
