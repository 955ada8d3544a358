"""Default CPU schedules for the ops that stay in float: LayerNorm, softmax, GELU, quantize, residual adds.

After legalization and fusion these are plain loop nests: one thread, scalar code, which made them
most of an untuned model's latency. Two rules cover them, applied to every PrimFunc that is not
already scheduled (the integer kernels are marked `tirx.is_scheduled`):

- `Elementwise`: fused injective chains (GELU → quantize → clip, transposes, dequantize, adds).
  Every spatial block but the last is inlined; the last is parallel over its outer loops and
  vectorized on the innermost one, its loops in the order of what it reads (`_read_order`).
- `RowReduction` for reduction + injective chains that share leading spatial axes (LayerNorm → quantize):
  parallel rows; per row every sum as a vector of partial sums, the elementwise tail vectorized
  (`row_stages`); TVM's `dlight.cpu.Reduction` where that schedule does not apply.

Anything neither rule takes keeps TVM's default (correct, slow) loops; `unscheduled()` lists them.
"""

from __future__ import annotations

import math

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent, try_inline_contiguous_spatial
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target.codegen import llvm_get_vector_width

SCHEDULED = "tirx.is_scheduled"
# Partial sums of a row reduction, on every target (one zmm, two ymm, four NEON q registers): the float sums
# then add in the same order everywhere, so an aarch64 build's logits equal the x86 build's bit for bit
PARTIALS = 16


def _lanes(target, bits: int) -> int:
    width = llvm_get_vector_width(target)
    return max((width if width > 0 else 128) // bits, 2)


class Elementwise(CPUScheduleRule):
    """Purely spatial PrimFuncs: inline the chain, parallel outer loops, vectorize the inner loop."""

    MIN_PARALLEL = 4096  # below this many elements a thread launch costs more than it saves

    def apply(self, func: tirx.PrimFunc, target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(info.is_injective() for info in infos):
            return None
        infos = try_inline_contiguous_spatial(sch, infos)
        if infos is None:
            return None
        for info in infos:
            self._schedule_block(sch, info.block_rv, target)
        return sch

    def _schedule_block(self, sch, block, target) -> None:
        loops = sch.get_loops(block)
        extents = [get_extent(sch, loop) for loop in loops]
        if not loops or not all(isinstance(e, int) for e in extents):
            return
        order = _read_order(sch.get(block), len(loops))
        if order is not None:
            sch.reorder(*[loops[i] for i in order])
            loops = sch.get_loops(block)
            extents = [extents[i] for i in order]
        stmt = sch.get(block)
        bits = max(r.source.dtype.bits for r in [*stmt.reads, *stmt.writes])  # float32 math in a u8 chain
        lanes = _lanes(target, bits)
        inner = loops[-1]
        outer = list(loops[:-1])
        if extents[-1] >= 2 * lanes:
            rest, vec = sch.split(inner, [None, lanes])
            sch.vectorize(vec)
            outer.append(rest)
        elif extents[-1] >= 2:
            sch.vectorize(inner)
        total = 1
        for e in extents:
            total *= e
        if outer and total >= self.MIN_PARALLEL:
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def _read_order(stmt, n_loops: int) -> list[int] | None:
    """The block's loops (one per iter var) in the order its largest input is laid out, where that differs from the
    output's and keeps the innermost loop innermost; None: keep the output's order.

    Why: a transposing kernel then runs, and splits across threads, in the row order of what it reads, so each
    thread reads the rows its own core wrote when the producer splits its rows the same way.  The q/k/v head
    transposes after the qkv projection ([T, 3·H·D] → [H, T, D]), DeiT-S W8/A8 on a Zen 3 (AVX2, 2 threads): the
    whole model 61.9 → 60.0 and 65.2 → 64.4 ms median (`benchmarks/compare_artifacts.py`, before and after side by
    side, two pairs of 30 rounds, logits identical); those kernels 1.73 → 0.85 ms per run in the model in two
    `repq-tvm profile` runs one after the other (not side by side: such in-model times move between runs there).
    """
    if len(stmt.iter_vars) != n_loops or not stmt.reads:
        return None

    def size(read) -> int:  # the whole buffer's: a block reads one element of its input but all of a small operand
        return math.prod(d.value if isinstance(d, tirx.IntImm) else 1 for d in read.source.shape)

    read = max(stmt.reads, key=size)
    position = []
    for i, iv in enumerate(stmt.iter_vars):
        dims = [d for d, r in enumerate(read.region) if _mentions(r.min, [iv.var])]
        if len(dims) > 1:
            return None
        position.append((dims[0] if dims else -1, i))
    order = [i for _, i in sorted(position)]
    if order[-1] != n_loops - 1 or order == list(range(n_loops)):
        return None
    return order


def _mentions(expr, variables) -> bool:
    return any(any(e.same_as(v) for v in variables) for e in tirx.analysis.undefined_vars(expr))


class RowReduction(dl.cpu.Reduction):
    """Row reductions and their elementwise tail: `row_stages`, else dlight's CPU `Reduction` (with the sums it
    can split as vector partials, `_vector_partial_sums`), only where every reduction runs along the last axis
    of what it reads.

    That is LayerNorm and softmax (rows reduced independently). A matmul also has a reduction plus
    an injective epilogue, but parallel rows with a scalar inner product is slower than TVM's default.
    """

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        for info in normalize_prim_func(sch) or []:
            if info.is_injective():
                continue
            stmt = sch.get(info.block_rv)
            reduce_vars = {iv.var for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.CommReduce}
            for read in stmt.reads:  # reads either along the reduced last axis, or per row (a mean)
                index = [r.min for r in read.region]
                uses = [_mentions(i, reduce_vars) for i in index]
                if any(uses) and not (uses[-1] and sum(uses) == 1):
                    return None
        try:
            return row_stages(func, PARTIALS)
        except (tvm.error.InternalError, tvm.s_tir.schedule.ScheduleError, ValueError):
            pass
        sch = super().apply(func, target, tunable)
        if sch is not None:
            _vector_partial_sums(sch, PARTIALS)
        return sch


ROWS = 4  # rows of one `row_stages` task, their sums interleaved


def row_stages(func: tirx.PrimFunc, lanes: int, rows: int | None = None) -> s_tir.Schedule:
    """Parallel tasks of ``rows`` rows; in each, every row sum (LayerNorm's mean, then its variance) as ``lanes``
    partial sums (rfactor, vectorized) then their total, the rows' sums interleaved step by step, and the
    elementwise tail (normalize → quantize) in vectors.

    dlight's `Reduction` left the variance a serial loop (rfactor refuses a block once it shares its row loop,
    so the partials are split off first, then placed in the row): 0.144 → 0.042 ms per 197x384 LayerNorm →
    quantize on a Zen 3 (AVX2, 2 threads); MetaSchedule found the same split (0.063 → 0.031 ms, Zen 4).
    One row per task, a row's sums were chains of dependent adds (24 vector adds, then 16 scalar ones, twice)
    that left the core waiting; 4 rows side by side are 4 independent chains, each row's sums in the same order
    as before (the same values, bit for bit): DeiT-S's 24 LayerNorm → quantize calls 0.37 → 0.24-0.26 ms standalone,
    0.45 → 0.28-0.36 in the model (`repq-tvm profile`, Zen 4, 2 threads).  Only the innermost row loop is split (a
    task never spans two images of a batch), and only where it has at least 2 x ``rows`` rows.  ``rows`` defaults to
    `ROWS`.
    Raises ValueError where the shape does not fit: a reduction of one loop whose extent is a multiple of
    ``lanes``, spatial stages that inline, an output whose leading loops are the rows.
    """
    rows = ROWS if rows is None else rows
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if not infos or not infos[-1].is_injective():
        raise ValueError("the last stage is not elementwise")
    sums = []
    for info in infos[:-1]:
        if info.is_injective():
            sch.compute_inline(info.block_rv)
            continue
        loops = sch.get_loops(info.block_rv)
        extent = get_extent(sch, loops[-1])
        reduce_loops = [iv for iv in sch.get(info.block_rv).iter_vars if iv.iter_type == tirx.IterVar.CommReduce]
        if len(reduce_loops) != 1 or not isinstance(extent, int) or extent % lanes:
            raise ValueError("not a single reduction loop of whole vectors")
        _, lane = sch.split(loops[-1], [None, lanes])
        sums.append((info.block_rv, sch.rfactor(lane, len(sch.get(info.block_rv).writes[0].region))))
    if not sums:
        raise ValueError("no reduction")
    loops = sch.get_loops(infos[-1].block_rv)
    if len(loops) < 2:
        raise ValueError("no row loop")
    *lead, row, cols = loops
    row_extent = get_extent(sch, row)
    interleave = rows > 1 and isinstance(row_extent, int) and row_extent >= 2 * rows
    if interleave:
        row, _ = sch.split(row, [None, rows])
    task = sch.fuse(*lead, row) if lead else row
    sch.vectorize(sch.split(cols, [None, lanes])[1])
    sch.parallel(task)
    for total, partial in reversed(sums):  # consumers first
        sch.compute_at(total, task, preserve_unit_loops=True)
        sch.compute_at(partial, task, preserve_unit_loops=True)
    for total, partial in sums:
        # compute_at makes one loop per block iter, in their order: partials (lane, [row,] k), totals (lane[, row]);
        # a partial's lane loop goes innermost and is vectorized, its row loop just outside it, unrolled; a total's
        # row loop stays inside its lane loop, unrolled (the rows' chains of adds side by side)
        inner = [lp for lp in sch.get_loops(partial)[1:] if get_extent(sch, lp) != 1]
        lane, rest = inner[0], inner[1:]
        if interleave:
            sch.reorder(*rest[1:], rest[0], lane)
            sch.unroll(rest[0])
            sch.unroll([lp for lp in sch.get_loops(total)[1:] if get_extent(sch, lp) != 1][-1])
        elif rest:
            sch.reorder(*rest, lane)
        sch.vectorize(lane)
    return sch


def _vector_partial_sums(sch: s_tir.Schedule, lanes: int) -> None:
    """Row reductions (LayerNorm's sum) as `lanes`-wide vectors of partial results.

    dlight leaves them as serial loops: each add waits for the previous one (~4 cycles): 0.09 ms per
    197x384 LayerNorm on a Zen 4, 2.2 of DeiT-Small's 25 ms. `rfactor` on the innermost reduction loop
    keeps one partial per lane (vectorized, independent), then adds the partials. Float sums change order,
    as any vectorized reduction does. Left alone: reductions whose loops are padded past the reduced extent
    (dlight splits 96 channels as 2 x 64 with a predicate, which rfactor does not keep: Swin's LayerNorms
    came out wrong), inner loops that are not a multiple of `lanes`, and blocks rfactor refuses (LayerNorm's
    variance sits second under its row loop).
    """
    root = sch.get_sblock("root")
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(root)
             if any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(b).iter_vars)]
    for name in names:
        block = sch.get_sblock(name)
        loops = sch.get_loops(block)
        stmt = sch.get(block)
        extents = [get_extent(sch, lp) for lp in loops]
        reduced = 1
        for iv in stmt.iter_vars:
            if iv.iter_type == tirx.IterVar.CommReduce:
                reduced *= int(iv.dom.extent)
        covered = 1
        for e in extents[1:]:
            covered = covered * e if isinstance(e, int) else None
            if covered is None:
                break
        inner = extents[-1] if loops else None
        if covered != reduced or not isinstance(inner, int) or inner % lanes:
            continue
        for key in ("pragma_auto_unroll_max_step", "pragma_unroll_explicit"):  # rfactor refuses annotated loops
            if key in sch.get(loops[-1]).annotations:
                sch.unannotate(loops[-1], key)
        try:
            _, lane = sch.split(loops[-1], [None, lanes])
            rf = sch.rfactor(lane, len(stmt.writes[0].region))
        except (tvm.error.InternalError, tvm.s_tir.schedule.ScheduleError, ValueError):
            continue
        # back under the row loop of its consumer (rfactor hoists it into a parallel loop of its own)
        sch.compute_at(rf, sch.get_loops(sch.get_sblock(name))[0], preserve_unit_loops=True)
        # compute_at puts the (spatial) lane loop first: move it innermost, then vectorize it
        rf_loops = [lp for lp in sch.get_loops(rf)[1:] if get_extent(sch, lp) != 1]
        lane = next((lp for lp in rf_loops if get_extent(sch, lp) == lanes), None)
        if lane is not None:
            sch.reorder(*[lp for lp in rf_loops if not lp.same_as(lane)], lane)
            sch.vectorize(lane)


def schedule_float_ops() -> tvm.transform.Pass:
    """The pass applying `Elementwise` then `RowReduction` to unscheduled PrimFuncs."""
    return dl.ApplyDefaultSchedule(Elementwise(), RowReduction())


def unscheduled(mod: tvm.IRModule) -> list[str]:
    """Names of the PrimFuncs no rule scheduled (they run as plain single-thread loops)."""
    return sorted(gv.name_hint for gv, f in mod.functions_items()
                  if isinstance(f, tirx.PrimFunc) and int(f.attrs.get(SCHEDULED, 0) if f.attrs else 0) != 1)
