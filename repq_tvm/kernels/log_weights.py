"""int16 attention weights from the attention probabilities, or straight from the logits (softmax fused).

    main(x, w):  x float32 [Bt, M, N]  the probabilities p (``softmax=False``) or the logits (``softmax=True``)
                 w int16 [Bt, planes, M, Np]  `reference.ops.attn_weights` of the log codes of p

With ``softmax`` each row is done in one task: max, e = fast_exp(x − max) into a row buffer (TVM's
`topi.fast_exp`, as `passes.fast_math` legalizes softmax), the sum, p = e / sum, then the codes and weights;
the probabilities never go to memory.  Max and sum are taken as one vector of partial results (rfactor):
the sum's order differs from the unfused graph's, so p can differ in its last bit, which moves a code only
where p sits on a code boundary.  TVM's default schedule of the softmax alone took 4.5 of DeiT-Small's
27 ms (Zen 4, 2 threads); this kernel with the weights takes 0.26 ms per call of 6x197x197, 3.2 ms a run.

Codes come from p's float32 exponent and mantissa bits: no log per element (libm's logf does not vectorize
and cost ~15 ns per attention entry), integer shifts, masks and compares against compile-time thresholds
(`code_thresholds`).  They go to a row buffer first, then each weight plane reads them: inlined, the code's
expression tree was copied into every use and LLVM took minutes on one model.
"""

from __future__ import annotations

import json
import math

import numpy as np
import tvm
from tvm import te, topi
from tvm.s_tir import Schedule

from ..reference.ops import attn_planes, sqrt2_weight
from ..relax_util import scheduled_kernel
from .attn_v import padded_tokens


# codes, weights and partial sums per vector step on every target: one zmm on AVX-512; two ymm on AVX2, where
# the 197-token rows of DeiT-Small ran 1.7x faster than in one ymm (0.50 against 0.88 ms per 6x197x197 call,
# Zen 3, 2 threads)
VECTOR = 16


def code_thresholds(scale: float, sqrt2: bool) -> tuple[int, list[int]]:
    """(offset, mantissa thresholds) so that for a normal float32 p = 2^(e−127)·(1 + mant/2^23):

        round(−m·log2(p/s)) = −m·(e − 127) + offset + #{k : mant ≤ thresholds[k]}

    With A = m·log2(s) = Li + Lf (Li integer, 0 ≤ Lf < 1) and t = −m·log2(1 + mant/2^23) ∈ (−m, 0],
    round(Lf + t) = −m + #{k ∈ {−m + ½, …, ½} : Lf + t ≥ k}, and Lf + t ≥ k ⇔ 1 + mant/2^23 ≤ 2^((Lf − k)/m).
    Computed in float64 at compile time; exact except where float32 log2 itself rounds across a boundary.
    """
    m = 2 if sqrt2 else 1
    a = m * math.log2(float(np.float32(scale)))
    li = math.floor(a)
    lf = a - li
    thresholds = []
    for i in range(m + 1):
        k = -m + 0.5 + i
        bound = (2.0 ** ((lf - k) / m) - 1.0) * 2 ** 23
        thresholds.append(int(min(max(math.floor(bound), -1), 2 ** 23)))
    return li - m, thresholds


def _code(x, i, m: int, offset: int, thresholds: list[int], top: int):
    """int32 log code of x[i] (−1 where the quantizer outputs 0: zero, negative, subnormal or past 2^b − 1)."""
    b = tvm.tirx.reinterpret("int32", x[i])
    mant = b & 0x7FFFFF
    raw = -m * ((b >> 23) - 127) + offset
    for t in thresholds:
        raw = raw + tvm.tirx.Select(mant <= t, 1, 0)
    dead = tvm.tirx.Or(b <= 0x7FFFFF, raw > top)
    return tvm.tirx.Select(dead, -1, tvm.tirx.max(raw, 0))


def log_weights_spec(shape, scale: float, bits: int, sqrt2: bool, f: int, groups: int, *,
                     softmax: bool = False) -> dict:
    """The kernel spec: everything that determines the compute (`log_weights_func`); ``lanes`` (`VECTOR` on
    every target, so the softmax sums add in the same order on x86 and aarch64 builds) pads the fused
    softmax's reductions to whole vectors.  `repq_tvm.tuning.spaces`
    keys on it."""
    return {"kind": "log_weights", "shape": [int(d) for d in shape], "scale": float(np.float32(scale)),
            "bits": bits, "sqrt2": bool(sqrt2), "f": f, "groups": groups, "softmax": bool(softmax),
            "lanes": VECTOR}


def log_weights_func(spec: dict) -> tvm.tirx.PrimFunc:
    """The unscheduled PrimFunc ``main(x, w)`` of a spec, carrying it as its ``repq.kernel`` attribute."""
    bt, rows, n = spec["shape"]
    sqrt2, f, groups, lanes = spec["sqrt2"], spec["f"], spec["groups"], spec["lanes"]
    m = 2 if sqrt2 else 1
    offset, thresholds = code_thresholds(spec["scale"], sqrt2)
    top, parities, r_f = 2 ** spec["bits"] - 1, m, sqrt2_weight(f)
    planes, n_p = attn_planes(parities, groups), padded_tokens(n)
    x = te.placeholder((bt, rows, n), "float32", name="x")
    if spec["softmax"]:  # topi.nn.fast_softmax's stages, the two reductions padded to whole vectors (see the schedule)
        n_r = -(-n // lanes) * lanes
        k1, k2 = te.reduce_axis((0, n_r), name="k1"), te.reduce_axis((0, n_r), name="k2")
        lowest = tvm.tirx.min_value("float32")
        mx = te.compute((bt, rows), lambda b, r: te.max(
            tvm.tirx.Select(k1 < n, x[b, r, tvm.tirx.min(k1, n - 1)], lowest), axis=k1), name="max")
        delta = te.compute((bt, rows, n_r), lambda b, r, t: x[b, r, tvm.tirx.min(t, n - 1)] - mx[b, r], name="delta")
        e = topi.math.fast_exp(delta)
        total = te.compute((bt, rows), lambda b, r: te.sum(
            tvm.tirx.Select(k2 < n, e[b, r, k2], tvm.tirx.const(0, "float32")), axis=k2), name="sum")
        p = te.compute((bt, rows, n), lambda b, r, t: e[b, r, t] / total[b, r], name="prob")
    else:
        p = x
    codes = te.compute((bt, rows, n_p), lambda b, r, t: tvm.tirx.Select(
        t < n, _code(p, (b, r, tvm.tirx.min(t, n - 1)), m, offset, thresholds, top), -1), name="codes")
    one = tvm.tirx.const(1, "int32")

    def weight(b, plane, r, t):  # `reference.ops.attn_weights`
        c = codes[b, r, t]
        s = (c + 1) >> 1 if sqrt2 else c
        w0 = one << (f - tvm.tirx.max(tvm.tirx.min(s, f), 0))
        g0 = tvm.tirx.all(c >= 0, s <= f, ((c & 1) if sqrt2 else 0) == plane)
        if groups == 1:
            return tvm.tirx.Select(g0, w0, 0).astype("int16")
        rr = tvm.tirx.max(tvm.tirx.min(s - f - 1, f + 1), 0)
        w1 = (tvm.tirx.Select((c & 1) == 1, (r_f + ((one << rr) >> 1)) >> rr, (one << f) >> rr) if sqrt2
              else (one << f) >> rr)
        g1 = tvm.tirx.all(c >= 0, s > f, s <= 2 * f + 1)
        return tvm.tirx.Select(plane < parities, tvm.tirx.Select(g0, w0, 0),
                               tvm.tirx.Select(g1, w1, 0)).astype("int16")

    w = te.compute((bt, planes, rows, n_p), weight, name="w")
    return te.create_prim_func([x, w]).with_attr("repq.kernel", json.dumps(spec, sort_keys=True))


def apply_schedule(sch: Schedule, spec: dict, rows=1, vector: int | None = None, unroll=None) -> Schedule:
    """Rows of ``rows`` per parallel task (an int or a sampled ExprRV dividing Bt x M; 1 is the hand schedule),
    the codes and weights in vectors of ``vector`` lanes (default `VECTOR`, at least the spec's), ``unroll`` (None, or an int /
    ExprRV) as the task loop's ``pragma_auto_unroll_max_step``.  The reductions keep the spec's lanes: their
    padding is in the compute."""
    lanes = spec["lanes"]
    vector = vector or max(VECTOR, lanes)
    blk = sch.get_sblock("w")
    b, pl, r, t = sch.get_loops(blk)
    sch.reorder(b, r, pl, t)
    task = sch.fuse(b, r)
    anchor, depth = task, 1  # the row loop the stages go under, and how many loops lead to it
    if not (isinstance(rows, int) and rows == 1):
        (task, anchor), depth = sch.split(task, [None, rows]), 2
    sch.parallel(task)
    if unroll is not None:
        sch.annotate(task, "pragma_auto_unroll_max_step", unroll)
        sch.annotate(task, "pragma_unroll_explicit", 1)
    sch.vectorize(sch.split(t, [None, vector])[1])
    cb = sch.get_sblock("codes")
    sch.compute_at(cb, anchor, preserve_unit_loops=True)
    if spec["softmax"]:  # per row, in order: max, e (row buffer), sum; p is recomputed inside the codes loop
        sch.compute_inline(sch.get_sblock("prob"))
        sch.compute_inline(sch.get_sblock("delta"))
        # max and sum as `lanes` partial results (rfactor), vectorized: a serial float reduction waits on
        # each add's latency (~0.26 of the 0.35 ms per DeiT-S call before)
        partial = {}
        for name in ("max", "sum"):
            red = sch.get_loops(sch.get_sblock(name))[-1]
            _, lane = sch.split(red, [None, lanes])
            partial[name] = sch.rfactor(lane, 2)
        for blk_s in (sch.get_sblock("sum"), partial["sum"], sch.get_sblock("T_fast_exp"), sch.get_sblock("max"),
                      partial["max"]):  # consumers first
            sch.compute_at(blk_s, anchor, preserve_unit_loops=True)
        for is_rf, blk_s in ((True, partial["max"]), (True, partial["sum"]), (False, sch.get_sblock("T_fast_exp"))):
            # compute_at leaves unit loops around the ones that count
            loops = [lp for lp in sch.get_loops(blk_s)[depth:] if int(sch.get(lp).extent) > 1]
            if not is_rf:
                sch.vectorize(sch.split(loops[0], [None, lanes])[1])
            else:  # rf blocks: the lane loop first, then the outer reduction (if any): lanes innermost
                if len(loops) == 2:
                    sch.reorder(loops[1], loops[0])
                sch.vectorize(loops[0])
    sch.vectorize(sch.split(sch.get_loops(cb)[-1], [None, vector])[1])
    return sch


def default_schedule(spec: dict) -> Schedule:
    """The hand schedule: one row per parallel task, vectors of `VECTOR` lanes (or the target's width)."""
    return apply_schedule(Schedule(log_weights_func(spec)), spec)


def log_weights_primfunc(shape, scale: float, bits: int, sqrt2: bool, f: int, groups: int, target, *,
                         softmax: bool = False):
    """Scheduled PrimFunc ``main(x, w)`` (see the module docstring) and a unique name for it.  The kernel is the
    same for every ``target`` (LLVM splits its 16-lane vectors to the target's registers)."""
    spec = log_weights_spec(shape, scale, bits, sqrt2, f, groups, softmax=softmax)
    bt, rows, n = shape
    kind = ("softmax_" if softmax else "") + ("sqrt2" if sqrt2 else "log2")
    name = f"repq_log_weights_{kind}_{bt}x{rows}x{n}_b{bits}_g{groups}_f{f}"
    # opaque (8): FuseOps must not pull the reshape of p into this hand-scheduled kernel
    return scheduled_kernel(default_schedule(spec), name).with_attr("op_pattern", 8), name
