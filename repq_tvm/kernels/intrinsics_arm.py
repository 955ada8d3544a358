"""aarch64 tensor intrinsics: the Arm dot-product extension (``sdot`` / ``udot``, LLVM ``dotprod``).

``sdot vd.4s, vn.16b, vm.16b`` adds to each of 4 int32 lanes the sum of 4 signed byte products: 16 MACs per
instruction, exact (4 products of at most 128 * 128 each, summed into int32).  One intrinsic call updates
4 int32 accumulators (4 output channels) with ``depth`` consecutive packed weight tiles ``B[depth, 4, 4]``
(``[N/4, K/4, 4, 4]`` int8, `packing.pack_weight(w, 4, 4)`: one 16-byte q register per tile) against
``4 * depth`` activations: ``C[i] += sum_{j,k} A[4j + k] * B[j, i, k]``, the same semantics as the x86
intrinsics (`intrinsics_x86._dot_desc`).

====================  =========  ===========  =====================================================  ==========
name                  a x w      lanes/kpack  instructions                                           exact when
====================  =========  ===========  =====================================================  ==========
``sdot_intrin(1)``    s8 x s8    4 / 4        1 x sdot, the 4 activation bytes broadcast (ld1r/dup)  always
``sdot_intrin(d)``    s8 x s8    4 / 4        d x indexed ``sdot v.4s, v.16b, v.4b[j]``, one load of  always
                                              the ``4d`` activation bytes
``udot_intrin(1)``    u8 x u8    4 / 4        1 x udot, the 4 activation bytes broadcast             always
``udot_intrin(d)``    u8 x u8    4 / 4        d x indexed ``udot v.4s, v.16b, v.4b[j]``, one load of  always
                                              the ``4d`` activation bytes
====================  =========  ===========  =====================================================  ==========

``sdot`` serves the quantized dense and ``q @ kᵀ``; ``udot`` (4 products of at most 255 * 255) the log√2
attention's ``attn @ V`` (`attn_v`, variant "neon_udot": bytes of the power-of-two weights against raw V codes).
For sdot the activation operand is s8: u8 codes of at most 7 bits are passed as they are, 8-bit codes as
``a - 128`` (the kernel's epilogue folds ``128 * sum_k w[n, k]`` into its zero-point constant,
`packing.activation_shift`).  The depth > 1 form splats 32-bit lane ``j`` of one vector load
(``shufflevector``), which LLVM selects as the indexed ``sdot`` (no broadcast instruction at all).
Every intrinsic has a plain-loop "_ref" twin (its description as body), so the tensorized schedule,
packing, compensation and epilogue run bit for bit on any CPU (x86 included) as a portable stand-in.
"""

from __future__ import annotations

import functools

from tvm.script import tirx as T

from .intrinsics_x86 import _dot_desc, register_with_twins

SDOT_DEPTHS = (1, 2, 4)  # also udot's
_SDOT = "llvm.aarch64.neon.sdot.v4i32.v16i8"
_UDOT = "llvm.aarch64.neon.udot.v4i32.v16i8"


def sdot_intrin(depth: int = 1) -> str:
    return f"repq_dot_4x4x{depth}_neon_sdot"


def udot_intrin(depth: int = 1) -> str:
    return f"repq_dot_4x4x{depth}_neon_udot"


def _activation(A, depth: int, j: int):
    """The 4 activation bytes of tile ``j`` in all four 32-bit lanes, as 16 bytes of A's type.

    Depth 1: a broadcast of the one 32-bit word.  Depth > 1: lane ``j`` of one load of all ``4 * depth``
    bytes, splatted by a shuffle (the pattern of the indexed ``sdot``, which reads the lane itself).
    """
    if depth == 1:
        word = T.reinterpret(A.vload([0], dtype=f"{A.dtype}x4"), dtype="int32")
        return T.reinterpret(T.broadcast(word, 4), dtype=f"{A.dtype}x16")
    words = T.reinterpret(A.vload([0], dtype=f"{A.dtype}x{4 * depth}"), dtype=f"int32x{depth}")
    # TIR's Shuffle makes at most as many lanes as its inputs hold: depth 2 passes the pair twice
    return T.reinterpret(T.Shuffle([words] * -(-4 // depth), [j, j, j, j]), dtype=f"{A.dtype}x16")


def _dot_chain(C, A, B, depth: int, instruction: str):
    """``C + sum_j dot(B[j], activation j)``: one dependent chain of ``depth`` sdot / udot on one accumulator."""
    acc = C.vload([0], dtype="int32x4")
    for j in range(depth):
        acc = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id(instruction), acc, B.vload([j, 0, 0], dtype=f"{B.dtype}x16"),
            _activation(A, depth, j), dtype="int32x4",
        )
    return acc


def _dot_impl(depth: int, dtype: str, instruction: str):
    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((4 * depth,), dtype, offset_factor=1),
        B: T.Buffer((depth, 4, 4), dtype, offset_factor=1),
        C: T.Buffer((4,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0 : 4 * depth], B[0:depth, 0:4, 0:4])
            T.writes(C[0:4])
            C[T.ramp(T.int32(0), 1, 4)] = _dot_chain(C, A, B, depth, instruction)

    return impl


def _all_intrinsics():
    for d in SDOT_DEPTHS:
        yield sdot_intrin(d), _dot_desc(4, 4, d, "int8", "int8"), _dot_impl(d, "int8", _SDOT)
        yield udot_intrin(d), _dot_desc(4, 4, d, "uint8", "uint8"), _dot_impl(d, "uint8", _UDOT)


@functools.cache
def register_intrinsics() -> None:
    """Register every Arm intrinsic and its "_ref" twin (once per process)."""
    register_with_twins(_all_intrinsics())
