"""This CPU's multiply-accumulate peak per instruction family, measured with TVM-built micro-kernels.

Each family is one TIR kernel (`tvm.compile`, the same LLVM as the model) whose loop is a register tile
shaped like the project's integer kernels: ``rows x blocks`` independent accumulators (enough to hide
the instruction's latency), the weight vectors held in registers for the whole loop, one activation
word per row broadcast from L1 each step (a different one every step, as in `kernels/qdense`, so
nothing is loop-invariant and LLVM cannot hoist the multiplies).  Nothing else runs in the loop, so
the rate is the instruction's throughput bound with a realistic operand feed: the roofline's ceiling.

================  =========================================================  ===========  ================
family            one step of one accumulator (vector width)                 MACs / step  CPU flags
================  =========================================================  ===========  ================
``vnni``          vpdpbusd (zmm), u8 x s8 -> s32                             64           avx512_vnni
``avx2_u8s8``     4 x vpmaddubsw + 3 x vpaddw + vpmaddwd(1s) + vpaddd (ymm):  128          avx2
                  the depth-4 step of the AVX2 kernels at 4/6-bit codes
``avx2_u8s8_d1``  vpmaddubsw + vpmaddwd(1s) + vpaddd (ymm), depth 1          32           avx2
``avx2_i16``      vpmaddwd + vpaddd (ymm), s16 x s16 -> s32                  16           avx2
``vnni_i16``      vpdpwssd (zmm), s16 x s16 -> s32 (log√2 attention)         32           avx512f, avx512_vnni
``fp32_fma``      vfmadd231ps (zmm; ymm without AVX-512F), for reference     16 (8)       fma (+ avx512f)
``amx``           tdpbusd on 2 x 2 accumulator tiles (16 x 16 s32 each, k 64) 65,536      amx_tile, amx_int8
                  (the AMX qdense's inner step, operand tiles held)
================  =========================================================  ===========  ================

A family's kernel is checked to contain its instruction (`missing_instructions`) before it is timed.
The AMX family is its own kernel (`_amx_kernels`: the tile configuration and the permission request of
`kernels.qdense_amx`, the A and B tiles loaded once, then only `tdpbusd`s).

Every family is timed on 1 thread (a serial loop) and on TVM's thread pool (one task per pool thread:
`runtime.NumThreads`, sized by `threads.configure`: every available CPU unless ``TVM_NUM_THREADS`` says).
The rate reported is the best of the repeats: on a shared machine other work only ever slows a run
down, so the fastest run is the closest to the hardware's ceiling (the median is reported too).
Families this CPU cannot run are skipped with the missing feature named; on a non-x86 CPU all are.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import numpy as np

# which instruction family each int8_dot value of a target preset stands for
TARGET_FAMILY = {"amx": "amx", "vnni": "vnni", "avx2": "avx2_u8s8"}
_WORDS = 64  # distinct activation words per row cycled through L1 (step & 63)


@dataclass(frozen=True)
class Family:
    name: str
    instruction: str
    flags: tuple[tuple[str, str], ...]  # (/proc/cpuinfo flag, name in messages)
    target: dict  # TVM LLVM target config (without num-cores)
    lanes: int  # output lanes of one accumulator vector
    kpack: int  # products summed per lane per instruction
    depth: int  # instructions (tiles) per accumulation step
    rows: int
    blocks: int
    asm: tuple[tuple[str, ...], ...]  # each: words one line of the kernel's assembly must hold

    @property
    def macs_per_step(self) -> int:
        """MACs of one loop iteration (every accumulator once)."""
        return self.rows * self.blocks * self.lanes * self.kpack * self.depth


_X86 = "x86_64-linux-gnu"
_AVX2 = {"kind": "llvm", "mtriple": _X86, "mcpu": "haswell"}
_VNNI = {"kind": "llvm", "mtriple": _X86, "mcpu": "cascadelake"}
_AVX512 = {"kind": "llvm", "mtriple": _X86, "mcpu": "skylake-avx512"}
_FLAG_AVX2, _FLAG_FMA = ("avx2", "AVX2"), ("fma", "FMA")
_FLAG_AVX512F, _FLAG_VNNI = ("avx512f", "AVX-512F"), ("avx512_vnni", "AVX-512 VNNI")
_AMX = {"kind": "llvm", "mtriple": _X86, "mcpu": "sapphirerapids"}
_FLAGS_AMX = (("amx_tile", "AMX-TILE"), ("amx_int8", "AMX-INT8"))

FAMILIES = {
    f.name: f
    for f in (
        Family("vnni", "vpdpbusd zmm (u8 x s8 -> s32)", (_FLAG_AVX512F, _FLAG_VNNI), _VNNI, 16, 4, 1, 4, 3,
               (("vpdpbusd", "%zmm"),)),
        Family("avx2_u8s8", "4 x vpmaddubsw + vpmaddwd ymm (u8 x s8 -> s16 -> s32, depth 4)", (_FLAG_AVX2,),
               _AVX2, 8, 4, 4, 4, 1, (("vpmaddubsw", "%ymm"), ("vpmaddwd", "%ymm"))),
        Family("avx2_u8s8_d1", "vpmaddubsw + vpmaddwd ymm (u8 x s8 -> s16 -> s32, depth 1)", (_FLAG_AVX2,),
               _AVX2, 8, 4, 1, 4, 2, (("vpmaddubsw", "%ymm"), ("vpmaddwd", "%ymm"))),
        Family("avx2_i16", "vpmaddwd ymm (s16 x s16 -> s32)", (_FLAG_AVX2,), _AVX2, 8, 2, 1, 4, 2,
               (("vpmaddwd", "%ymm"),)),
        Family("vnni_i16", "vpdpwssd zmm (s16 x s16 -> s32)", (_FLAG_AVX512F, _FLAG_VNNI), _VNNI, 16, 2, 1, 4, 3,
               (("vpdpwssd", "%zmm"),)),
        Family("fp32_fma", "vfmadd231ps zmm (fp32, reference)", (_FLAG_FMA, _FLAG_AVX512F), _AVX512, 16, 1, 1, 4, 3,
               (("vfmadd", "ps", "%zmm"),)),
        # one step: 4 tdpbusd, each 16 x 16 outputs x 64 products (lanes = a tile's 256 int32 outputs)
        Family("amx", "tdpbusd tiles (u8 x s8 -> s32, 16 x 16 x 64 per instruction)", _FLAGS_AMX, _AMX, 256, 64, 1,
               2, 2, (("tdpbusd", "%tmm"),)),
        Family("fp32_fma_ymm", "vfmadd231ps ymm (fp32, reference)", (_FLAG_FMA, _FLAG_AVX2), _AVX2, 8, 1, 1, 6, 2,
               (("vfmadd", "ps", "%ymm"),)),
    )
}
DEFAULT_FAMILIES = ("amx", "vnni", "vnni_i16", "avx2_u8s8", "avx2_u8s8_d1", "avx2_i16", "fp32_fma")
_I16 = ("avx2_i16", "vnni_i16")  # int16 weights: two bytes per element


def _host_flags() -> frozenset[str]:
    from .. import targets

    return targets.host_flags()


def family_for(name: str, flags=None) -> Family:
    """The family `name`; ``fp32_fma`` is the zmm kernel with AVX-512F, else the ymm one."""
    flags = _host_flags() if flags is None else flags
    if name == "fp32_fma" and "avx512f" not in flags:
        name = "fp32_fma_ymm"
    if name not in FAMILIES:
        raise ValueError(f"unknown instruction family {name!r}: choose from {', '.join(DEFAULT_FAMILIES)}")
    return FAMILIES[name]


def skip_reason(family: Family, flags=None, machine: str | None = None) -> str | None:
    """Why this CPU cannot run ``family`` (None: it can), naming the missing feature."""
    from .. import targets

    machine = targets.arch_of(machine or platform.machine())
    if machine != "x86_64":
        return f"{family.instruction} is an x86_64 instruction; this CPU is {machine}"
    flags = _host_flags() if flags is None else frozenset(flags)
    missing = [f"{name} ({flag})" for flag, name in family.flags if flag not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    return None


def num_threads() -> int:
    """Threads of TVM's pool in this process (`threads.configure` sizes it)."""
    from .threads import pool_threads

    return pool_threads()


def cpu_name() -> str:
    """'model name' of /proc/cpuinfo with its family / model numbers (hypervisors often shorten the name)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    name = info.get("model name") or info.get("Hardware") or platform.processor() or platform.machine()
    if "cpu family" in info:
        name += f" (family {info['cpu family']} model {info.get('model', '?')})"
    return f"{name}, {os.cpu_count()} logical CPUs"


# --- the kernels ---------------------------------------------------------------------------------
def _bcast(A, index, dtype: str, copies: int):
    """The 4 bytes at ``A[index]`` as one dword, repeated ``copies`` times, viewed as ``dtype``."""
    from tvm.script import tirx as T

    word = T.reinterpret(A.vload([index], "uint8x4"), dtype="int32")
    return T.reinterpret(T.broadcast(word, copies), dtype=dtype)


def _weight_elems(fam: Family) -> int:
    """Elements of W (int8, or float32 for fp32) in one weight vector: int16 weights take two bytes."""
    return fam.lanes * fam.kpack * (2 if fam.name in _I16 else 1)


def _step(fam: Family, A, W, acc, r: int, b: int, it):
    """New value of accumulator (r, b) after one step: the family's instruction sequence."""
    from tvm.script import tirx as T

    lanes = fam.lanes
    a_index = ((it & (_WORDS - 1)) * fam.rows + r) * 4
    off = (r * fam.blocks + b) * lanes
    old = acc.vload([off], dtype=f"{'float32' if fam.name.startswith('fp32') else 'int32'}x{lanes}")
    w_at = lambda j: (b * fam.depth + j) * _weight_elems(fam)  # noqa: E731  (elements of W's dtype)
    if fam.name == "vnni":
        return T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), old, _bcast(A, a_index, "uint8x64", 16),
            W.vload([w_at(0)], dtype="int8x64"), dtype="int32x16")
    if fam.name == "vnni_i16":
        return T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpwssd.512"), old, _bcast(A, a_index, "int16x32", 16),
            T.reinterpret(W.vload([w_at(0)], dtype="int8x64"), dtype="int16x32"), dtype="int32x16")
    if fam.name.startswith("avx2_u8s8"):
        total = None
        for j in range(fam.depth):
            a = _bcast(A, a_index + j * fam.rows * 4 * _WORDS, "uint8x32", 8)
            term = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), a,
                                           W.vload([w_at(j)], dtype="int8x32"), dtype="int16x16")
            total = term if total is None else total + term
        return old + T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), total,
                                             T.broadcast(T.int16(1), 16), dtype="int32x8")
    if fam.name == "avx2_i16":
        return old + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), _bcast(A, a_index, "int16x16", 8),
            T.reinterpret(W.vload([w_at(0)], dtype="int8x32"), dtype="int16x16"), dtype="int32x8")
    # fp32: one float of the row broadcast, times a weight vector, plus the accumulator (one FMA)
    a = T.broadcast(A[(it & (_WORDS - 1)) * fam.rows + r], lanes)
    return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(f"llvm.fma.v{lanes}f32"), a,
                                   W.vload([w_at(0)], dtype=f"float32x{lanes}"), old, dtype=f"float32x{lanes}")


def _amx_kernels(fam: Family):
    """`_kernels` for AMX: per task the tile configuration, A (tmm4-5) and B (tmm6-7) tiles loaded once, then
    ``iters`` steps of 4 `tdpbusd` into the accumulator tiles tmm0-3, stored to C at the end."""
    from tvm.script import tirx as T

    from ..kernels.qdense_amx import amx_intrin, dot_2x2, load_tile_config, request_amx, zero_accumulators

    a_len = w_len = 2 * 16 * 64
    width = 4 * 16 * 16

    def build(parallel: bool):
        loop = T.parallel if parallel else T.serial

        @T.prim_func
        def peak(a: T.handle, w: T.handle, c: T.handle, iters: T.int32):
            T.func_attr({"tirx.noalias": True})
            tasks = T.int32()
            A = T.match_buffer(a, (a_len,), "uint8")
            W = T.match_buffer(w, (w_len,), "int8")
            C = T.match_buffer(c, (tasks, width), "int32")
            request_amx()
            for t in loop(tasks):
                cfg = T.alloc_buffer((64,), "uint8", scope="local")
                load_tile_config(cfg)
                zero_accumulators()
                for i in T.unroll(2):
                    T.evaluate(amx_intrin("tileloadd64", T.int8(4 + i), T.address_of(A[i * 1024]), T.int64(64)))
                    T.evaluate(amx_intrin("tileloadd64", T.int8(6 + i), T.address_of(W[i * 1024]), T.int64(64)))
                for _ in range(iters):
                    dot_2x2()
                for i in T.unroll(4):
                    T.evaluate(amx_intrin("tilestored64", T.int8(i), T.address_of(C[t, i * 256]), T.int64(64)))
                T.evaluate(amx_intrin("tilerelease"))

        return peak

    return build(False), build(True), a_len, w_len, width, "int32"


def _kernels(fam: Family):
    """``(serial, parallel)`` PrimFuncs ``(A, W, C, iters)``: C is [tasks, accumulator words]."""
    from tvm.script import tirx as T

    if fam.name == "amx":
        return _amx_kernels(fam)

    n_acc = fam.rows * fam.blocks
    width = n_acc * fam.lanes
    acc_dtype = "float32" if fam.name.startswith("fp32") else "int32"
    a_dtype, w_dtype = ("float32", "float32") if acc_dtype == "float32" else ("uint8", "int8")
    a_len = _WORDS * fam.rows * (1 if acc_dtype == "float32" else 4 * fam.depth)
    w_len = fam.blocks * fam.depth * _weight_elems(fam)
    rows, blocks, lanes = fam.rows, fam.blocks, fam.lanes

    def build(parallel: bool):
        loop = T.parallel if parallel else T.serial

        @T.prim_func(s_tir=True)
        def peak(a: T.handle, w: T.handle, c: T.handle, iters: T.int32):
            T.func_attr({"tirx.noalias": True})
            tasks = T.int32()
            A = T.match_buffer(a, (a_len,), a_dtype)
            W = T.match_buffer(w, (w_len,), w_dtype)
            C = T.match_buffer(c, (tasks, width), acc_dtype)
            for t in loop(tasks):
                with T.sblock("task"):
                    vt = T.axis.spatial(tasks, t)
                    T.reads(A[0:a_len], W[0:w_len])
                    T.writes(C[vt, 0:width])
                    acc = T.sblock_alloc_buffer((width,), acc_dtype, scope="local")
                    for j in T.unroll(n_acc):
                        acc[T.ramp(j * lanes, 1, lanes)] = C[vt, T.ramp(j * lanes, 1, lanes)]
                    for it in range(iters):
                        for r in T.unroll(rows):
                            for b in T.unroll(blocks):
                                acc[T.ramp((r * blocks + b) * lanes, 1, lanes)] = _step(fam, A, W, acc, r, b, it)
                    for j in T.unroll(n_acc):
                        C[vt, T.ramp(j * lanes, 1, lanes)] = acc[T.ramp(j * lanes, 1, lanes)]

        return peak

    return build(False), build(True), a_len, w_len, width, acc_dtype


@functools.lru_cache(maxsize=None)
def build(name: str):
    """The compiled module of family ``name`` (functions ``serial`` and ``parallel``) and its buffer sizes."""
    import tvm

    fam = family_for(name)
    serial, parallel, a_len, w_len, width, acc_dtype = _kernels(fam)
    mod = tvm.IRModule({"serial": serial.with_attr("global_symbol", "serial"),
                        "parallel": parallel.with_attr("global_symbol", "parallel")})
    exe = tvm.compile(mod, target=tvm.target.Target(dict(fam.target)))
    return exe, (a_len, w_len, width, acc_dtype)


def asm(name: str) -> str:
    """Assembly of family ``name``'s kernels (building needs no CPU feature, only running does)."""
    return build(family_for(name).name)[0].mod.inspect_source("asm")


def missing_instructions(name: str) -> list[str]:
    """The family's instructions its assembly lacks (empty: LLVM emitted what the family claims)."""
    lines = asm(name).splitlines()
    return [" ".join(words) for words in family_for(name).asm
            if not any(all(w in line for w in words) for line in lines)]


def _time(fn_name: str, exe, sizes, tasks: int, seconds: float, repeat: int) -> list[float]:
    """Seconds per iteration, ``repeat`` times, with an iteration count making one call ~``seconds``."""
    import time

    import tvm

    a_len, w_len, width, acc_dtype = sizes
    rng = np.random.default_rng(0)
    if acc_dtype == "float32":  # small normal floats: no denormals, no overflow
        A = tvm.runtime.tensor(rng.uniform(0.5, 1.0, a_len).astype(np.float32) * 1e-3)
        W = tvm.runtime.tensor(rng.uniform(0.5, 1.0, w_len).astype(np.float32) * 1e-3)
    else:
        A = tvm.runtime.tensor(rng.integers(0, 16, a_len, dtype=np.uint8))
        W = tvm.runtime.tensor(rng.integers(-8, 8, w_len, dtype=np.int8))
    C = tvm.runtime.tensor(np.zeros((tasks, width), acc_dtype))
    mod = exe.jit()
    fn = mod[fn_name]
    iters = 1024
    while True:  # grow the loop until one call is long enough to time (also warms up)
        t0 = time.perf_counter()
        fn(A, W, C, iters)
        dt = time.perf_counter() - t0
        if dt >= seconds / 4 or iters >= 2**30:
            break
        iters *= 4
    iters = max(1024, min(2**30, int(iters * seconds / max(dt, 1e-9))))
    timer = mod.time_evaluator(fn_name, tvm.cpu(), number=1, repeat=repeat)
    return [t / iters for t in timer(A, W, C, iters).results]


def measure_family(name: str, *, threads: int | None = None, seconds: float = 0.003, repeat: int = 20,
                   flags=None) -> dict:
    """One family on 1 thread and on ``threads`` pool tasks (default: TVM's pool size).

    Returns ``{"family", "instruction", "gmacs_1t", "gmacs_all", "gops_1t", "gops_all", "threads", ...}``
    (GOPS = 2 x GMAC/s; "_median" keys: the median run) or ``{"family", "instruction", "skipped": reason}``.
    """
    fam = family_for(name, flags)
    out = {"family": name, "instruction": fam.instruction}
    reason = skip_reason(fam, flags)
    if reason is None:
        from .. import targets

        reason = targets.runnable_reason(dict(fam.target))
    if reason is not None:
        return {**out, "skipped": reason}
    missing = missing_instructions(name)
    if missing:  # the rate would be of some other instruction
        raise RuntimeError(f"the {name} micro-kernel's assembly lacks {', '.join(missing)}")
    threads = threads or num_threads()
    exe, sizes = build(fam.name)
    for key, fn_name, tasks in (("1t", "serial", 1), ("all", "parallel", threads)):
        per_iter = _time(fn_name, exe, sizes, tasks, seconds, repeat)
        rates = [tasks * fam.macs_per_step / t / 1e9 for t in per_iter]
        out[f"gmacs_{key}"] = max(rates)
        out[f"gmacs_{key}_median"] = float(np.median(rates))
        out[f"gops_{key}"] = 2 * max(rates)
    out["threads"] = threads
    return out


def measure(families=DEFAULT_FAMILIES, *, threads: int | None = None, seconds: float = 0.003, repeat: int = 20,
            flags=None) -> dict:
    """Every family in ``families``: ``{"cpu", "threads", "families": {name: measure_family(...)}}``."""
    threads = threads or num_threads()
    return {"cpu": cpu_name(), "threads": threads,
            "families": {n: measure_family(n, threads=threads, seconds=seconds, repeat=repeat, flags=flags)
                         for n in families}}
