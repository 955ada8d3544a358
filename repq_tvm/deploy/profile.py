"""Latency of an artifact: whole-model statistics over warm runs and a per-kernel breakdown that adds up.

TVM 0.27's Relax VM has no profiler.  Every kernel call (each PrimFunc the VM calls) is timed two ways:

- **in the model**: the VM's instrument hook reads the clock right before and after each call, nothing
  else (`in_model_times`).  These per-call times add up to the end-to-end time: they include what the
  model's context costs a kernel (weights coming from L3 / memory, activations written by the other
  core).  `ms_per_run`, `share` and `gmacs` are these.
- **standalone**: one instrumented run records every call with copies of its arguments (`capture_calls`);
  then each call is timed on its own from the loaded library with TVM's ``time_evaluator`` on those real
  arguments, back to back with warm caches (`standalone_*`).  That is the kernel's own speed, what a
  roofline compares; the gap to the in-model time is the cost of its surroundings.

`profile` spreads the whole-model runs, the instrumented runs and the standalone timings over the same
rounds, so all three sample the same moments of a shared machine, and keeps medians.

Integer kernels (`repq_qdense`, `repq_qbmm`, `repq_attn_v`) also get their multiply-accumulates from
their argument shapes (`kernel_macs`), the rate they reach, and that rate as a share of this CPU's peak
measured in the same process on the same TVM thread pool (`peak`), in every round, best round kept
(`best_peak`), for the instruction family they use
(`kernel_family`): the kernel's own (its name carries the variant: ``vnni`` -> vpdpbusd, ``avx2_u8s8`` ->
vpmaddubsw + vpmaddwd, ``avx2_i16`` -> vpmaddwd, ``vnni_i16`` -> vpdpwssd), and the int8 family of the artifact's target (manifest
``int8_dot``: vnni or avx2).  vpdpbusd's peak is measured too wherever the CPU has it: `roofline_summary` puts the
whole run's integer throughput against it (and every measured family), and the linears against their own.

The floor (`kernel_work`, ``bound_ms_per_run``): the time each integer kernel's dot-product instructions would take
at their families' measured peaks, counting what they execute rather than the useful MACs: the log√2 attention's
attn @ V runs one int16 dot product per weight plane (``_g<planes>`` in its name) on vpdpwssd / vpmaddwd, at half
the MACs per instruction of vpdpbusd.  `roofline_summary` adds the floors up next to the other kernels' time: what
no schedule of the same integer program on this CPU can go below (the float tails fused into the integer
kernels, GELU's and the softmax's, come on top of it).
"""

from __future__ import annotations

import functools
import re
import time
from collections import defaultdict

import numpy as np

from . import peak as peak_mod
from .runtime import Runner

# VM bookkeeping calls that are not kernels
_BUILTIN_PREFIXES = ("vm.builtin.", "relax.")
INTEGER_PREFIXES = ("repq_qdense", "repq_qbmm", "repq_attn_v", "repq_attention")
# kernel name prefix -> instruction family of the variant named in it (others: the target's int8 family)
_VARIANT_FAMILY = (("repq_qdense_amx_", "amx"), ("repq_qdense_vnni_", "vnni"), ("repq_qdense_avx2_u8s8_", "avx2_u8s8"),
                   ("repq_qdense_avx2_i16_", "avx2_i16"), ("repq_qbmm_vnni_", "vnni"),
                   ("repq_qbmm_avx2_i16_", "avx2_i16"), ("repq_attn_v_avx2_i16_", "avx2_i16"),
                   ("repq_attn_v_vnni_i16_", "vnni_i16"), ("repq_attn_v_amx_", "amx"),
                   ("repq_attention_amx_", "amx"), ("repq_attention_vnni_", "vnni"),
                   ("repq_attention_avx2_i16_", "avx2_i16"))


def _input(runner: Runner) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(runner.input_shape).astype(np.float32)


def _stats(times_ms: list[float], runner: Runner) -> dict:
    t = np.array(times_ms)
    return {"median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)), "min_ms": float(t.min()),
            "runs": len(t), "batch": runner.input_shape[0], "threads": peak_mod.num_threads()}


def _timed_runs(runner: Runner, x: np.ndarray, n: int, times_ms: list[float]) -> None:
    for _ in range(n):
        t0 = time.perf_counter()
        runner(x)
        times_ms.append((time.perf_counter() - t0) * 1e3)


def latency(runner: Runner, repeat: int = 50, warmup: int = 5) -> dict:
    """Median / p90 / min ms of ``repeat`` warm whole-model runs (and the batch and TVM thread count)."""
    x = _input(runner)
    for _ in range(warmup):
        runner(x)
    times: list[float] = []
    _timed_runs(runner, x, repeat, times)
    return _stats(times, runner)


# --- the kernels of one run --------------------------------------------------------------------
def capture_calls(runner: Runner) -> list[tuple[str, list]]:
    """Every kernel call of one run, in order: (symbol, copies of its arguments, outputs included).

    The copies are taken before the call (the VM reuses storage, so a later look would see other data).
    """
    import tvm

    x = _input(runner)
    calls = []

    def instrument(func, symbol, before, ret, *args):
        if before and not symbol.startswith(_BUILTIN_PREFIXES):
            calls.append((symbol, [tvm.runtime.tensor(a.numpy()) if isinstance(a, tvm.runtime.Tensor) else a
                                   for a in args]))
        return 0

    runner(x)
    runner.vm.set_instrument(instrument)
    try:
        runner(x)
    finally:
        runner.vm.set_instrument(None)
    return calls


def _library_of(module, symbol: str):
    """The compiled library (a module the VM imports, directly or not) that implements `symbol`.

    The VM module itself is not asked: its lookup of a non-VM function raises instead of answering.
    """
    todo = list(module.imports)
    while todo:
        m = todo.pop(0)
        try:
            if m.implements_function(symbol):
                return m
        except Exception:  # noqa: BLE001  (a module kind that cannot answer)
            pass
        todo.extend(m.imports)
    raise KeyError(f"no library of the artifact implements {symbol}")


def call_timer(module, symbol: str, min_repeat_ms: int = 1):
    """``timer(*args) -> seconds per call`` of `symbol`: TVM's ``time_evaluator`` (one warm-up call, then as
    many calls as fill ``min_repeat_ms``, averaged)."""
    import tvm

    evaluator = _library_of(module, symbol).time_evaluator(symbol, tvm.cpu(), number=1, repeat=1,
                                                           min_repeat_ms=int(min_repeat_ms))
    return lambda *args: float(evaluator(*args).results[0])


def _shape(a) -> tuple[int, ...]:
    return tuple(int(d) for d in a.shape)


def kernel_macs(symbol: str, shapes: list[tuple[int, ...]]) -> int | None:
    """Multiply-accumulates of one call of an integer kernel, from its argument shapes (None: not one).

    qdense ``(A [M, K], W, ..., out [M, N])``: M*N*K (K as the kernel runs it, padded to its k-pack; a fused
    qkv projection has three outputs ``[B, H, T, D]``: N = 3·H·D);
    qbmm ``(A [Bt, M, D], B, zp, scale, out [Bt, M, N])``: Bt*M*N*D; attention ``(W [Bt, planes, M, Np],
    V [Bt, N, D], zp, scale, out [Bt, M, D])``: the useful Bt*M*N*D (the kernel runs one dot product per plane);
    the fused attention ``(q [Bt, M, D], k [Bt, N, D], ..., out [Bt, M, D])``: both products, 2*Bt*M*N*D; its form
    on the qkv output ``(y [B·T, 3·H·D], ..., out [Bt, M, D])``: N = M tokens.
    """
    if symbol.startswith("repq_qdense"):
        (m, k), out = shapes[0], shapes[-1]
        if len(out) == 4:  # the q/k/v codes of a fused qkv projection: three [B, H, T, D] outputs
            b, h, t, d = out
            m2, n = b * t, 3 * h * d
        else:
            m2, n = out
        return m * n * k if m == m2 else None
    if symbol.startswith("repq_qbmm"):
        (bt, m, d), (_, _, n) = shapes[0], shapes[-1]
        return bt * m * n * d
    if symbol.startswith("repq_attn_v"):
        (bt, n, _), (_, m, d) = shapes[1], shapes[-1]
        return bt * m * n * d
    if symbol.startswith("repq_attention"):
        (bt, m, d) = shapes[-1]
        n = shapes[1][1] if len(shapes[0]) == 3 else m  # q, k, ... or y, ... (self-attention of the qkv output)
        return 2 * bt * m * n * d
    return None


# attention kernel name prefix -> the family of its attn @ V weight planes' int16 dot products
_PLANE_FAMILY = (("repq_attn_v_vnni_i16_", "vnni_i16"), ("repq_attn_v_avx2_i16_", "avx2_i16"),
                 ("repq_attention_vnni_", "vnni_i16"), ("repq_attention_avx2_i16_", "avx2_i16"))


def kernel_work(symbol: str, shapes: list[tuple[int, ...]], int8_dot: str | None) -> dict[str, int] | None:
    """MACs one call's dot-product instructions execute, per instruction family (`kernel_family`): the kernel's
    floor is their sum of MACs / peak.  A linear or q @ kᵀ: its `kernel_macs`; attn @ V: those times its weight
    planes (``_g<planes>``), on its plane family (vpdpwssd / vpmaddwd); the fused vector attention: both.  None
    for a non-integer kernel and where the count is not this simple (the AMX attention's u8 weight bands, ARM)."""
    macs = kernel_macs(symbol, shapes)
    family = kernel_family(symbol, int8_dot)
    if macs is None or family is None:
        return None
    if not symbol.startswith(("repq_attn_v", "repq_attention")):
        return {family: macs}
    planes = re.search(r"_g(\d+)_", symbol)
    plane_family = next((f for prefix, f in _PLANE_FAMILY if symbol.startswith(prefix)), None)
    if planes is None or plane_family is None:
        return None
    if symbol.startswith("repq_attn_v"):
        return {plane_family: macs * int(planes.group(1))}
    work = defaultdict(int)  # the fused attention: q @ kᵀ on its variant's family, then attn @ V's planes
    work[family] += macs // 2
    work[plane_family] += macs // 2 * int(planes.group(1))
    return dict(work)


def kernel_family(symbol: str, int8_dot: str | None) -> str | None:
    """Instruction family whose peak an integer kernel is measured against: its variant's, else the
    target's int8 family (None for a non-integer kernel or a target without a measured family)."""
    if not symbol.startswith(INTEGER_PREFIXES):
        return None
    for prefix, family in _VARIANT_FAMILY:
        if symbol.startswith(prefix):
            return family
    return peak_mod.TARGET_FAMILY.get(int8_dot or "")


def kernel_group(symbol: str) -> str:
    """The kind of a kernel: TVM names each fused copy apart (``fused_softmax_log_codes7``, one per block)
    so their counters go.  Integer kernels are shared per shape; the fused tails carry a number after their tag
    (fc1's GELU epilogue ``…_gelu0``, AMX qkv ``…_qkv0``), and artifacts built before their quantizers became
    operands have one copy per block (``…_gelu7``, the fused attentions ``…_codes3`` / ``…_qkv3``): that number
    goes, the shapes and bit widths (``…_a8w8``) stay."""
    if symbol.startswith(INTEGER_PREFIXES):
        return re.sub(r"(gelu|_res|_qkv|_codes)\d+$", r"\1", symbol)
    return re.sub(r"(?<=[a-z])\d+(?=_|$)", "", symbol)


def in_model_times(runner: Runner, x: np.ndarray, symbols: list[str]) -> list[float]:
    """Seconds of every kernel call inside one model run, in call order.

    The VM's instrument hook only reads the clock before and after each call (no arguments kept, nothing
    else done), so the time it adds falls between kernels, not inside them: on Zen 4 a no-op builtin's
    window measures ~0.6 us, and the windows of the ViT fixture's 111 kernel calls add up to the
    uninstrumented run's time within a few percent.
    """
    clock, times, start = time.perf_counter, [], [0.0]

    def instrument(func, symbol, before, ret, *args):
        if before:
            start[0] = clock()
        elif not symbol.startswith(_BUILTIN_PREFIXES):
            times.append(clock() - start[0])
        return 0

    runner.vm.set_instrument(instrument)
    try:
        runner(x)
    finally:
        runner.vm.set_instrument(None)
    if len(times) != len(symbols):
        raise RuntimeError(f"the model made {len(times)} kernel calls in one run and {len(symbols)} in another")
    return times


def floor_ms(work: dict[str, int] | None, measured: dict) -> float | None:
    """ms of a call's `kernel_work` at the measured all-cores peaks (None: no work count, or a family not measured)."""
    if work is None:
        return None
    peaks = {f: measured.get(f, {}).get("gmacs_all") for f in work}
    if not all(peaks.values()):
        return None
    return sum(n / (peaks[f] * 1e6) for f, n in work.items())


def _rows(ms: dict, alone: dict, count: dict, macs: dict, label: str, family_of, measured: dict,
          target_family, bound: dict | None = None) -> list[dict]:
    """One row per key of `ms`, slowest first (see `kernel_breakdown`)."""
    total = sum(ms.values())
    rows = []
    for key in sorted(ms, key=lambda k: -ms[k]):
        row = {label: key, "ms_per_run": ms[key], "standalone_ms_per_run": alone[key], "calls_per_run": count[key],
               "ms_per_call": ms[key] / count[key], "share": ms[key] / total if total else 0.0}
        if key in macs:
            row["macs_per_run"] = macs[key]
            row["gmacs"] = macs[key] / (ms[key] * 1e6) if ms[key] else 0.0
            row["standalone_gmacs"] = macs[key] / (alone[key] * 1e6) if alone[key] else 0.0
            fam = family_of(key)
            own, target = measured.get(fam, {}).get("gmacs_all"), measured.get(target_family, {}).get("gmacs_all")
            row["peak_family"], row["peak_gmacs"] = fam, own
            row["pct_of_peak"] = 100 * row["gmacs"] / own if own else None
            row["standalone_pct_of_peak"] = 100 * row["standalone_gmacs"] / own if own else None
            row["pct_of_target_peak"] = 100 * row["gmacs"] / target if target else None
            row["bound_ms_per_run"] = (bound or {}).get(key)
        rows.append(row)
    return rows


def best_peak(a: dict | None, b: dict) -> dict:
    """Two `peak.measure_family` results merged: the higher rate of each key.  Why: on a VM whose two vCPUs
    share a physical core part of the time (seen on a Zen 3 guest: the 2-thread int16 peak measured 72 to 156
    GMAC/s from one minute to the next), one measurement can sit in a slow moment and put kernels above 100%."""
    if a is None or "skipped" in a:
        return b
    return {**a, **{k: max(a[k], b[k]) for k in a if k.startswith(("gmacs_", "gops_")) and k in b}}


def kernel_breakdown(runner: Runner, repeat: int = 5, min_repeat_ms: int = 1, peaks: bool = True,
                     between=None, in_model_runs: int = 2) -> dict:
    """Every kernel call of a run, timed in the model and standalone (see the module doc), summed per kernel.

    ``repeat`` rounds; each runs ``between()`` first (`profile` times whole-model runs there, so all three
    sample the same moments of a shared machine), then ``in_model_runs`` instrumented runs, then every call
    standalone once; each call keeps its median of each.

    Returns ``{"kernels": rows, "groups": rows, "kernels_sum_ms", "standalone_sum_ms", "kernel_calls", "threads",
    "method", "target_family", "peak"}``.  A kernel row, slowest in the model first, is ``{"kernel",
    "ms_per_run", "standalone_ms_per_run", "calls_per_run", "ms_per_call", "share"}`` (in-model ms; share of
    the in-model sum) plus, for integer kernels, ``macs_per_run``, ``gmacs`` / ``standalone_gmacs``,
    ``peak_family``, ``peak_gmacs``, ``pct_of_peak`` / ``standalone_pct_of_peak`` (against ``peak_family``) and
    ``pct_of_target_peak`` (in the model, against the artifact's int8 family) and ``bound_ms_per_run`` (its calls'
    `floor_ms`); None where no peak was measured (``peaks=False``, or a CPU without the family) or, for the
    floor, where a kernel has no `kernel_work`.  "groups" has the same rows keyed by ``group``
    (`kernel_group`: the fused copies of one kind summed).
    """
    calls = capture_calls(runner)
    symbols = [symbol for symbol, _ in calls]
    timers = {symbol: call_timer(runner.vm.module, symbol, min_repeat_ms) for symbol in symbols}
    x = _input(runner)
    alone: list[list[float]] = [[] for _ in calls]
    inside: list[list[float]] = [[] for _ in calls]
    int8_dot = runner.manifest.get("target", {}).get("int8_dot")
    target_family = peak_mod.TARGET_FAMILY.get(int8_dot or "")
    threads = peak_mod.num_threads()
    # vnni always (skipped on a CPU without it): the whole-model bar of `roofline_summary` is stated against it
    families = {kernel_family(s, int8_dot) for s in symbols} | {target_family, "vnni"}
    families |= {f for s in symbols for prefix, f in _PLANE_FAMILY if s.startswith(prefix)}
    wanted = sorted(f for f in families if f) if peaks else []
    measured: dict[str, dict] = {}
    for _ in range(repeat):  # rounds: a burst of other work on the machine hits one round, not a kernel
        if between is not None:
            between()
        for _ in range(in_model_runs):
            for times, t in zip(inside, in_model_times(runner, x, symbols)):
                times.append(t)
        for (symbol, args), times in zip(calls, alone):
            times.append(timers[symbol](*args))
        for f in wanted:  # the peaks too, every round: the best round is the closest to the hardware's ceiling
            measured[f] = best_peak(measured.get(f), peak_mod.measure_family(f, threads=threads))
    ms, ms_alone, count, macs = defaultdict(float), defaultdict(float), defaultdict(int), defaultdict(int)
    floors = defaultdict(list)  # per call of an integer kernel: `floor_ms` (None where it has none)
    for (symbol, args), t_in, t_alone in zip(calls, inside, alone):
        ms[symbol] += float(np.median(t_in)) * 1e3
        ms_alone[symbol] += float(np.median(t_alone)) * 1e3
        count[symbol] += 1
        shapes = [_shape(a) for a in args if hasattr(a, "shape")]
        n = kernel_macs(symbol, shapes)
        if n is not None:
            macs[symbol] += n
            floors[symbol].append(floor_ms(kernel_work(symbol, shapes, int8_dot), measured))
    groups = (defaultdict(float), defaultdict(float), defaultdict(int), defaultdict(int), defaultdict(list))
    for symbol in ms:
        g = kernel_group(symbol)
        for total, per_kernel in zip(groups, (ms, ms_alone, count, macs, floors)):
            if symbol in per_kernel:
                total[g] += per_kernel[symbol]
    bound = lambda per_key: {k: None if None in f else sum(f) for k, f in per_key.items()}  # noqa: E731
    family_of = functools.partial(kernel_family, int8_dot=int8_dot)
    return {"kernels": _rows(ms, ms_alone, count, macs, "kernel", family_of, measured, target_family,
                             bound(floors)),
            "groups": _rows(*groups[:4], "group", family_of, measured, target_family, bound(groups[4])),
            "kernels_sum_ms": sum(ms.values()), "standalone_sum_ms": sum(ms_alone.values()),
            "kernel_calls": len(calls), "threads": threads,
            "method": f"in the model: clock read before/after each kernel call by the VM's instrument hook, median "
                      f"of {repeat * in_model_runs} runs; standalone: each call on its recorded arguments with "
                      f"time_evaluator (>= {min_repeat_ms} ms of calls), median of {repeat} rounds",
            "target_family": target_family,
            "peak": {"cpu": peak_mod.cpu_name(), "threads": threads, "families": measured}}


def profile(runner: Runner, repeat: int = 50, kernel_repeat: int = 5, peaks: bool = True, warmup: int = 5) -> dict:
    """Whole-model latency (``repeat`` runs), the kernel breakdown (``kernel_repeat`` rounds, the whole-model
    runs spread between them), and the kernels' sum over the end-to-end median (``kernels_over_e2e``)."""
    x = _input(runner)
    for _ in range(warmup):
        runner(x)
    times: list[float] = []
    rounds = max(1, kernel_repeat)
    per_round = iter([repeat // rounds + (i < repeat % rounds) for i in range(rounds)])
    breakdown = kernel_breakdown(runner, repeat=rounds, peaks=peaks,
                                 between=lambda: _timed_runs(runner, x, next(per_round), times))
    result = {**_stats(times, runner), **breakdown}
    result["kernels_over_e2e"] = result["kernels_sum_ms"] / result["median_ms"]
    result["standalone_over_e2e"] = result["standalone_sum_ms"] / result["median_ms"]
    result["summary"] = roofline_summary(result)
    return result


def _labelled_rows(result: dict) -> tuple[str, list[dict]]:
    """("group", the fused copies of one kind summed) where the breakdown has them, else ("kernel", every kernel)."""
    return ("group", result["groups"]) if "groups" in result else ("kernel", result["kernels"])


def roofline_summary(result: dict) -> dict:
    """The whole run against the measured peaks: what the speed issue's bars read (whole-model integer
    throughput as a share of the vpdpbusd peak, the GEMMs' share of theirs), in one place.

    ``integer_gmac_per_run``: every integer kernel's useful MACs (`kernel_macs`); ``gmacs``: those over the
    end-to-end median; ``pct_of_peak``: that rate over the all-cores peak of vpdpbusd, of the target's int8 family
    and of the linears' families (not of the int16 families measured for attn @ V's floor alone: a whole run
    against the rate of the attention's planes says nothing).  ``linears``
    (qdense kernels): their ``efficiency`` / ``standalone_efficiency`` = the time their MACs take at their own
    family's peak over the time they took (in the model / alone), and the least efficient one of those doing at
    least 1% of the linears' MACs (``lowest``, ``lowest_standalone``: group names; a classifier head's matrix-vector
    product is no GEMM to hold to the peak).  ``floor`` (where every integer kernel has one): ``integer_ms``, their
    ``bound_ms_per_run`` summed, against ``integer_model_ms``, the time they took in the model, and ``other_ms``,
    the other kernels' time in the model; ``ms`` = integer_ms + other_ms.  Empty where no peak was measured.
    """
    fams = {n: f["gmacs_all"] for n, f in result.get("peak", {}).get("families", {}).items() if "gmacs_all" in f}
    label, every_row = _labelled_rows(result)
    rows = [r for r in every_row if "macs_per_run" in r]
    if not fams or not rows:
        return {}
    macs = sum(r["macs_per_run"] for r in rows)
    gmacs = macs / (result["median_ms"] * 1e6)
    shown = {"vnni", result.get("target_family")} | {r.get("peak_family") for r in rows
                                                     if r[label].startswith("repq_qdense")}
    summary = {"integer_gmac_per_run": macs / 1e9, "gmacs": gmacs,
               "pct_of_peak": {n: 100 * gmacs / peak for n, peak in fams.items() if n in shown}}
    linears = [r for r in rows if r[label].startswith("repq_qdense") and r.get("peak_gmacs")]
    if linears:
        at_peak = sum(r["macs_per_run"] / (r["peak_gmacs"] * 1e6) for r in linears)  # ms at their peaks
        linear_macs = sum(r["macs_per_run"] for r in linears)
        gemms = [r for r in linears if r["macs_per_run"] >= 0.01 * linear_macs]
        summary["linears"] = {
            "efficiency": 100 * at_peak / sum(r["ms_per_run"] for r in linears),
            "standalone_efficiency": 100 * at_peak / sum(r["standalone_ms_per_run"] for r in linears),
            "lowest": min(gemms, key=lambda r: r["pct_of_peak"])[label],
            "lowest_pct": min(r["pct_of_peak"] for r in gemms),
            "lowest_standalone": min(gemms, key=lambda r: r["standalone_pct_of_peak"])[label],
            "lowest_standalone_pct": min(r["standalone_pct_of_peak"] for r in gemms)}
    bounds = [r.get("bound_ms_per_run") for r in rows]
    if None not in bounds:
        other = sum(r["ms_per_run"] for r in every_row if "macs_per_run" not in r)
        summary["floor"] = {"integer_ms": sum(bounds), "integer_model_ms": sum(r["ms_per_run"] for r in rows),
                            "other_ms": other, "ms": sum(bounds) + other}
    return summary


def format_report(result: dict, top: int = 15) -> list[str]:
    """The text `repq-tvm profile` prints: latency, the measured peaks, the top kernel groups, the sums."""
    threads = result["threads"]
    plural = "s" if threads != 1 else ""
    lines = [f"latency over {result['runs']} warm runs (batch {result['batch']}, {threads} TVM thread{plural}): "
             f"median {result['median_ms']:.2f} ms, p90 {result['p90_ms']:.2f} ms, min {result['min_ms']:.2f} ms"]
    fams = result.get("peak", {}).get("families", {})
    if fams:
        peaks = ", ".join(f"{name} {f['gmacs_all']:.0f}" if "gmacs_all" in f else f"{name} skipped ({f['skipped']})"
                          for name, f in fams.items())
        lines.append(f"measured peak on {threads} thread{plural}, GMAC/s: {peaks}")
    label, rows = _labelled_rows(result)
    lines.append(f"{'in model':>9} {'alone':>7} {'calls':>5} {'share':>6}  {'GMAC/s model/alone':>18}  "
                 f"{'% of peak':>9} {'(family)':<12} {'floor':>6}  kernel (fused copies of one kind summed)")
    lines.append(f"{'ms/run':>9} {'ms/run':>7}{'ms/run':>68}")
    for row in rows[:top]:
        g = f"{row['gmacs']:8.1f} / {row['standalone_gmacs']:6.1f}" if "gmacs" in row else " " * 17
        if row.get("pct_of_peak") is not None:
            p = f"{row['pct_of_peak']:3.0f} / {row['standalone_pct_of_peak']:3.0f} {row['peak_family']:<12}"
        else:
            p = " " * 22
        floor = f"{row['bound_ms_per_run']:6.3f}" if row.get("bound_ms_per_run") is not None else " " * 6
        lines.append(f"{row['ms_per_run']:9.3f} {row['standalone_ms_per_run']:7.3f} {row['calls_per_run']:5d} "
                     f"{100 * row['share']:5.1f}%  {g:>18}  {p} {floor}  {row[label]}")
    rest = rows[top:]
    if rest:
        lines.append(f"{sum(r['ms_per_run'] for r in rest):9.3f} {sum(r['standalone_ms_per_run'] for r in rest):7.3f} "
                     f"{sum(r['calls_per_run'] for r in rest):5d} {100 * sum(r['share'] for r in rest):5.1f}%  "
                     f"... {len(rest)} more")
    lines.append(f"sum of the {result['kernel_calls']} kernel calls: in the model {result['kernels_sum_ms']:.2f} ms, "
                 f"standalone {result['standalone_sum_ms']:.2f} ms; end-to-end median {result['median_ms']:.2f} ms; "
                 f"ratios {result['kernels_over_e2e']:.2f} and {result['standalone_over_e2e']:.2f}")
    summary = result.get("summary")
    if summary:
        pcts = ", ".join(f"{p:.0f}% of {n}" for n, p in summary["pct_of_peak"].items())
        lines.append(f"integer work {summary['integer_gmac_per_run']:.2f} GMAC per run at the end-to-end median: "
                     f"{summary['gmacs']:.0f} GMAC/s = {pcts} (measured peaks)")
        lin = summary.get("linears")
        if lin:
            lines.append(f"linears at {lin['efficiency']:.0f}% of their family's peak in the model, "
                         f"{lin['standalone_efficiency']:.0f}% standalone; lowest {lin['lowest_pct']:.0f}% "
                         f"({lin['lowest']}) / {lin['lowest_standalone_pct']:.0f}% ({lin['lowest_standalone']})")
        floor = summary.get("floor")
        if floor:
            lines.append(f"floor: the integer kernels' dot products at the measured peaks {floor['integer_ms']:.2f} ms "
                         f"(in the model they took {floor['integer_model_ms']:.2f}: "
                         f"{100 * floor['integer_ms'] / floor['integer_model_ms']:.0f}%) + the other kernels "
                         f"{floor['other_ms']:.2f} = {floor['ms']:.2f} ms, against {result['median_ms']:.2f} end to "
                         f"end (attn @ V counted per weight plane; fused float tails not in the floor)")
    return lines


def short_name(name: str, width: int = 64) -> str:
    """``name`` in at most ``width`` characters: its start and its end around "…" (kernel names differ at both ends:
    the shape near the start, the fused tail last, e.g. ``…_t1_qkv_out_codes`` against ``…_t2_qkv_out_codes``, which
    a cut end would make one bar of the chart)."""
    if len(name) <= width:
        return name
    tail = (width - 1) * 2 // 5
    return name[:width - 1 - tail] + "…" + name[-tail:]


def plot_breakdown(result: dict, path: str, title: str, top: int = 20) -> None:
    """Bar chart of the `top` slowest kernel groups: ms per run in the model (bars), standalone (thin bars) and,
    for integer kernels, their floor (red ticks, `floor_ms`); integer kernels labelled with GMAC/s and % of their
    family's measured peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, rows = _labelled_rows(result)
    rows = rows[:top][::-1]
    fig, ax = plt.subplots(figsize=(12, 0.38 * len(rows) + 1.8))
    names = [f"{short_name(r[label])} x{r['calls_per_run']}" for r in rows]
    colors = ["tab:orange" if "gmacs" in r else "tab:blue" for r in rows]
    bars = ax.barh(names, [r["ms_per_run"] for r in rows], color=colors, label="in the model")
    ax.barh(names, [r["standalone_ms_per_run"] for r in rows], height=0.3, color="black", alpha=0.6,
            label="standalone (warm caches)")
    floors = [(n, r["bound_ms_per_run"]) for n, r in zip(names, rows) if r.get("bound_ms_per_run") is not None]
    if floors:
        ax.scatter([f for _, f in floors], [n for n, _ in floors], marker="|", s=250, color="tab:red", zorder=3,
                   label="floor: its dot products at the measured peak")
    for bar, r in zip(bars, rows):
        if "gmacs" in r:
            pct = ""
            if r.get("pct_of_peak") is not None:
                pct = f" = {r['pct_of_peak']:.0f}% / {r['standalone_pct_of_peak']:.0f}% of {r['peak_family']} peak"
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    f" {r['gmacs']:.0f} / {r['standalone_gmacs']:.0f} GMAC/s{pct}", va="center", fontsize=7)
    ax.set_xlabel("ms per inference (orange: integer kernels; label: in the model / standalone)")
    ax.legend(loc="lower right", fontsize=8)
    peaks = ", ".join(f"{n} {f['gmacs_all']:.0f}" for n, f in result.get("peak", {}).get("families", {}).items()
                      if "gmacs_all" in f)
    sub = (f"end-to-end median {result['median_ms']:.2f} ms; kernels in the model {result['kernels_sum_ms']:.2f} ms "
           f"({result['kernels_over_e2e']:.2f}x), standalone {result['standalone_sum_ms']:.2f} ms "
           f"({result['standalone_over_e2e']:.2f}x); {result['threads']} thread(s)")
    if peaks:
        sub += f"\nmeasured peak, GMAC/s: {peaks}"
    fig.suptitle(f"{title}\n{sub}", fontsize=9)  # over the whole figure: the long kernel names push the axes right
    ax.margins(x=0.6)  # room for the longest bar's label
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
