"""Quantized dense (u8 activations x s8 weights -> s32) for x86 AVX-512 VNNI, with a portable fallback.

Why: untuned TVM has no int8 dense schedule for CPUs (~20 ms for a 197x384x384 layer), and the
shipped ``dot_16x4_vnni`` tensor intrinsic fails LLVM 22 verification because
``llvm.x86.avx512.vpdpbusd.512`` now takes ``(<16 x i32>, <64 x i8>, <64 x i8>)``.  This module
re-registers the intrinsic under a project-owned name and schedules a weight-packed dense with it.

Layouts (all padding is zeros, so it never changes a result):
  * activations ``A``: uint8 ``[M, Kp]`` with ``Kp = ceil(K/4)*4`` (`pad_activation`);
  * weights: int8 ``[N, K]`` packed by `pack_weight` to ``[Np/16, Kp/4, 16, 4]``, ``Np = ceil(N/16)*16``;
  * output: int32 ``[M, N]``, or float32 ``[M, N]`` with the fused epilogue
    ``(acc - a_zp * wsum[n]) * (a_scale * w_scale[n]) + bias[n]`` (`epilogue_params`).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence

import numpy as np
import tvm
from tvm import te
from tvm.s_tir import Schedule, TensorIntrin
from tvm.script import tirx as T
from tvm.target import codegen

VNNI_INTRIN = "repq_dot_16x4_vnni"
# Same description, plain-loop body: exercises the tensorized schedule on CPUs without VNNI.
REF_INTRIN = "repq_dot_16x4_ref"
LANES, KPACK = 16, 4  # one vpdpbusd: 16 int32 lanes, each a dot product of 4 byte pairs

X86_VNNI_TARGET = {"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": 2}
AARCH64_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}

SCHEDULES = ("auto", "vnni", "ref", "fallback")


# --- tensor intrinsic ------------------------------------------------------------------------
# Description copied from tvm/s_tir/tensor_intrin/x86.py (importing that package costs 38-90 s).
@T.prim_func(s_tir=True)
def _dot_16x4_desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_16x4_vnni(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    # LLVM 22 signature: (<16 x i32> acc, <64 x i8> unsigned, <64 x i8> signed).  Operands are
    # inlined: a named vector value here becomes a per-call 64-byte workspace buffer.
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            T.reinterpret(
                T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16),
                dtype="uint8x64",
            ),
            B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16",
        )


def register_intrinsics() -> None:
    """Register `VNNI_INTRIN` and `REF_INTRIN`; idempotent (override=True) and ~free."""
    TensorIntrin.register(VNNI_INTRIN, _dot_16x4_desc, _dot_16x4_vnni, override=True)
    TensorIntrin.register(REF_INTRIN, _dot_16x4_desc, _dot_16x4_desc, override=True)


# --- layouts ---------------------------------------------------------------------------------
def _ceil(x: int, m: int) -> int:
    return -(-x // m) * m


def pack_weight(w_int8: np.ndarray) -> np.ndarray:
    """int8 ``[N, K]`` -> ``[Np/16, Kp/4, 16, 4]``; N padded to a multiple of 16, K of 4, with zeros.

    ``packed[nb, kb, i, j] = w[nb*16 + i, kb*4 + j]``: one ``[16, 4]`` tile is the 64-byte
    operand of a single vpdpbusd.  Zero rows give zero outputs (dropped), zero columns add 0.
    """
    w = np.asarray(w_int8)
    if w.dtype != np.int8 or w.ndim != 2:
        raise ValueError(f"pack_weight wants a 2-D int8 array, got {w.dtype} {w.shape}")
    n, k = w.shape
    n_p, k_p = _ceil(n, LANES), _ceil(k, KPACK)
    padded = np.zeros((n_p, k_p), np.int8)
    padded[:n, :k] = w
    packed = padded.reshape(n_p // LANES, LANES, k_p // KPACK, KPACK).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(packed)


def unpack_weight(packed: np.ndarray, n: int | None = None, k: int | None = None) -> np.ndarray:
    """Inverse of `pack_weight`; ``n``/``k`` drop the padding (default: keep it)."""
    nb, kb, lanes, kpack = packed.shape
    w = packed.transpose(0, 2, 1, 3).reshape(nb * lanes, kb * kpack)
    return np.ascontiguousarray(w[:n, :k])


def pad_activation(a_uint8: np.ndarray) -> np.ndarray:
    """uint8 ``[M, K]`` -> ``[M, Kp]`` with zero columns (a no-op copy when K % 4 == 0)."""
    a = np.asarray(a_uint8)
    if a.dtype != np.uint8 or a.ndim != 2:
        raise ValueError(f"pad_activation wants a 2-D uint8 array, got {a.dtype} {a.shape}")
    out = np.zeros((a.shape[0], _ceil(a.shape[1], KPACK)), np.uint8)
    out[:, : a.shape[1]] = a
    return out


def epilogue_params(w_int8, w_scale, a_scale: float, a_zp: int, bias=None):
    """Fold the static quantization constants into the 3 per-channel vectors the kernel reads.

    Returns ``(zp_wsum int32[N], scale float32[N], bias float32[N])`` with
    ``zp_wsum[n] = a_zp * sum_k w[n, k]`` (exact) and ``scale[n] = a_scale * w_scale[n]``, so the
    kernel computes ``(acc - zp_wsum[n]) * scale[n] + bias[n]``: one int subtract per output.
    """
    w = np.asarray(w_int8)
    if not 0 <= int(a_zp) <= 255:
        raise ValueError(f"activation zero point must be in [0, 255], got {a_zp}")
    zp_wsum = int(a_zp) * w.astype(np.int64).sum(axis=1)
    if np.abs(zp_wsum).max(initial=0) >= 2**31:
        raise OverflowError("a_zp * sum(w) does not fit in int32")
    n = w.shape[0]
    scale = float(a_scale) * np.broadcast_to(np.asarray(w_scale, np.float64), (n,))
    b = np.zeros(n, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(n)
    return zp_wsum.astype(np.int32), scale.astype(np.float32), np.ascontiguousarray(b)


# --- compute and schedules -------------------------------------------------------------------
def qdense(M: int, N: int, K: int, *, epilogue: bool = False, m_tile: int = 1) -> list[te.Tensor]:
    """TE compute ``[A, W, (zp_wsum, scale, bias,) out]`` for the layouts in the module docstring.

    ``m_tile > 1`` computes the accumulator on ``ceil(M/m_tile)*m_tile`` rows from a zero-padded
    copy of A (block "A_pad"): tensorize cannot take the tail predicate a ragged M split makes.
    """
    n_p, k_p, m_p = _ceil(N, LANES), _ceil(K, KPACK), _ceil(M, m_tile)
    A = te.placeholder((M, k_p), "uint8", name="A")
    W = te.placeholder((n_p // LANES, k_p // KPACK, LANES, KPACK), "int8", name="W")
    src = A
    if m_p != M:
        zero = tvm.tirx.const(0, "uint8")
        src = te.compute(
            (m_p, k_p), lambda m, k: te.if_then_else(m < M, A[m, k], zero), name="A_pad"
        )
    k = te.reduce_axis((0, k_p), name="k")
    acc = te.compute(
        (m_p, n_p),
        lambda m, n: te.sum(
            src[m, k].astype("int32")
            * W[n // LANES, k // KPACK, n % LANES, k % KPACK].astype("int32"),
            axis=k,
        ),
        name="acc",
    )
    if not epilogue:
        return [A, W, te.compute((M, N), lambda m, n: acc[m, n], name="out")]
    zp_wsum = te.placeholder((N,), "int32", name="zp_wsum")
    scale = te.placeholder((N,), "float32", name="scale")
    bias = te.placeholder((N,), "float32", name="bias")
    out = te.compute(
        (M, N),
        lambda m, n: (acc[m, n] - zp_wsum[n]).astype("float32") * scale[n] + bias[n],
        name="out",
    )
    return [A, W, zp_wsum, scale, bias, out]


def default_tiles(M: int, N: int, vnni: bool = True) -> tuple[int, int]:
    """(rows, 16-column blocks) per register tile; the block count must divide Np/16.

    The int32 tile must stay under 1 KB: TVM stack-allocates (so LLVM keeps in registers) only
    "global" buffers below that, anything bigger is a workspace alloc+free per tile.  VNNI:
    <= 15 zmm accumulators (>= 10 hide vpdpbusd latency).  Fallback: 6 rows x 16 lanes (12 ymm
    on AVX2, 24 q on NEON), each strided W de-interleave reused by 6 rows (2.6 ms vs 12 ms for
    1 row x 4 blocks at 197x384x384 on Zen 3).  Rows prefer a divisor of M.
    """
    n_blocks = _ceil(N, LANES) // LANES
    options = ((3, 5), (2, 7), (4, 3), (1, 15)) if vnni else ((1, 6),)
    nbi, mi = next((b, m) for b, m in options if n_blocks % b == 0)
    if M <= mi:
        return M, nbi
    # Prefer a row tile in [mi/2, mi] that divides M: no padded copy of A is then needed.
    return next((t for t in range(mi, (mi - 1) // 2, -1) if M % t == 0), mi), nbi


def _tile(sch: Schedule, mi: int, nbi: int):
    """Split acc into (tile, k, row, 16-block, lane, k4), fuse+parallel the tile, fuse `out` in."""
    acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
    m, n, k = sch.get_loops(acc)
    mo, m_i = sch.split(m, [None, mi])
    nb, lane = sch.split(n, [None, LANES])
    nbo, nb_i = sch.split(nb, [None, nbi])
    kb, k4 = sch.split(k, [None, KPACK])
    sch.reorder(mo, nbo, kb, m_i, nb_i, lane, k4)
    sch.reverse_compute_at(out, nbo, preserve_unit_loops=True)  # so out's last loop is its own
    sch.parallel(sch.fuse(mo, nbo))
    sch.vectorize(sch.split(sch.get_loops(out)[-1], [None, LANES])[1])
    root = sch.get_sblock("root")
    if "A_pad" in {sch.get(b).name_hint for b in sch.get_child_blocks(root)}:
        # One copy per call (M x Kp bytes); per tile it would re-copy rows and alloc per tile.
        # Vectorize along k only, so the row test m < M is uniform across a vector.
        k_loop = sch.get_loops(sch.get_sblock("A_pad"))[1]
        size = int(sch.get(k_loop).extent)
        sch.vectorize(sch.split(k_loop, [None, next(v for v in (64, 16, 4) if size % v == 0)])[1])
    return acc, (kb, m_i, nb_i, lane, k4)


def schedule_tensorized(
    func: tvm.tirx.PrimFunc, mi: int, nbi: int, intrin: str = VNNI_INTRIN
) -> Schedule:
    """Register-tiled schedule, inner ``[16, 4]`` tensorized with ``intrin`` (VNNI or REF)."""
    register_intrinsics()
    sch = Schedule(func)
    acc, (kb, m_i, nb_i, lane, _) = _tile(sch, mi, nbi)
    init = sch.decompose_reduction(acc, kb)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(lane, intrin)
    sch.unroll(m_i)
    sch.unroll(nb_i)
    return sch


def schedule_fallback(func: tvm.tirx.PrimFunc, mi: int, nbi: int) -> Schedule:
    """Any-CPU schedule: same tiling, plain loops, 16 output lanes vectorized."""
    sch = Schedule(func)
    acc, (kb, m_i, nb_i, lane, k4) = _tile(sch, mi, nbi)
    sch.reorder(k4, m_i, nb_i, lane)
    for loop in (k4, m_i, nb_i):
        sch.unroll(loop)
    sch.vectorize(lane)  # before decompose_reduction: vectorize wants a whole reduction block
    init = sch.decompose_reduction(acc, kb)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch


# --- build -----------------------------------------------------------------------------------
def _as_target(target) -> tvm.target.Target:
    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)


def target_has_vnni(target) -> bool:
    """True if ``target`` (dict or Target) is an LLVM x86 target with AVX512-VNNI."""
    t = _as_target(target)
    return t.kind.name == "llvm" and bool(codegen.target_has_features("avx512vnni", t))


def _host_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(l.split(":", 1)[1].split()) for l in f if l.startswith("flags")), set())
    except OSError:
        return set()


def host_has_vnni() -> bool:
    """True if this machine can run AVX512-VNNI code (checked from /proc/cpuinfo, then LLVM)."""
    flags = _host_flags()
    if flags:
        return "avx512_vnni" in flags
    host = {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()}
    return platform.machine() in ("x86_64", "AMD64") and target_has_vnni(host)


def host_target(num_cores: int = 2) -> dict:
    """The LLVM target for this machine's CPU (for running the fallback / REF schedules here)."""
    return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": num_cores}


class QDense:
    """A compiled qdense kernel: call it with NumPy arrays, or read its assembly."""

    def __init__(self, M, N, K, target, schedule, epilogue, executable):
        self.M, self.N, self.K, self.epilogue = M, N, K, epilogue
        self.Kp = _ceil(K, KPACK)
        self.target, self.schedule, self.executable = target, schedule, executable
        self._fn = None

    def _check_runnable(self) -> None:
        """Refuse to run code this CPU cannot execute (it would die of SIGILL, not raise)."""
        t = _as_target(self.target)
        triple = str(t.attrs.get("mtriple", "") or codegen.llvm_get_system_triple())
        if not triple.startswith(platform.machine()):
            raise RuntimeError(f"kernel built for {triple}; cannot run on {platform.machine()}")
        flags = _host_flags()
        if flags and "avx512f" not in flags and codegen.target_has_features("avx512f", t):
            raise RuntimeError("kernel uses AVX-512 but this CPU has none: build for host_target()")

    def function(self):
        """The runtime function ``main(A, W, [zp_wsum, scale, bias,] out)``."""
        if self._fn is None:
            self._check_runnable()
            self._fn = self.executable.jit()["main"]
        return self._fn

    def _args(self, a, w_packed, *epi):
        if len(epi) != (3 if self.epilogue else 0):
            raise TypeError("epilogue kernels take (a, w_packed, zp_wsum, scale, bias)")
        dtype = np.float32 if self.epilogue else np.int32
        arrays = [a, w_packed, *epi, np.empty((self.M, self.N), dtype)]
        return [
            x if isinstance(x, tvm.runtime.Tensor) else tvm.runtime.tensor(np.ascontiguousarray(x))
            for x in arrays
        ]

    def __call__(self, a, w_packed, *epi) -> np.ndarray:
        """``a`` uint8 [M, Kp], ``w_packed`` from `pack_weight`, epilogue vectors if built with them."""
        args = self._args(a, w_packed, *epi)
        self.function()(*args)
        return args[-1].numpy()

    def time(self, a, w_packed, *epi, runs: int = 50, number: int = 10) -> np.ndarray:
        """Seconds per call for ``runs`` repeats of ``number`` calls each (time_evaluator)."""
        self.function()
        timer = self.executable.jit().time_evaluator("main", tvm.cpu(), number=number, repeat=runs)
        return np.asarray(timer(*self._args(a, w_packed, *epi)).results)

    def asm(self) -> str:
        """Generated assembly (``inspect_source("asm")`` on the LLVM module)."""
        return self.executable.mod.inspect_source("asm")


def build_qdense(
    M: int, N: int, K: int, target=X86_VNNI_TARGET, *, epilogue: bool = False,
    schedule: str = "auto", tiles: tuple[int, int] | None = None,
) -> QDense:
    """Compile qdense for ``target``; ``schedule`` "auto" = "vnni" if the target has VNNI else "fallback".

    "ref" is the VNNI schedule with a plain-loop intrinsic body, runnable on any CPU (for tests).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    tgt = _as_target(target)
    if schedule == "auto":
        schedule = "vnni" if target_has_vnni(tgt) else "fallback"
    tensorized = schedule in ("vnni", "ref")
    mi, nbi = tiles or default_tiles(M, N, vnni=tensorized)
    func = te.create_prim_func(qdense(M, N, K, epilogue=epilogue, m_tile=mi if tensorized else 1))
    if tensorized:
        sch = schedule_tensorized(func, mi, nbi, VNNI_INTRIN if schedule == "vnni" else REF_INTRIN)
    else:
        sch = schedule_fallback(func, mi, nbi)
    return QDense(M, N, K, target, schedule, epilogue, tvm.compile(sch.mod, target=tgt))


def reference(a_uint8: np.ndarray, w_int8: np.ndarray) -> np.ndarray:
    """NumPy int64 ``a @ w.T`` (unpadded or padded operands; padding contributes zeros)."""
    k = min(a_uint8.shape[1], w_int8.shape[1])
    return a_uint8[:, :k].astype(np.int64) @ w_int8[:, :k].astype(np.int64).T


def _bench(shape: Sequence[int] = (197, 384, 384), runs: int = 50) -> None:
    """Median ms of the kernels runnable here vs NumPy/torch (``python -m repq_tvm.kernels.vnni``)."""
    import torch

    M, N, K = shape
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (M, K), dtype=np.uint8)
    w = rng.integers(-128, 128, (N, K), dtype=np.int8)
    ref = reference(a, w)
    kinds = [("vnni", X86_VNNI_TARGET)] if host_has_vnni() else []
    kinds += [("ref", host_target()), ("fallback", host_target())]
    for kind, tgt in kinds:
        kern = build_qdense(M, N, K, tgt, schedule=kind)
        assert np.array_equal(kern(pad_activation(a), pack_weight(w)), ref), kind
        t = np.median(kern.time(pad_activation(a), pack_weight(w), runs=runs)) * 1e3
        print(f"tvm {kind:9s} {t:8.3f} ms  {2 * M * N * K / t / 1e6:7.1f} GOPS  target={tgt}")

    def med(fn):
        fn()
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return np.median(ts) * 1e3

    a32, w32 = a.astype(np.int32), w.astype(np.int32)
    ta, tw = torch.from_numpy(a.astype(np.int32)), torch.from_numpy(w.astype(np.int32))
    ta8 = torch.from_numpy((a.astype(np.int16) - 128).astype(np.int8))
    tw8t = torch.from_numpy(np.ascontiguousarray(w.T))
    fa, fw = torch.from_numpy(a.astype(np.float32)), torch.from_numpy(w.astype(np.float32))
    rows = [
        ("numpy int32 matmul", lambda: a32 @ w32.T),
        ("torch int32 matmul", lambda: ta @ tw.T),
        ("torch _int_mm s8xs8", lambda: torch._int_mm(ta8, tw8t)),
        ("torch fp32 matmul", lambda: fa @ fw.T),
    ]
    for name, fn in rows:
        try:
            print(f"{name:22s} {med(fn):8.3f} ms")
        except RuntimeError as err:  # e.g. _int_mm unsupported on this CPU build
            print(f"{name:22s} unavailable: {err}".splitlines()[0])
    print(f"threads: torch={torch.get_num_threads()}; TVM uses TVM_NUM_THREADS")


if __name__ == "__main__":
    _bench()
