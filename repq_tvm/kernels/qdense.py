"""Quantized dense ``out[m, n] = sum_k a[m, k] * w[n, k]`` (int32), optionally with a fused float epilogue.

Why hand-scheduled: untuned TVM has no int8 dense rule for CPUs (~20 ms for 197x384x384).  Each
variant is a register-blocked tile (int32 accumulators stay in vector registers over the whole k
loop, parallel over tiles) whose inner ``[lanes, kpack]`` step is one tensor intrinsic
(`intrinsics_x86`).  Variants, picked by `choose_variant` from the target and the code bit widths:

==========  =============  ==============================  ===========================================
variant     a x w          weight layout                   target / exactness
==========  =============  ==============================  ===========================================
amx         u8 x s8        [N/16, K/4, 16, 4] int8         AMX-INT8 (`qdense_amx`: tdpbusd tiles, its own
                                                           TVMScript kernel); always exact; with the
                                                           epilogue and shapes `qdense_amx.fits` only
vnni        u8 x s8        [N/16, K/4, 16, 4] int8         AVX512-VNNI; always exact
avx2_u8s8   u8 x s8        [N/8, K/4, 8, 4] int8           AVX2; exact iff 2*depth*max(a)*max|w| <= 32767
avx2_i16    s16 x s16      [N/8, K/2, 8, 2] int16          AVX2; exact for 8-bit codes; a is a - a_zp
neon_sdot   s8 x s8        [N/4, K/4, 4, 4] int8           aarch64 dotprod (sdot); always exact; a is the
                                                           code, or a - 128 for 8-bit codes
fallback    u8 x s8        [N/16, K/4, 16, 4] int8         any CPU (aarch64 without dotprod), plain vector
                                                           loops (NEON smull/smlal)
==========  =============  ==============================  ===========================================

Activations are ``[M, Kp]`` (K padded to kpack with zeros), the output ``[M, N]`` int32, or float32
with the epilogue ``(acc - zp_wsum[n]) * scale[n] + bias[n]`` (`packing.epilogue_params`).
``depth`` (u8 x s8) sums that many vpmaddubsw results in int16 before widening: ~20% faster
at depth 4 than 1 on Zen 3, exact only under the tighter bound (4/6-bit codes allow 4).  For
neon_sdot ``depth`` tiles (``4 * depth`` consecutive k) share one activation load, read lane by
lane by the indexed ``sdot v.4s, v.16b, v.4b[j]`` (`intrinsics_arm`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te
from tvm.s_tir import Schedule

from ..targets import as_target, target_has, tvm_target
from . import epilogue as epilogue_ops
from . import packing, qdense_amx
from .intrinsics_arm import SDOT_DEPTHS, sdot_intrin
from .intrinsics_arm import register_intrinsics as register_arm_intrinsics
from .intrinsics_x86 import (
    U8S8_DEPTHS, i16_intrin, ref_name, register_intrinsics, u8s8_intrin, vnni_intrin, vnni_prefetch_intrin,
)
from .packing import ceil_to

# The kernel tests' and benchmarks' canonical targets: the presets in targets/ (`repq_tvm.targets`)
X86_VNNI_TARGET = tvm_target("x86_64-avx512-vnni")
X86_AVX2_TARGET = tvm_target("x86_64-avx2")
AARCH64_TARGET = tvm_target("aarch64-neon-dotprod")
AARCH64_NEON_TARGET = tvm_target("aarch64-neon")  # no dot product: the fallback's NEON smull/smlal


@dataclass(frozen=True)
class Variant:
    """One kernel flavour: operand types, packing and the intrinsic of its inner step."""

    name: str
    lanes: int  # int32 outputs per instruction
    kpack: int  # consecutive k per output lane per instruction
    a_dtype: str
    w_dtype: str
    feature: str | None  # LLVM feature the target needs; None: plain loops, any CPU

    @property
    def tensorized(self) -> bool:
        return self.feature is not None

    @property
    def depths(self) -> tuple[int, ...]:
        """The weight-tile depths one intrinsic step can take."""
        return {"avx2_u8s8": U8S8_DEPTHS, "neon_sdot": SDOT_DEPTHS}.get(self.name, (1,))

    def intrin(self, depth: int = 1) -> str:
        """Tensor intrinsic of one inner step (``depth`` weight tiles; > 1 only for u8 x s8 and sdot)."""
        if depth not in self.depths:
            raise ValueError(f"{self.name} has no depth-{depth} intrinsic")
        if self.name == "avx2_u8s8":
            return u8s8_intrin(depth)
        if self.name == "neon_sdot":
            return sdot_intrin(depth)
        return {"vnni": vnni_intrin(), "avx2_i16": i16_intrin()}[self.name]

    def exact(self, bits_a: int, bits_w: int, depth: int = 1) -> bool:
        """True if this variant computes ``a @ w.T`` exactly for codes of these bit widths."""
        packing.code_bounds(bits_a, bits_w)  # validates
        return packing.u8s8_is_exact(bits_a, bits_w, depth) if self.name == "avx2_u8s8" else True

    def a_shift(self, bits_a: int) -> int:
        """What the kernel's A subtracts from the u8 codes (`packing.activation_shift`)."""
        return packing.activation_shift(bits_a, self.a_dtype)

    def max_depth(self, bits_a: int, bits_w: int, K: int) -> int:
        """Deepest exact step (u8 x s8: int16 pre-accumulation; sdot: tiles sharing one activation load)
        dividing the Kp/kpack weight tiles (1 if none).

        sdot stops at 2: depth 4 keeps 4 weight registers per lane block live and spills the default
        5 x 4 tile (llvm-mca, 65x512x128: 24 MACs/cycle at depth 4, 31.9 at depth 2; peak 32).
        """
        tiles = ceil_to(K, self.kpack) // self.kpack
        cap = 2 if self.name == "neon_sdot" else max(self.depths)
        ok = [d for d in self.depths if d <= cap and tiles % d == 0 and self.exact(bits_a, bits_w, d)]
        return max(ok, default=1)


VARIANTS = {
    v.name: v
    for v in (
        Variant("amx", 16, 4, "uint8", "int8", "amx-int8"),
        Variant("vnni", 16, 4, "uint8", "int8", "avx512vnni"),
        Variant("avx2_u8s8", 8, 4, "uint8", "int8", "avx2"),
        Variant("avx2_i16", 8, 2, "int16", "int16", "avx2"),
        Variant("neon_sdot", 4, 4, "int8", "int8", "dotprod"),
        Variant("fallback", 16, 4, "uint8", "int8", None),
    )
}


# --- targets ---------------------------------------------------------------------------------
# Targets (a tvm.target.Target, a preset dict or name, a TVM target dict) are handled by `repq_tvm.targets`.
def host_target(num_cores: int | None = None) -> tvm.target.Target:
    """The `host` preset's Target (what `repq-tvm compile --target host` builds for)."""
    return tvm_target("host", num_cores)


def choose_variant(target, bits_a: int = 8, bits_w: int = 8, shape: tuple[int, int, int] | None = None) -> Variant:
    """The fastest variant ``target`` can run that is exact for these code widths.

    AMX for a kernel of ``shape`` (M, N, K; only kernels with the epilogue pass one) the AMX blocking
    takes (`qdense_amx.fits`), when the target has AMX-INT8; else VNNI if the target has it; on AVX2 the
    u8 x s8 path when vpmaddubsw cannot saturate (~1.5x faster than int16 on Zen 3: half the instructions
    per MAC), else int16; aarch64 with the
    dot-product extension gets sdot; anything else (e.g. Cortex-A72/A53) the plain fallback.
    """
    if shape is not None and target_has(target, "amx-int8") and qdense_amx.fits(*shape):
        return VARIANTS["amx"]
    for name in ("vnni", "avx2_u8s8", "avx2_i16", "neon_sdot"):
        v = VARIANTS[name]
        if target_has(target, v.feature) and v.exact(bits_a, bits_w):
            return v
    return VARIANTS["fallback"]


# --- compute ---------------------------------------------------------------------------------
def qdense(
    M: int, N: int, K: int, variant: Variant | str = "vnni", *, epilogue: bool = False, m_tile: int = 1,
    compensate: bool = False, gelu_codes: int | None = None, residual: bool = False,
    codes_operand: tuple[str, int | str] | None = None, a_rows: int | None = None, column_codes: int | None = None,
) -> list[te.Tensor]:
    """TE compute ``[A, W, (comp,) (zp_wsum, scale, bias,) (quant,) (res,) (rows,) out]`` in ``variant``'s layouts.

    ``m_tile > 1`` computes the accumulator on ``ceil(M/m_tile)*m_tile`` rows (tensorize cannot take
    the tail predicate a ragged M split makes); the extra rows are discarded.  ``compensate`` adds
    ``comp[n] * asum[m]`` (``asum`` = the row sums of A, computed in the kernel) to the accumulator:
    the weights were offset by ``comp`` to fit int8 (`packing.weight_offset`).  ``gelu_codes`` (the top code
    2^b − 1; with the epilogue) stores the uint8 codes of GELU of the float result instead of it under the
    quantizer of one more input, ``quant`` (float32 [3], `epilogue.quantizer_args`: read at run time, so the
    fc1 kernels of all blocks are one), or with ``codes_operand`` = (dtype, minus) those codes as the next
    kernel's activation operand (`epilogue.as_operand`: int16 centred, sdot's int8); ``residual`` takes one more
    input ``res`` [M, N] float32 and stores ``res + y``.  ``column_codes`` (the top code 2^b − 1; with the epilogue)
    stores the uint8 codes of the float result under a quantizer per column, ``quant`` float32 [3, N] (row i: element
    i of each column's `epilogue.quantizer_args`): a qkv projection's output as the codes of its q, k and v thirds,
    which the fused attention reads (`passes.qkv_column_codes`).  ``a_rows``: A has that many rows and output row m
    is computed from A's row ``rows[m]`` (one more input, int32 [M]): a row permutation or gather of the activations
    (Swin's window partition, cyclic shift and their reverses) read in place instead of copied by a kernel of its
    own.
    """
    v = VARIANTS[variant] if isinstance(variant, str) else variant
    L, P = v.lanes, v.kpack
    n_p, k_p, m_p = ceil_to(N, L), ceil_to(K, P), ceil_to(M, m_tile)
    A = te.placeholder((a_rows or M, k_p), v.a_dtype, name="A")
    W = te.placeholder((n_p // L, k_p // P, L, P), v.w_dtype, name="W")
    # Rows past M read row M-1 again (clamped index) and are never stored: no padded copy of A.
    row = (lambda m: te.min(m, M - 1)) if m_p != M else (lambda m: m)
    rows = te.placeholder((M,), "int32", name="rows") if a_rows else None
    a_at = lambda m, k: A[row(m), k]  # noqa: E731  (what the products and row sums read of A)
    if rows is not None:  # a tile's rows gathered into a stage of their own (`_tile`): tensorize takes no index load
        gathered = te.compute((m_p, k_p), lambda m, k: A[rows[row(m)], k], name="A_rows")
        a_at = lambda m, k: gathered[m, k]  # noqa: E731
    k = te.reduce_axis((0, k_p), name="k")
    acc = te.compute(
        (m_p, n_p),
        lambda m, n: te.sum(
            a_at(m, k).astype("int32") * W[n // L, k // P, n % L, k % P].astype("int32"), axis=k
        ),
        name="acc",
    )
    inputs, total = [A, W], (lambda m, n: acc[m, n])
    if compensate:
        comp = te.placeholder((N,), "int32", name="comp")
        ks = te.reduce_axis((0, k_p), name="ks")
        asum = te.compute((m_p,), lambda m: te.sum(a_at(m, ks).astype("int32"), axis=ks), name="asum")
        inputs.append(comp)
        total = lambda m, n: acc[m, n] + comp[n] * asum[m]  # noqa: E731
    table = [rows] if rows is not None else []
    if not epilogue:
        return [*inputs, *table, te.compute((M, N), lambda m, n: total(m, n), name="out")]
    zp_wsum = te.placeholder((N,), "int32", name="zp_wsum")
    scale = te.placeholder((N,), "float32", name="scale")
    bias = te.placeholder((N,), "float32", name="bias")
    res = te.placeholder((M, N), "float32", name="res") if residual else None
    if gelu_codes is not None and column_codes is not None:
        raise ValueError("one codes tail per kernel: gelu_codes or column_codes")
    quant = None
    if gelu_codes is not None:
        quant = te.placeholder((epilogue_ops.QUANT,), "float32", name="quant")
    elif column_codes is not None:
        quant = te.placeholder((epilogue_ops.QUANT, N), "float32", name="quant")
    codes = None if gelu_codes is None else (epilogue_ops.Quantizer.loaded(quant), gelu_codes)

    def value(m, n):
        y = (total(m, n) - zp_wsum[n]).astype("float32") * scale[n] + bias[n]
        if column_codes is not None:
            return epilogue_ops.quantize_codes(y, epilogue_ops.Quantizer.column(quant, n), column_codes)
        return epilogue_ops.tail(y, codes, res[m, n] if residual else None, codes_operand)

    out = te.compute((M, N), value, name="out")
    return [*inputs, zp_wsum, scale, bias, *([quant] if quant is not None else []), *([res] if residual else []),
            *table, out]


def qdense_func(spec: dict) -> tvm.tirx.PrimFunc:
    """The unscheduled PrimFunc of a kernel spec (the dict `schedule_qdense` makes), carrying the spec as its
    ``repq.kernel`` attribute: tuning rebuilds a kernel's definition from it (`repq_tvm.tuning.spaces`)."""
    v = VARIANTS[spec["variant"]]
    if v.name == "amx":
        return _amx_func(spec)
    tensors = qdense(spec["M"], spec["N"], spec["K"], v, epilogue=spec["epilogue"], m_tile=spec["m_tile"],
                     compensate=spec["compensate"], gelu_codes=gelu_top(spec),
                     residual=bool(spec.get("residual")), codes_operand=_operand(spec.get("codes_operand")),
                     a_rows=spec.get("rows"), column_codes=column_top(spec))
    return _with_spec(te.create_prim_func(tensors), spec)


def _amx_func(spec: dict, emulate: bool = False, prefetch: bool = True) -> tvm.tirx.PrimFunc:
    """The AMX kernel of a spec (one hand-written kernel: its definition and its schedule)."""
    func = qdense_amx.qdense_amx_func(spec["M"], spec["N"], spec["K"], emulate=emulate,
                                      gelu_codes=gelu_top(spec), residual=bool(spec.get("residual")),
                                      qkv_codes=spec.get("qkv_codes"), prefetch=prefetch)
    return _with_spec(func, spec)


def gelu_top(spec: dict) -> int | None:
    """The top code of a spec's GELU → codes tail, or None without one."""
    return int(spec["gelu_codes"]["top"]) if spec.get("gelu_codes") else None


def column_top(spec: dict) -> int | None:
    """The top code of a spec's per-column codes tail, or None without one."""
    return int(spec["column_codes"]["top"]) if spec.get("column_codes") else None


def _with_spec(func: tvm.tirx.PrimFunc, spec: dict) -> tvm.tirx.PrimFunc:
    return func.with_attr("repq.kernel", json.dumps(spec, sort_keys=True))


# --- schedules -------------------------------------------------------------------------------
def default_tiles(M: int, N: int, variant: Variant | str = "vnni", depth: int = 1) -> tuple[int, int]:
    """(rows, lane blocks) per register tile; the block count must divide Np/lanes.

    Measured on Zen 3 (AVX2, 1 thread, ViT shapes; tiles within ~10% of each other, spills are
    what hurts): u8 x s8 depth 4 -> 6 x 1 blocks (~110 GMAC/s), depth 2 -> 3 x 2, depth 1 -> 4 x 2
    (~90); int16 -> 6 x 2 (~70).  Bigger tiles make LLVM spill accumulators (16 ymm hold rows x
    blocks accumulators, depth x blocks weight vectors, the broadcast and the ones vector).  VNNI:
    <= 15 zmm accumulators (>= 10 hide vpdpbusd latency).  Fallback: 6 rows x 16 lanes (12 ymm on
    AVX2, 24 q on NEON).  sdot (llvm-mca, Cortex-A76 / Neoverse N1, depth 2): 5 rows x 4 blocks of 4
    lanes = 20 q accumulators + 8 weight + 5 activation registers, ~32 MACs/cycle without spills; 6 x 4
    or depth 4 spill.  The int32 tile must stay under 1 KB: TVM stack-allocates (so LLVM keeps
    in registers) only buffers below that, anything bigger is a workspace alloc+free per tile.
    Rows: max or max − 1, whichever wastes fewer padded rows (ragged M is computed, not stored).  Smaller tiles
    save at most a few padded rows and share each k step's weight loads among fewer rows: int16 tiles of 4 rows
    were slower than 5 or 6 on most of Swin-T's linears (up to 18%; Zen 3, 2 threads, `benchmarks/kernel_dense.py
    --rows 4,5,6`) and the whole Swin-T 4-6% (`benchmarks/compare_artifacts.py`); u8 x s8 within 3%; sdot 3 x 4
    ~14% fewer MACs/cycle than 5 x 4 (llvm-mca); VNNI 3 x 3 holds 9 accumulators, fewer than the 10 that hide
    vpdpbusd's latency (DeiT's 197 rows had taken it, to save 2 rows; not timed since).
    """
    v = VARIANTS[variant] if isinstance(variant, str) else variant
    n_blocks = ceil_to(N, v.lanes) // v.lanes
    options = {
        "vnni": ((3, 5), (2, 7), (4, 3), (1, 15)),
        "avx2_u8s8": {1: ((2, 4), (1, 8)), 2: ((2, 3), (1, 8)), 4: ((1, 6),)}[depth],
        "avx2_i16": ((2, 6), (1, 8)),
        "neon_sdot": ((4, 5), (3, 5), (2, 8), (1, 8)),
        "fallback": ((1, 6),),
    }[v.name]
    nbi, mi = next(((b, m) for b, m in options if n_blocks % b == 0), (1, options[-1][1]))
    if M <= mi:
        return M, nbi
    return min((mi, mi - 1), key=lambda t: ceil_to(M, t) - M), nbi


# The "blocks" order (`_tile`, `column_block`): column tiles in blocks whose weights take at most BLOCK_BYTES, blocks
# outermost, for int16 kernels of at least BLOCK_MIN_ROWS rows
BLOCK_BYTES = 256 * 1024  # half the smallest per-core L2 of the CPUs here (Zen 3: 512 KB)
BLOCK_MIN_ROWS = 1024


def column_block(M: int, N: int, K: int, v: Variant, nbi: int, compensate: bool = False,
                 gather: bool = False) -> int | None:
    """Column tiles per block of the "blocks" order, or None: rows outer (the default order).

    Rows outer, every row tile reads the whole weight matrix again, from L3 where it does not fit L2.  In blocks of
    column tiles whose weights fit in half an L2, both cores' row tiles of one block read that block from their own
    L2 and the activations are read once per block instead.  Measured on the AVX2-only Zen 3 (2 threads, the int16
    kernel alone, `benchmarks/kernel_dense.py --rows-outer`): DeiT-S at batch 8 (M = 1576) 3-8% faster (fc1
    1576x1536x384 6.47 → 5.97 ms, fc2 1576x384x1536 6.30 → 5.85; README "Batch 8 since column blocks"); blocks of
    196-221 KB beat 295 KB and more; at M ≤ 788 (batch 1 and 4, Swin-T's stage 2) and for the u8 x s8 kernel (int8 weights,
    half the bytes) level within the noise, so those keep rows outer; VNNI and sdot kernels are not measured and keep
    it too.  Kernels with compensation or gathered rows compute those per row tile: rows outer (`_tile`).  The
    block divides the column tiles (ragged blocks do not tile); None where the weights fit one block."""
    if v.name != "avx2_i16" or compensate or gather or M < BLOCK_MIN_ROWS:
        return None
    n_tiles = ceil_to(N, v.lanes) // v.lanes // nbi
    tile_bytes = nbi * v.lanes * ceil_to(K, v.kpack) * np.dtype(v.w_dtype).itemsize
    fits = [b for b in range(1, n_tiles) if n_tiles % b == 0 and b * tile_bytes <= BLOCK_BYTES]
    return max(fits) if fits and n_tiles * tile_bytes > BLOCK_BYTES else None


def _tile(sch: Schedule, v: Variant, mi, nbi, depth: int = 1, compensate: bool = False, order: str = "rows",
          parallel: str | None = None, block: int | None = None):
    """Tile `out` into (rows x lane blocks) tiles, compute acc (and the row sums) per tile, parallel tiles.

    Driven from `out` (acc and asum `compute_at` its tile loops) because the compensated epilogue has
    two producers, which `reverse_compute_at` cannot take.  ``order`` "rows" puts row tiles outer (a
    tile's activation rows stay in L1 while its column tiles run), "cols" column tiles (a weight panel
    stays in L1), "blocks" blocks of ``block`` column tiles outermost, serial, then row tiles, then the block's
    column tiles (`column_block`: a block's weights stay in L2; default parallel "outer", the row tiles).
    ``parallel`` "tiles" runs all tiles in parallel, "outer" only the outer tile loop;
    with compensation only row tiles do, rows outer, so each computes its row sums once for all its
    column tiles (recomputing them per tile cost 25% at 197x384x384 on Zen 4, once per row tile ~0%); so do
    kernels that gather their rows through a table.  None: "outer" for those two, else "tiles".
    Inside a tile acc is split into (k outer, row, block, k tiles, lane, kpack): its int32 accumulators
    live across the whole k loop (registers after LLVM's SROA); ``depth`` weight tiles form one
    intrinsic step, tensorized at the returned ``kd`` loop.  Ragged M and N tiles are computed whole on
    padded acc rows/columns, stored masked.  ``mi`` and ``nbi`` may be sampled MetaSchedule variables
    (`repq_tvm.tuning.spaces`): the schedule is the same for fixed and sampled sizes.
    """
    gather = _gather_block(sch)
    parallel = parallel or ("outer" if compensate or gather is not None or order == "blocks" else "tiles")
    if (order == "blocks") != (block is not None):
        raise ValueError("the blocks order takes a block of column tiles, the other orders none")
    if (compensate or gather is not None) and (order, parallel) != ("rows", "outer"):
        raise ValueError("compensated and row-gathering kernels run row tiles outer, in parallel (their row sums and "
                         "gathered rows once per row tile)")
    acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
    m, n = sch.get_loops(out)
    mo, mo_i = sch.split(m, [None, mi])
    nb, lane_o = sch.split(n, [None, v.lanes])
    nbo, nb_o = sch.split(nb, [None, nbi])
    if order == "blocks":
        blocks, nbo = sch.split(nbo, [None, block])
        outer, inner = mo, nbo
        sch.reorder(blocks, outer, inner, mo_i, nb_o, lane_o)
    else:
        outer, inner = (mo, nbo) if order == "rows" else (nbo, mo)
        sch.reorder(outer, inner, mo_i, nb_o, lane_o)
    sch.compute_at(acc, inner, preserve_unit_loops=True)
    if compensate:  # the row sums once per row tile, for all its column tiles
        sch.compute_at(sch.get_sblock("asum"), mo, preserve_unit_loops=True)
    if gather is not None:  # the tile's activation rows, copied once per row tile (after its consumers moved there)
        sch.compute_at(gather, mo, preserve_unit_loops=True)
        k_g = sch.get_loops(gather)[-1]
        width = next(w for w in (16, 8, 4, 2, 1) if int(sch.get(k_g).extent) % w == 0)
        sch.vectorize(sch.split(k_g, [None, width])[1])
    m_i, n_t, k = sch.get_loops(acc)[-3:]
    nb_i, lane = sch.split(n_t, [nbi, v.lanes])
    if depth == 1:  # no unit loop: the depth-1 intrinsics have none (tensorize is structural)
        (kb, kp), kd = sch.split(k, [None, v.kpack]), lane
        sch.reorder(kb, m_i, nb_i, lane, kp)
    else:
        kb, kd, kp = sch.split(k, [None, depth, v.kpack])
        sch.reorder(kb, m_i, nb_i, kd, lane, kp)
    sch.parallel(outer if parallel == "outer" else sch.fuse(outer, inner))
    sch.vectorize(lane_o)
    return acc, (kb, m_i, nb_i, kd, lane, kp)


STACK_BYTES = 1024  # TVM's CPU lowering puts smaller constant-size buffers on the stack (runtime::kMaxStackAlloca)


def stack_rows(mi: int, K: int, v: Variant, a_rows: int | None) -> int:
    """Rows per tile of a kernel that copies its rows through a table (``a_rows``): one row fewer when that puts the
    row tile's copy on the stack (never below 4 rows).  Above TVM's limit the copy is a workspace allocated and freed per row tile (two
    runtime calls per row tile: Swin-T's stage 1, K = 96 int16, 6 rows = 1152 bytes)."""
    if not a_rows or not v.tensorized:
        return mi
    row_bytes = ceil_to(K, v.kpack) * np.dtype(v.a_dtype).itemsize
    return mi - 1 if mi * row_bytes >= STACK_BYTES > (mi - 1) * row_bytes and mi > 4 else mi


def _gather_block(sch: Schedule):
    """The ``A_rows`` stage of a kernel that reads its activation rows through a table (`qdense`), else None."""
    try:
        return sch.get_sblock("A_rows")
    except Exception:  # noqa: BLE001  (tvm raises its own ScheduleError: no such block)
        return None


def apply_tensorized(
    sch: Schedule, v: Variant, mi, nbi, depth: int = 1, ref: bool = False, compensate: bool = False,
    order: str = "rows", parallel: str | None = None, block: int | None = None, prefetch: bool = True,
) -> Schedule:
    """Register-tiled schedule on ``sch`` whose inner step is ``v.intrin(depth)`` (or its plain-loop twin).

    ``parallel``: `_tile`'s default when None; ``block``: column tiles per block of the "blocks" order;
    ``prefetch`` False: no weight prefetch where `weight_prefetch` would put one (to compare the two).
    """
    register_intrinsics()
    register_arm_intrinsics()
    acc, (kb, m_i, nb_i, kd, _, _) = _tile(sch, v, mi, nbi, depth, compensate, order, parallel, block)
    init = sch.decompose_reduction(acc, kb)
    sch.vectorize(sch.get_loops(init)[-1])
    ahead = weight_prefetch(sch, acc, v, nbi, depth, order) if prefetch else None
    intrin = v.intrin(depth) if ahead is None else vnni_prefetch_intrin(*ahead)
    sch.tensorize(kd, ref_name(intrin) if ref else intrin)
    sch.unroll(m_i)
    sch.unroll(nb_i)
    # the epilogue of a tile unrolled too: its vectors' chains (GELU's erf, the codes) are independent and long,
    # and a loop over the rows left few of them in flight (a kernel-level gain on fc1's shapes; the whole model
    # moved within the noise of the machine it was measured on)
    for loop in sch.get_loops(sch.get_sblock("out"))[-3:-1]:
        sch.unroll(loop)
    return sch


PREFETCH_MAX_ROWS = 512  # `weight_prefetch` only for kernels of at most this many rows


def weight_prefetch(sch: Schedule, acc, v: Variant, nbi: int, depth: int, order: str) -> tuple[int, int] | None:
    """(ahead, last) of `intrinsics_x86.vnni_prefetch_intrin` for a VNNI kernel with column tiles inner and at most
    `PREFETCH_MAX_ROWS` rows: the same k step of the next column tile, ``nbi`` weight blocks on, clamped to the last
    block; None for other kernels.  ``acc`` is the accumulator's block (its reads give the packed weights' shape).

    Only the first row tile of each core reads the weights from L3 or memory; the others find them in L2, where the
    prefetches are extra load-port work.  `benchmarks/kernel_dense.py --threads 2 --gelu --cold 24 --no-prefetch` on
    the DeiT-S linears (197 rows, Zen 4, one interleaved run): with cold weights 2-5% faster with it (fc1 → GELU →
    codes 0.372 → 0.354 ms, qkv 0.219 → 0.212), with warm ones level to 4% slower (fc2 0.259 → 0.270); in a model the
    weights are cold (the whole DeiT-S 0.97x, `compare_artifacts.py`).  At 788 and 1576 rows (batch 4 and 8) cold
    was level and warm 1-4% slower, and DeiT-S at batch 8 2% slower in all, so those keep the plain intrinsic.
    Every row of a tile asks for the same lines (tensorize has one intrinsic for the tile's rows).  Measured on
    Zen 4 only; AVX2 and the other variants have none.
    """
    if v.name != "vnni" or depth != 1 or order != "rows" or not isinstance(nbi, int):
        return None
    weights = next(r.source for r in sch.get(acc).reads if r.source.name == "W")
    rows = int(sch.get(sch.get_sblock("out")).writes[0].source.shape[0])
    if rows > PREFETCH_MAX_ROWS:
        return None
    blocks, k_steps, lanes, kpack = (int(d) for d in weights.shape)
    block = k_steps * lanes * kpack
    return nbi * block, blocks * block - lanes * kpack


def schedule_tensorized(
    func: tvm.tirx.PrimFunc, v: Variant, mi: int, nbi: int, depth: int = 1, ref: bool = False,
    compensate: bool = False, block: int | None = None, prefetch: bool = True,
) -> Schedule:
    """`apply_tensorized` on a new schedule of ``func``, the hand defaults: rows outer, or with ``block``
    (`column_block`) the blocks order."""
    order = "rows" if block is None else "blocks"
    return apply_tensorized(Schedule(func), v, mi, nbi, depth, ref, compensate, order, block=block, prefetch=prefetch)


def schedule_fallback(func: tvm.tirx.PrimFunc, v: Variant, mi: int, nbi: int, compensate: bool = False) -> Schedule:
    """Any-CPU schedule: same tiling, plain loops, the lanes of a block vectorized."""
    sch = Schedule(func)
    acc, (kb, m_i, nb_i, _, lane, kp) = _tile(sch, v, mi, nbi, compensate=compensate)
    sch.reorder(kp, m_i, nb_i, lane)
    for loop in (kp, m_i, nb_i):
        sch.unroll(loop)
    sch.vectorize(lane)  # before decompose_reduction: vectorize wants a whole reduction block
    init = sch.decompose_reduction(acc, kb)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch


def default_schedule(spec: dict, ref: bool = False) -> Schedule:
    """The hand schedule of a kernel spec (`qdense_func`): default tiles and depth, as `schedule_qdense`."""
    v = VARIANTS[spec["variant"]]
    if v.name == "amx":  # ``ref``: its plain-loop emulation
        return Schedule(_amx_func(spec, emulate=ref))
    depth = v.max_depth(spec["bits_a"], spec["bits_w"], spec["K"])
    mi, nbi = default_tiles(spec["M"], spec["N"], v, depth)
    mi = stack_rows(mi, spec["K"], v, spec.get("rows"))
    func = qdense_func(spec)
    if v.tensorized:
        block = column_block(spec["M"], spec["N"], spec["K"], v, nbi, spec["compensate"], bool(spec.get("rows")))
        return schedule_tensorized(func, v, mi, nbi, depth, ref, spec["compensate"], block)
    return schedule_fallback(func, v, mi, nbi, spec["compensate"])


def schedule_qdense(
    M: int, N: int, K: int, target=X86_VNNI_TARGET, *, bits_a: int = 8, bits_w: int = 8,
    variant: str = "auto", epilogue: bool = False, ref: bool = False,
    tiles: tuple[int, int] | None = None, depth: int | None = None, compensate: bool | None = None,
    gelu_codes: int | None = None, residual: bool = False, qkv_codes: dict | None = None,
    codes_operand: tuple[str, int | str] | None = None, a_rows: int | None = None, column_blocks: bool = True,
    prefetch: bool = True, column_codes: int | None = None,
) -> tuple[Schedule, Variant, tuple[int, int, int], bool]:
    """The scheduled qdense for ``target`` (not yet compiled), its variant and (rows, blocks, depth).

    ``variant`` "auto" = `choose_variant(target, bits_a, bits_w)`; an explicit variant must be
    exact for the bit widths (a saturating u8 x s8 kernel is refused, not built) and supported by
    the target.  ``ref`` swaps the intrinsic for its plain-loop twin (runs on any CPU; for tests).
    ``tiles`` = (rows, lane blocks) and ``depth`` (int16 pre-accumulation of u8 x s8) default to
    `default_tiles` and `Variant.max_depth`.  ``compensate`` (default: 8-bit weights on an int8
    variant) adds the in-kernel row-sum correction for weights offset into int8
    (`packing.weight_offset`); returns it as the last element.  ``gelu_codes`` = the top code 2^b − 1 fuses GELU
    and the next quantizer into the epilogue (uint8 output; the quantizer is the kernel's run-time ``quant``
    operand, `qdense`);
    ``codes_operand`` = (dtype, minus) stores those codes as the next kernel reads them (`epilogue.as_operand`;
    minus `epilogue.ZERO_POINT`: the quantizer's zero point, as the operand holds it);
    ``residual`` adds a float32 input ``res`` [M, N] to the result (a residual connection); ``qkv_codes``
    ({"tokens", "heads", "tops"}, AMX only: `qdense_amx.qdense_amx_func`) stores q, k and v codes in the attention
    kernels' layout, under the quantizers of its run-time ``quant`` operand; ``column_codes`` (the top code, not
    AMX) stores the uint8 codes of the result under a quantizer per column (`qdense`: the vector kernels' form of a
    qkv projection's codes).  ``a_rows``
    reads the activation rows through a row table (`qdense`; not the amx kernel).  ``column_blocks`` False keeps
    row tiles outer where `column_block` would block the column tiles (to compare the two orders); ``prefetch`` False
    leaves out the VNNI weight prefetch (`weight_prefetch`, likewise).
    """
    tails = (gelu_codes is not None) + residual + (qkv_codes is not None) + (column_codes is not None)
    if tails and not epilogue:
        raise ValueError("gelu_codes, residual, qkv_codes and column_codes need the float epilogue (epilogue=True)")
    if tails > 1:
        raise ValueError("one tail per kernel: gelu_codes, residual, qkv_codes or column_codes")
    if codes_operand is not None and gelu_codes is None:
        raise ValueError("codes_operand is the form of the gelu_codes: it needs gelu_codes")
    if gelu_codes is not None and (isinstance(gelu_codes, bool) or not isinstance(gelu_codes, int | np.integer)):
        raise TypeError(f"gelu_codes is the top code 2^b - 1 (the quantizer is the kernel's quant operand), "
                        f"got {gelu_codes!r}")
    if qkv_codes is not None and set(qkv_codes) != {"tokens", "heads", "tops"}:
        raise TypeError(f"qkv_codes is {{'tokens', 'heads', 'tops'}} (the quantizers are the kernel's quant operand), "
                        f"got keys {sorted(qkv_codes)}")
    if variant == "auto":
        v = choose_variant(target, bits_a, bits_w, (M, N, K) if epilogue and compensate is not False else None)
    elif variant in VARIANTS:
        v = VARIANTS[variant]
    else:
        raise ValueError(f"variant must be 'auto' or one of {tuple(VARIANTS)}, got {variant!r}")
    if v.name == "amx":
        if a_rows is not None:
            raise ValueError("the amx qdense reads its activation rows in order: no a_rows")
        if codes_operand is not None:
            raise ValueError("the amx qdense stores uint8 codes only (its consumers read them so): no codes_operand")
        if column_codes is not None:
            raise ValueError("the amx qdense stores a qkv projection's codes in head layout (qkv_codes), "
                             "no column_codes")
        return _schedule_amx(M, N, K, target, bits_a, bits_w, epilogue, ref, compensate, gelu_codes, residual,
                             qkv_codes, prefetch)
    if qkv_codes is not None:
        raise ValueError(f"qkv_codes needs the amx variant, not {v.name}")
    if codes_operand is not None and codes_operand[0] not in ("int16", "int8"):
        raise ValueError(f"codes_operand stores int16 or int8 codes, not {codes_operand[0]}")
    if compensate is None:
        compensate = bits_w >= 8 and v.w_dtype == "int8"
    if compensate and v.w_dtype != "int8":
        raise ValueError(f"{v.name} takes {v.w_dtype} weights: 8-bit centred weights fit, no compensation")
    depth = v.max_depth(bits_a, bits_w, K) if depth is None else depth
    if depth not in v.depths:
        raise ValueError(f"{v.name} has no depth-{depth} intrinsic")
    if not v.exact(bits_a, bits_w, depth):
        a_max, w_max = packing.code_bounds(bits_a, bits_w)
        raise ValueError(
            f"{v.name} (depth {depth}) is not exact for {bits_a}-bit activations x {bits_w}-bit "
            f"weights: 2*{depth}*{a_max}*{w_max} > {packing.INT16_PAIR_MAX} saturates int16; use avx2_i16"
        )
    if (ceil_to(K, v.kpack) // v.kpack) % depth:
        raise ValueError(f"depth {depth} must divide the {ceil_to(K, v.kpack) // v.kpack} k tiles")
    if v.feature and not ref and not target_has(target, v.feature):
        raise ValueError(f"target {as_target(target)} lacks {v.feature} needed by {v.name}")
    mi, nbi = tiles or default_tiles(M, N, v, depth)
    mi = mi if tiles else stack_rows(mi, K, v, a_rows)
    n_tiles = ceil_to(N, v.lanes) // v.lanes
    if n_tiles % nbi:
        raise ValueError(f"{nbi} lane blocks per tile must divide the {n_tiles} blocks of N")
    spec = {"kind": "qdense", "M": M, "N": N, "K": K, "variant": v.name, "bits_a": bits_a, "bits_w": bits_w,
            "epilogue": epilogue, "compensate": compensate, "m_tile": mi if v.tensorized else 1,
            **_tail_spec(gelu_codes, residual, None, codes_operand, column_codes),
            **({"rows": int(a_rows)} if a_rows else {})}
    func = qdense_func(spec)
    if v.tensorized:
        block = column_block(M, N, K, v, nbi, compensate, bool(a_rows)) if column_blocks else None
        sch = schedule_tensorized(func, v, mi, nbi, depth, ref, compensate, block, prefetch)
    else:
        sch = schedule_fallback(func, v, mi, nbi, compensate)
    return sch, v, (mi, nbi, depth), compensate


def _operand(entry) -> tuple[str, int | str] | None:
    """A spec's ``codes_operand`` ([dtype, minus] in JSON) as the tuple `qdense` takes."""
    return None if entry is None else (str(entry[0]), _minus(entry[1]))


def _minus(minus) -> int | str:
    return minus if minus == epilogue_ops.ZERO_POINT else int(minus)


def _tail_spec(gelu_codes, residual: bool, qkv_codes, codes_operand=None, column_codes=None) -> dict:
    """The spec entries of a fused tail (none without one: plain kernels keep their specs and tuning keys); of a
    codes tail its top codes only, the quantizers being the kernel's operands."""
    if gelu_codes is not None:
        operand = {} if codes_operand is None else {"codes_operand": [str(codes_operand[0]), _minus(codes_operand[1])]}
        return {"gelu_codes": {"top": int(gelu_codes)}, **operand}
    if residual:
        return {"residual": True}
    if qkv_codes is not None:
        return {"qkv_codes": {"tokens": int(qkv_codes["tokens"]), "heads": int(qkv_codes["heads"]),
                              "tops": [int(t) for t in qkv_codes["tops"]]}}
    if column_codes is not None:
        return {"column_codes": {"top": int(column_codes)}}
    return {}


def _schedule_amx(M, N, K, target, bits_a, bits_w, epilogue, ref, compensate, gelu_codes, residual, qkv_codes=None,
                  prefetch=True):
    """`schedule_qdense` for the AMX kernel: always compensated, always with the epilogue (`qdense_amx`)."""
    v = VARIANTS["amx"]
    packing.code_bounds(bits_a, bits_w)  # validates
    if not epilogue or compensate is False:
        raise ValueError("the amx qdense exists only compensated and with the float epilogue")
    if not qdense_amx.fits(M, N, K):
        raise ValueError(f"amx qdense needs M >= {qdense_amx.ROWS}, N % {qdense_amx.COLS} == 0 and K padded to 4 "
                         f"a multiple of {qdense_amx.K_STEP}, got {M}x{N}x{K}")
    if not ref and not target_has(target, v.feature):
        raise ValueError(f"target {as_target(target)} lacks {v.feature} needed by amx")
    spec = {"kind": "qdense", "M": M, "N": N, "K": K, "variant": "amx", "bits_a": bits_a, "bits_w": bits_w,
            "epilogue": True, "compensate": True, "m_tile": qdense_amx.ROWS,
            **_tail_spec(gelu_codes, residual, qkv_codes)}
    return Schedule(_amx_func(spec, ref, prefetch)), v, (qdense_amx.ROWS, qdense_amx.COLS // v.lanes, 1), True
