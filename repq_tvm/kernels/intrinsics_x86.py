"""x86 tensor intrinsics for the quantized dense.

Why our own: importing ``tvm.s_tir.tensor_intrin`` costs 38-90 s, its ``dot_16x4_vnni`` fails LLVM 22
verification (``llvm.x86.avx512.vpdpbusd.512`` now takes ``(<16 x i32>, <64 x i8>, <64 x i8>)``) and
nothing ships for AVX2.  Every intrinsic has a plain-loop twin (`ref_name`, its description used as
body) so the tensorized schedule can be checked bit for bit on any CPU.

One intrinsic call updates ``lanes`` int32 accumulators with ``depth`` packed weight tiles
``B[depth, lanes, kpack]`` (consecutive in the packed layout) against ``depth * kpack`` activations:
``C[i] += sum_{j,k} A[j*kpack + k] * B[j, i, k]``.

====================  =========  ===========  ===========================================  =======================
name                  a x w      lanes/kpack  instructions                                 exact when
====================  =========  ===========  ===========================================  =======================
``vnni_intrin()``     u8 x s8    16 / 4       vpdpbusd zmm                                 always
``u8s8_intrin(d)``    u8 x s8    8 / 4        d x vpmaddubsw, d-1 x vpaddw, vpmaddwd(1s),  2*d*max(a)*max|w|
                                              vpaddd                                       <= 32767
``i16_intrin()``      s16 x s16  8 / 2        vpmaddwd, vpaddd                             not both -2**15
``vnni_i16_intrin()`` s16 x s16  16 / 2       vpdpwssd zmm                                 not both -2**15
``vnni_prefetch_``    u8 x s8    16 / 4       vpdpbusd zmm and a prefetch of the weights   always
``intrin(a, l)``                              ``a`` bytes further (at most byte ``l``)
====================  =========  ===========  ===========================================  =======================

``depth > 1`` for u8 x s8 adds the saturating int16 pair sums of several tiles with vpaddw before the
single widening vpmaddwd: fewer multiplies per MAC, exact only under the tighter bound above.
Operands are written inline: a named vector value (``x = ...``) becomes a per-call workspace buffer.
"""

from __future__ import annotations

import functools
import re

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

U8S8_DEPTHS = (1, 2, 4)


def vnni_intrin() -> str:
    return "repq_dot_16x4_vnni"


def u8s8_intrin(depth: int = 1) -> str:
    return f"repq_dot_8x4x{depth}_avx2_u8s8"


def i16_intrin() -> str:
    return "repq_dot_8x2_avx2_i16"


def vnni_i16_intrin() -> str:
    return "repq_dot_16x2_vnni_i16"


def vnni_prefetch_intrin(ahead: int, last: int) -> str:
    """`vnni_intrin` that also asks for the weight tile ``ahead`` bytes further into L2 (``prefetcht1``), at most
    at byte ``last`` of the weights (the last tile's own); registered on first use, with its twin.

    Why: in a model a linear's weights come from L3 or memory (the other layers' weights passed through the caches
    since its last call), and the hardware prefetchers left the first row tile's sweep over them waiting: the DeiT-S
    linears took 4-14% longer with cold weights than warm (`benchmarks/kernel_dense.py --cold`).  One prefetch per
    weight tile and k step, one column tile ahead (the next tile's weights while this one runs) takes most of that
    back (`qdense.weight_prefetch`); into L1 (``prefetcht0``) or two tiles ahead were tried in scratch builds and
    did no better."""
    name = f"{vnni_intrin()}_pf{ahead}_{last}"
    _register_prefetch(name, ahead, last)
    return name


def register_named(name: str) -> None:
    """Register the intrinsic ``name`` (or its twin) where it is one of those made on first use
    (`vnni_prefetch_intrin`): a replayed trace names them."""
    found = re.fullmatch(re.escape(vnni_intrin()) + r"_pf(\d+)_(\d+)(" + re.escape(ref_name("")) + ")?", name)
    if found:
        vnni_prefetch_intrin(int(found[1]), int(found[2]))


@functools.cache
def _register_prefetch(name: str, ahead: int, last: int) -> None:
    register_with_twins([(name, _dot_desc(16, 4, 1, "uint8", "int8"),
                          _vnni_impl("llvm.x86.avx512.vpdpbusd.512", "uint8", "int8", 4, (ahead, last)))])


def ref_name(intrin: str) -> str:
    """Name of the plain-loop twin of ``intrin`` (runnable on any CPU)."""
    return intrin + "_ref"


def _dot_desc(lanes: int, kpack: int, depth: int, a_dtype: str, w_dtype: str):
    """The exact int32 semantics every implementation claims (and the "ref" body).

    Tensorize compares block iter bindings with the workload's blockized inner block: two iters
    (lane, k) and the schedule's loop order (tile, lane, kpack); depth 1 has no tile loop at all.
    """

    @T.prim_func(s_tir=True)
    def desc_1(
        A: T.Buffer((kpack,), a_dtype, offset_factor=1),
        B: T.Buffer((1, lanes, kpack), w_dtype, offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:kpack], B[0:1, 0:lanes, 0:kpack])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, kpack):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[0, vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def desc_d(
        A: T.Buffer((depth * kpack,), a_dtype, offset_factor=1),
        B: T.Buffer((depth, lanes, kpack), w_dtype, offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0 : depth * kpack], B[0:depth, 0:lanes, 0:kpack])
            T.writes(C[0:lanes])
            for j, i, k in T.grid(depth, lanes, kpack):
                with T.sblock("update"):
                    vi = T.axis.spatial(lanes, i)
                    vk = T.axis.reduce(depth * kpack, j * kpack + k)
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(
                        B[vk // kpack, vi, vk % kpack], "int32"
                    )

    return desc_1 if depth == 1 else desc_d


def _broadcast4(A, offset: int, dtype: str, copies: int):
    """The 4 bytes at ``A[offset]`` (as one dword) repeated ``copies`` times, viewed as ``dtype``."""
    elem = "uint8x4" if A.dtype == "uint8" else "int16x2"
    word = T.reinterpret(A.vload([offset], elem), dtype="int32")
    return T.reinterpret(T.broadcast(word, copies), dtype=dtype)


def _pmaddubsw_sum(A, B, depth: int):
    """int16x16 sum over ``depth`` tiles of vpmaddubsw(broadcast activations, weight tile)."""
    total = None
    for j in range(depth):
        term = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
            _broadcast4(A, 4 * j, "uint8x32", 8),
            B.vload([j, 0, 0], dtype="int8x32"),
            dtype="int16x16",
        )
        total = term if total is None else total + term
    return total


def _u8s8_impl(depth: int):
    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4 * depth,), "uint8", offset_factor=1),
        B: T.Buffer((depth, 8, 4), "int8", offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1),
    ) -> None:
        # vpmaddubsw: int16 a0*w0 + a1*w1 (saturating); vpmaddwd with ones: 8 exact int32 sums.
        with T.sblock("root"):
            T.reads(C[0:8], A[0 : 4 * depth], B[0:depth, 0:8, 0:4])
            T.writes(C[0:8])
            C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                _pmaddubsw_sum(A, B, depth),
                T.broadcast(T.int16(1), 16),
                dtype="int32x8",
            )

    return impl


def _vnni_impl(instruction: str, a_dtype: str, w_dtype: str, kpack: int, prefetch: tuple[int, int] | None = None):
    """16 int32 += dot of ``kpack`` broadcast activations with the weight tile, one AVX-512 VNNI instruction
    (LLVM 22 signatures: vpdpbusd (<16 x i32>, <64 x i8>, <64 x i8>), vpdpwssd (<16 x i32>, <32 x i16>,
    <32 x i16>)); A's ``kpack`` elements are one dword, broadcast.  ``prefetch`` = (ahead, last): first a
    prefetch into L2 of the weights ``ahead`` elements further, clamped to element ``last`` (`vnni_prefetch_intrin`)."""
    elems = 16 * kpack
    ahead, last = prefetch if prefetch is not None else (0, 0)

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((kpack,), a_dtype, offset_factor=1),
        B: T.Buffer((1, 16, kpack), w_dtype, offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:kpack], B[0:1, 0:16, 0:kpack])
            T.writes(C[0:16])
            if prefetch is not None:  # llvm.prefetch(address, read, locality 2 = prefetcht1, data cache)
                T.evaluate(T.call_llvm_intrin(
                    "void", "llvm.prefetch.p0",
                    B.access_ptr("r", offset=T.min(B.elem_offset + ahead, last) - B.elem_offset), 0, 2, 1))
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(instruction),
                C.vload([0], dtype="int32x16"),
                _broadcast4(A, 0, f"{a_dtype}x{elems}", 16),
                B.vload([0, 0, 0], dtype=f"{w_dtype}x{elems}"),
                dtype="int32x16",
            )

    return impl


@T.prim_func(s_tir=True)
def _i16_impl(
    A: T.Buffer((2,), "int16", offset_factor=1),
    B: T.Buffer((1, 8, 2), "int16", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    # vpmaddwd: 8 int32 = a0*w0 + a1*w1, exact (only 2 * (-2**15)**2 overflows).
    with T.sblock("root"):
        T.reads(C[0:8], A[0:2], B[0:1, 0:8, 0:2])
        T.writes(C[0:8])
        C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
            _broadcast4(A, 0, "int16x16", 8),
            B.vload([0, 0, 0], dtype="int16x16"),
            dtype="int32x8",
        )


def _all_intrinsics():
    yield vnni_intrin(), _dot_desc(16, 4, 1, "uint8", "int8"), _vnni_impl("llvm.x86.avx512.vpdpbusd.512", "uint8",
                                                                           "int8", 4)
    yield i16_intrin(), _dot_desc(8, 2, 1, "int16", "int16"), _i16_impl
    yield vnni_i16_intrin(), _dot_desc(16, 2, 1, "int16", "int16"), _vnni_impl("llvm.x86.avx512.vpdpwssd.512",
                                                                                "int16", "int16", 2)
    for d in U8S8_DEPTHS:
        yield u8s8_intrin(d), _dot_desc(8, 4, d, "uint8", "int8"), _u8s8_impl(d)


def register_with_twins(intrinsics) -> None:
    """Register (name, description, implementation) entries and each one's plain-loop "_ref" twin
    (the description as body); override=True keeps it idempotent.  Shared with `intrinsics_arm`."""
    for name, desc, impl in intrinsics:
        TensorIntrin.register(name, desc, impl, override=True)
        TensorIntrin.register(ref_name(name), desc, desc, override=True)


@functools.cache
def register_intrinsics() -> None:
    """Register every x86 intrinsic and its "_ref" twin (once per process)."""
    register_with_twins(_all_intrinsics())
