"""int16 attention weights from the attention probabilities, or straight from the logits (softmax fused).

    main(x, w):         x float32 [Bt, M, N]  the probabilities p (``softmax=False``)
    main(x, log2s, w):  x the logits p is the softmax of (``softmax=True``), log2s float64 [1] = log2 of the
                        quantizer's scale (run time: one kernel for every block, `log2_scale_operand`)
                        w int16 [Bt, planes, M, Np]  `reference.ops.attn_weights` of the log codes of p

From p (``softmax=False``), codes come from p's float32 exponent and mantissa bits: no log per element (libm's
logf does not vectorize and cost ~15 ns per attention entry), integer shifts, masks and compares against
compile-time thresholds (`code_thresholds`), exactly the oracle's codes.

From the logits (``softmax=True``) no probability is formed: −m·log2(p/s) of the softmax is affine in the logit,

    code = round(m·log2(e)·(max − x) + m·(log2 Σ + log2 s)),    Σ = Σ_n exp(x_n − max)

so each row takes its max, the sum of TVM's `fast_exp` (as `passes.fast_math` legalizes softmax; its x ≤ 0 form
`epilogue.fast_exp_nonpositive`, the same values; max and sum
as vectors of partial results, rfactor), one float64 log2 of the sum plus log2s (`_code_bias`), then one
multiply-add and a rounding per entry.  These are the exact softmax's codes up to float32 rounding in the log
domain: they differ from the float64 oracle's only where its value lies within ~1e-5 of a rounding midpoint (where
the unfused graph's float32 p, another rounding of the same number, can fall either way too).  Codes past
2^b − 1 are −1 (no weight), as the oracle's; an underflowing p, which the oracle drops as 0, has a code past
every weight group.
Why: computing p = exp / Σ and its bits read the logits through a per-lane clamped index LLVM scalarized: per
DeiT-Small call of 6x197x197, 0.264 → 0.229 ms (standalone column of `repq-tvm profile` on the DeiT-S W8/A8
artifacts compiled at f9fba36 and 362a0fa, Sapphire Rapids, 2 threads; 0.141 with whole 512-bit vectors).

Codes go to a row buffer first, then each weight plane reads them: inlined, the code's expression tree was
copied into every use and LLVM took minutes on one model.
"""

from __future__ import annotations

import json
import math

import numpy as np
import tvm
from tvm import te
from tvm.s_tir import Schedule
from tvm.script import tirx as T

from ..reference.ops import sqrt2_weight
from ..relax_util import scheduled_kernel
from . import epilogue
from .attention_consts import log2_scale
from .attn_v import padded_tokens

# codes, weights and partial sums per vector step on every target: one zmm on AVX-512; two ymm on AVX2, where
# the 197-token rows of DeiT-Small ran 1.7x faster than in one ymm (0.50 against 0.88 ms per 6x197x197 call,
# Zen 3, 2 threads)
VECTOR = 16
HALF = VECTOR // 2  # one ymm of int32 / float32: the step of a row's ragged end in the fused attention kernels


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


def _code_bias(total, m: int, log2s):
    """float32 m·(log2(total) + log2(s)) for a row's softmax sum ``total`` ≥ 1 and the float64 expression
    ``log2s`` = log2(s) (a constant, or a fused attention's load: `attention_consts`), computed in float64 from its
    exponent and mantissa (log(M) = 2·atanh((M − 1)/(M + 1)), 9 series terms, error < 1e-11): no libm call, so
    x86 and aarch64 builds agree bit for bit (their log2f may not), and once per row, not per entry."""
    bits = tvm.tirx.reinterpret("int32", total)
    mant = tvm.tirx.reinterpret("float32", (bits & 0x7FFFFF) | 0x3F800000).astype("float64")
    u = (mant - 1.0) / (mant + 1.0)
    u2 = u * u
    series = tvm.tirx.const(2.0 / 17, "float64")
    for k in (15, 13, 11, 9, 7, 5, 3, 1):
        series = series * u2 + tvm.tirx.const(2.0 / k, "float64")
    log2_total = ((bits >> 23) - 127).astype("float64") + u * series * tvm.tirx.const(1 / math.log(2), "float64")
    return (tvm.tirx.const(float(m), "float64") * (log2_total + log2s)).astype("float32")


def _code(p, m: int, offset: int, thresholds: list[int], top: int):
    """int32 log code of probability p (−1 where the quantizer outputs 0: zero, negative, subnormal or past 2^b − 1)."""
    b = tvm.tirx.reinterpret("int32", p)
    mant = b & 0x7FFFFF
    raw = -m * ((b >> 23) - 127) + offset
    for t in thresholds:
        raw = raw + tvm.tirx.Select(mant <= t, 1, 0)
    dead = tvm.tirx.Or(b <= 0x7FFFFF, raw > top)
    return tvm.tirx.Select(dead, -1, tvm.tirx.max(raw, 0))


def softmax_slope(m: int):
    """float32 m·log2(e): the codes' slope in the logits."""
    return tvm.tirx.const(m * math.log2(math.e), "float32")


def softmax_code(mx, x, bias, slope, top: int):
    """int32 log code of logit ``x`` in a row of max ``mx`` and code bias ``bias`` (`_code_bias`):
    round(m·log2(e)·(max − x) + bias), clamped before the cast; −1 past 2^b − 1 (no weight)."""
    raw = (mx - x) * slope + bias
    c = tvm.tirx.round(tvm.tirx.min(raw, tvm.tirx.const(top + 1, "float32"))).astype("int32")
    return tvm.tirx.Select(c > top, -1, tvm.tirx.max(c, 0))


def softmax_codes_macro(n: int, m: int, top: int, rows: int, n_codes: int | None = None):
    """The macro ``softmax_codes(L, codes, part, row, r0, log2s)`` of the fused attention kernels (``log2s``: the
    float64 log2 of the quantizer's scale, `attention_consts`): rows r0 .. r0 + rows − 1
    of float32 logits ``L`` (``n`` tokens, padded to whole `VECTOR`s) → int32 codes (−1 past ``n``) of the first
    ``n_codes`` columns (default: every padded one), the fused softmax of this module (same sums in the same order,
    so the same codes bit for bit), the rows' reductions interleaved (each is a chain of dependent adds; several
    keep the core busy).  ``part`` float32 [rows, VECTOR] and ``row`` float32 [rows, 3] (max, sum, code bias) are
    scratch; ``m``: 2 for log√2, 1 for log2.

    The last vector of a row is read in `HALF` lanes when the tokens past the whole vectors fit in them (Swin's
    49 of 64): the lanes left out would take a max with the lowest float and add 0 to a sum, which changes neither."""
    n_r, lowest, slope = -(-n // VECTOR) * VECTOR, tvm.tirx.min_value("float32"), softmax_slope(m)
    full, tail = n // VECTOR, -(-(n % VECTOR) // HALF) * HALF  # whole vectors, lanes of the last one read
    n_codes = n_r if n_codes is None else n_codes
    if n_codes % HALF or n_codes > n_r:
        raise ValueError(f"codes of {n_codes} columns: not whole half vectors of the {n_r} padded ones")

    @T.macro
    def reduce_max(L, part, r0, c, lanes):
        for i in T.unroll(rows):
            for ln in T.vectorized(lanes):
                part[i, ln] = T.max(part[i, ln], T.Select(c * VECTOR + ln < n, L[r0 + i, c * VECTOR + ln], lowest))

    @T.macro
    def reduce_sum(L, part, row, r0, c, lanes):
        for i in T.unroll(rows):
            for ln in T.vectorized(lanes):
                part[i, ln] = part[i, ln] + T.Select(
                    c * VECTOR + ln < n, epilogue.fast_exp_nonpositive(L[r0 + i, c * VECTOR + ln] - row[i, 0]),
                    T.float32(0))

    @T.macro
    def row_codes(L, codes, row, r0, i, n0, lanes):
        for ln in T.vectorized(lanes):
            codes[i, n0 + ln] = T.Select(n0 + ln < n, softmax_code(row[i, 0], L[r0 + i, n0 + ln], row[i, 2], slope, top),
                                         -1)

    @T.macro
    def softmax_codes(L, codes, part, row, r0, log2s):
        for i, ln in T.grid(rows, VECTOR):
            part[i, ln] = lowest
        for c in range(full):
            reduce_max(L, part, r0, c, VECTOR)
        if tail > 0:
            reduce_max(L, part, r0, full, tail)
        for i in T.unroll(rows):
            row[i, 0] = lowest
        for ln in range(VECTOR):
            for i in T.unroll(rows):
                row[i, 0] = T.max(row[i, 0], part[i, ln])
        for i, ln in T.grid(rows, VECTOR):
            part[i, ln] = T.float32(0)
        for c in range(full):
            reduce_sum(L, part, row, r0, c, VECTOR)
        if tail > 0:
            reduce_sum(L, part, row, r0, full, tail)
        for i in T.unroll(rows):
            row[i, 1] = T.float32(0)
        for ln in range(VECTOR):
            for i in T.unroll(rows):
                row[i, 1] = row[i, 1] + part[i, ln]
        for i in T.unroll(rows):
            row[i, 2] = _code_bias(row[i, 1], m, log2s)
        for i in T.unroll(rows):
            for c in range(n_codes // VECTOR):
                row_codes(L, codes, row, r0, i, c * VECTOR, VECTOR)
            if n_codes % VECTOR != 0:
                row_codes(L, codes, row, r0, i, n_codes // VECTOR * VECTOR, HALF)

    return softmax_codes


def plane_weight(c, plane, sqrt2: bool, f: int, groups: int):
    """int16 weight of log code ``c`` (−1: none) in weight plane ``plane``: `reference.ops.attn_weights` (W in int32:
    at most 2^(2F + 1) ≤ 2^29, and the odd codes' Q30 sum below 2^31)."""
    one, s = tvm.tirx.const(1, "int32"), (c + 1) >> 1 if sqrt2 else c
    e = 2 * f + 1 - tvm.tirx.max(tvm.tirx.min(s, 2 * f + 1), 0)  # ≤ 29: sqrt2_weight's shifts stay ≥ 0
    w = tvm.tirx.Select((c & 1) == 1, sqrt2_weight(e), one << e) if sqrt2 else one << e
    hi, lo = w >> (f + 1), w & ((1 << (f + 1)) - 1)
    part = (hi if plane == 0 else lo) if isinstance(plane, int) else tvm.tirx.Select(plane == 0, hi, lo)
    return tvm.tirx.Select(tvm.tirx.all(c >= 0, s <= 2 * f + 1), part, 0).astype("int16")


def log_weights_spec(shape, bits: int, sqrt2: bool, f: int, groups: int, *, softmax: bool = False,
                     scale: float | None = None) -> dict:
    """The kernel spec: everything that determines the compute (`log_weights_func`); ``lanes`` (`VECTOR` on
    every target, so the softmax sums add in the same order on x86 and aarch64 builds) pads the fused
    softmax's reductions to whole vectors.  `repq_tvm.tuning.spaces` keys on it.

    From p (``softmax=False``) the quantizer's ``scale`` is in the spec: it sets the integer thresholds the codes
    compare against (`code_thresholds`).  With the softmax fused the kernel reads log2(s) at run time (its
    ``log2s`` operand) and the spec has no scale: one kernel serves every block's quantizer (`log2_scale_operand`)."""
    if softmax == (scale is not None):
        raise TypeError("log weights: the scale goes in the spec from p (softmax=False) only; with the softmax fused "
                        "it is the run-time operand log2s")
    spec = {"kind": "log_weights", "shape": [int(d) for d in shape], "bits": bits, "sqrt2": bool(sqrt2), "f": f,
            "groups": groups, "softmax": bool(softmax), "lanes": VECTOR}
    return spec if softmax else {**spec, "scale": float(np.float32(scale))}


def log2_scale_operand(scale: float) -> np.ndarray:
    """The fused-softmax kernel's ``log2s`` operand: float64 [1], log2 of the float32 scale (`attention_consts`)."""
    return np.array([log2_scale(scale)], np.float64)


def log_weights_func(spec: dict) -> tvm.tirx.PrimFunc:
    """The unscheduled PrimFunc of a spec, ``main(x, w)`` from p, ``main(x, log2s, w)`` with the softmax fused (log2s
    float64 [1]), carrying the spec as its ``repq.kernel`` attribute."""
    bt, rows, n = spec["shape"]
    sqrt2, f, groups, lanes = spec["sqrt2"], spec["f"], spec["groups"], spec["lanes"]
    m = 2 if sqrt2 else 1
    top, planes, n_p = 2 ** spec["bits"] - 1, groups, padded_tokens(n)
    x = te.placeholder((bt, rows, n), "float32", name="x")
    if spec["softmax"]:
        n_r = -(-n // lanes) * lanes
        k1, k2 = te.reduce_axis((0, n_r), name="k1"), te.reduce_axis((0, n_r), name="k2")
        lowest = tvm.tirx.min_value("float32")
        # the row padded to whole vectors, read once: if_then_else (not Select, whose both sides are evaluated) so
        # the padded lanes load nothing past the row; LLVM had read up to 15 floats past the logits' last row
        xr = te.compute((bt, rows, n_r), lambda b, r, k: tvm.tirx.if_then_else(k < n, x[b, r, k], lowest),
                        name="xrow")
        mx = te.compute((bt, rows), lambda b, r: te.max(xr[b, r, k1], axis=k1), name="max")
        total = te.compute((bt, rows), lambda b, r: te.sum(tvm.tirx.Select(
            k2 < n, epilogue.fast_exp_nonpositive(xr[b, r, k2] - mx[b, r]), tvm.tirx.const(0, "float32")), axis=k2),
            name="sum")
        log2s = te.placeholder((1,), "float64", name="log2s")
        bias = te.compute((bt, rows), lambda b, r: _code_bias(total[b, r], m, log2s[0]), name="bias")
        slope = softmax_slope(m)

        def code(b, r, t):
            return softmax_code(mx[b, r], xr[b, r, t], bias[b, r], slope, top)

        codes = te.compute((bt, rows, n_p), lambda b, r, t: tvm.tirx.Select(t < n, code(b, r, t), -1), name="codes")
    else:
        offset, thresholds = code_thresholds(spec["scale"], sqrt2)
        codes = te.compute((bt, rows, n_p), lambda b, r, t: tvm.tirx.Select(
            t < n, _code(tvm.tirx.if_then_else(t < n, x[b, r, t], tvm.tirx.const(0, "float32")), m, offset, thresholds,
                         top), -1), name="codes")

    def weight(b, plane, r, t):
        return plane_weight(codes[b, r, t], plane, sqrt2, f, groups)

    w = te.compute((bt, planes, rows, n_p), weight, name="w")
    params = [x, log2s, w] if spec["softmax"] else [x, w]
    return te.create_prim_func(params).with_attr("repq.kernel", json.dumps(spec, sort_keys=True))


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
    _vectorize(sch, t, vector)
    cb = sch.get_sblock("codes")
    sch.compute_at(cb, anchor, preserve_unit_loops=True)
    if spec["softmax"]:  # per row, in order: max, sum (of exp, inlined), the log-domain bias of the codes
        # max and sum as `lanes` partial results (rfactor), vectorized: a serial float reduction waits on
        # each add's latency
        partial = {}
        for name in ("max", "sum"):
            red = sch.get_loops(sch.get_sblock(name))[-1]
            _, lane = sch.split(red, [None, lanes])
            partial[name] = sch.rfactor(lane, 2)
        for blk_s in (sch.get_sblock("bias"), sch.get_sblock("sum"), partial["sum"], sch.get_sblock("max"),
                      partial["max"], sch.get_sblock("xrow")):  # consumers first
            sch.compute_at(blk_s, anchor, preserve_unit_loops=True)
        _vectorize(sch, sch.get_loops(sch.get_sblock("xrow"))[-1], lanes)
        for blk_s in (partial["max"], partial["sum"]):
            loops = [lp for lp in sch.get_loops(blk_s)[depth:] if int(sch.get(lp).extent) > 1]
            if len(loops) == 2:
                sch.reorder(loops[1], loops[0])
            sch.vectorize(loops[0])
    _vectorize(sch, sch.get_loops(cb)[-1], vector)
    return sch


def _vectorize(sch: Schedule, loop, vector) -> None:
    """``loop`` in vectors of ``vector`` lanes; a ragged last vector in a loop of its own (loop partition):
    a vector loop guarded by a per-lane condition is scalarized whole (198 tokens in vectors of 16: the kernel ran
    3.5x slower than at 192 or 208)."""
    outer, inner = sch.split(loop, [None, vector])
    sch.annotate(outer, "pragma_loop_partition_hint", 1)
    sch.vectorize(inner)


def default_schedule(spec: dict) -> Schedule:
    """The hand schedule: one row per parallel task, vectors of `VECTOR` lanes (or the target's width)."""
    return apply_schedule(Schedule(log_weights_func(spec)), spec)


def log_weights_primfunc(shape, bits: int, sqrt2: bool, f: int, groups: int, target, *, softmax: bool = False,
                         scale: float | None = None):
    """Scheduled PrimFunc (see the module docstring and `log_weights_spec`: ``scale`` from p only) and a unique name
    for it.  The kernel is the same for every ``target`` (LLVM splits its 16-lane vectors to the target's
    registers)."""
    spec = log_weights_spec(shape, bits, sqrt2, f, groups, softmax=softmax, scale=scale)
    bt, rows, n = shape
    kind = ("softmax_" if softmax else "") + ("sqrt2" if sqrt2 else "log2")
    name = f"repq_log_weights_{kind}_{bt}x{rows}x{n}_b{bits}_g{groups}_f{f}"
    # opaque (8): FuseOps must not pull the reshape of p into this hand-scheduled kernel
    return scheduled_kernel(default_schedule(spec), name).with_attr("op_pattern", 8), name
