"""Integer batched matmul for attention logits: ``out[b, m, n] = float(sum_d (A - z_a)(B - z_b)) * scale``.

Why: ``q @ k^T`` has two activation operands, so nothing can be packed at compile time.  The kernel
centres both sides to int16 in a cheap per-batch prologue (``O(M*D + N*D)`` against ``O(M*N*D)``),
packs k into the ``[N/8, D/2, 8, 2]`` tiles of the AVX2 ``vpmaddwd`` intrinsic (`i16_intrin`) and
runs the register-tiled schedule of `qdense` on it; every batch is one parallel task.  int16 is exact
for any code width up to 8 bits (|centred| <= 255), the sum is int32, one float multiply per output.

Inputs: A uint8 ``[Bt, M, D]``; B uint8 ``[Bt, N, D]`` (``b_layout="nd"``, k rows) or ``[Bt, D, N]``
(``"dn"``, the transposed k the graph already has); ``zp`` int32 ``[2] = (z_a, z_b)``; ``scale`` float32
``[1]``.  Zero points and scale are run-time operands, so all layers of one shape share one kernel.
Targets without AVX2 (aarch64) get the same compute with plain vectorized loops.

Zen 3, 1 thread (`benchmarks/kernel_qk.py`): ~50 GMAC/s on 6x197x197x64, about 2x torch fp32; the
centring and packing are ~7% of that.  AVX2 u8 x s8 (vpmaddubsw, ~1.5x in `qdense`) would be exact
for 4/6-bit codes but needs a per-column zero-point correction; not done (q @ k^T is ~4% of DeiT-S).

VNNI targets (``variant="vnni"``) run ``vpdpbusd`` on q's raw u8 codes against ``k - 128`` packed as
s8 ``[N/16, D/4, 16, 4]`` (exact for any u8 k), with the zero points folded into the epilogue like the
linears' compensation: with ``c = 128 - z_k``,
``sum_d (q - z_q)(k - z_k) = sum_d q*k' + c*qsum[m] - z_q*(ksum[n] - z_k*D)`` where ``k' = k - 128``
and ``qsum`` / ``ksum`` are the row sums of the q and k codes, computed per batch in the kernel
(O(M*D + N*D)).

aarch64 targets with the dot-product extension (``variant="neon_sdot"``, LLVM ``dotprod``) run ``sdot``
(s8 x s8 -> int32, 16 MACs, `intrinsics_arm.sdot_intrin`).  Both sides are centred on 128, exact in int8
for any u8 code: ``q' = q - 128`` in rows ``[M, D]``, ``k' = k - 128`` packed ``[N/4, D/4, 4, 4]`` (one q
register per 4 columns x 4 d); with ``c_q = 128 - z_q`` and ``c_k = 128 - z_k`` (``q - z_q = q' + c_q``):
``sum_d (q - z_q)(k - z_k) = sum_d q'k' + c_k * sum_d q' + c_q * (sum_d k' + c_k * D)``.  The two
zero-point terms (one per row, one per column, O(M*D + N*D) per batch) are the accumulators' start
value, so the epilogue is one convert and one multiply per 4 outputs.  No partial sum exceeds
``(128*128 + 255*128 + 255*255) * D`` in magnitude, inside the int32 bound the depth check enforces.
Register tiles and their order are chosen from llvm-mca estimates (no ARM hardware here; see
`SDOT_TILES`); README "ARM (aarch64)" has the figures.  Every other aarch64 target keeps "fallback".
"""

from __future__ import annotations

import json

import tvm
from tvm import te
from tvm.s_tir import Schedule
from tvm.script import tirx as T

from ..relax_util import scheduled_kernel
from ..targets import target_has
from .intrinsics_arm import register_intrinsics as register_arm_intrinsics
from .intrinsics_arm import sdot_intrin
from .intrinsics_x86 import i16_intrin, ref_name, register_intrinsics, vnni_intrin
from .packing import ceil_to

LANES, KPACK = 8, 2  # the int16 intrinsic: 8 int32 outputs x 2 consecutive d
VNNI_LANES, VNNI_KPACK = 16, 4  # vpdpbusd: 16 int32 outputs x 4 consecutive d
SDOT_LANES, SDOT_KPACK, SDOT_DEPTH = 4, 4, 2  # sdot: 4 int32 outputs x 4 consecutive d; 2 d tiles per step
# (rows, lane blocks) per register tile; VNNI: 3 x 4 = 12 zmm accumulators (4 blocks of 16 cover the
# 65 / 197 columns of the fixture / DeiT with little padding); sdot: see SDOT_TILES
DEFAULT_TILES = {"avx2_i16": (6, 2), "fallback": (6, 2), "vnni": (3, 4), "neon_sdot": (6, 3)}
VARIANTS = tuple(DEFAULT_TILES)
# sdot register tiles (rows, 4-lane blocks) per tile order, in order of preference; within an order the
# llvm-mca estimates (Cortex-A76 / Neoverse N1) of these tiles are within ~1 MAC/cycle of each other, so
# padding decides: `default_tiles` takes the first whose padded outputs are within 2% of the fewest.
# "rows" (row tiles outer; head dim > 32, the d loop stays a loop): 6 x 3 = 18 q accumulators + 6 k' +
# 6 q' registers, 5 x 4 = 20 + 8 + 5 (LLVM loads a q' row just before its 8 sdot), 5 x 3; no spills.
# "cols" (column tiles outer; head dim <= 32, where LLVM unrolls the whole d loop): a column tile's k'
# (2 blocks x D/4 = 16 q registers at D = 32) stays loaded across its row tiles (LLVM keeps some on the
# stack: reloads, no stores), 10-12 accumulators.  Row tiles outer at D = 32 made LLVM hoist the q' lane
# splats out of the column loop instead and spill them (3 - 4 MACs/cycle less in the estimates).
SDOT_TILES = {"rows": ((6, 3), (5, 4), (5, 3)), "cols": ((5, 2), (6, 2), (4, 2))}
SDOT_SHORT_D = 32


def sdot_order(D: int) -> str:
    """Tile order of the sdot schedule: "cols" when the padded head dim is at most `SDOT_SHORT_D`."""
    return "cols" if ceil_to(D, SDOT_KPACK * SDOT_DEPTH) <= SDOT_SHORT_D else "rows"


def variant_for(target) -> str:
    """"vnni" on AVX-512 VNNI targets, "avx2_i16" on AVX2, "neon_sdot" on aarch64 with the dot-product
    extension (LLVM ``dotprod``), else "fallback" (plain loops, any CPU; NEON smull/smlal on aarch64)."""
    if target_has(target, "avx512vnni"):
        return "vnni"
    if target_has(target, "dotprod"):
        return "neon_sdot"
    return "avx2_i16" if target_has(target, "avx2") else "fallback"


def default_tiles(M: int, variant: str, N: int | None = None, D: int | None = None) -> tuple[int, int]:
    """(rows, lane blocks) per register tile: 6 x 2 (12 ymm accumulators) was fastest on Zen 3 for
    both benchmark shapes; rows in [3, 6] wasting the fewest padded rows (65 -> 5, 197 -> 6).

    neon_sdot with ``N`` (and ``D``, default 64) given: the first `SDOT_TILES` entry of the tile order
    (`sdot_order`) whose padded outputs are within 2% of the fewest, rows and blocks capped at M and
    the 4-lane blocks N needs: 65 x 65 x 64 -> 6 x 3, 197 x 197 x 64 -> 6 x 3, 65 x 65 x 32 -> 5 x 2."""
    if variant == "neon_sdot" and N is not None:
        blocks = ceil_to(N, SDOT_LANES) // SDOT_LANES
        options = [(min(mi, M), min(nb, blocks)) for mi, nb in SDOT_TILES[sdot_order(D or 64)]]
        padded = [ceil_to(M, mi) * ceil_to(N, SDOT_LANES * nb) for mi, nb in options]
        return next(t for t, p in zip(options, padded) if p <= 1.02 * min(padded))
    mi, nbi = DEFAULT_TILES[variant]
    if M <= mi:
        return M, nbi
    return min(range(mi, (mi - 1) // 2, -1), key=lambda t: ceil_to(M, t) - M), nbi


def _packed_acc(a: te.Tensor, packed: te.Tensor, M: int, m_p: int, n_p: int, d_p: int) -> te.Tensor:
    """int32 ``acc[b, m, n] = sum_d a[b, m, d] * packed[b, n/L, d/P, n%L, d%P]`` on whole register tiles
    (``m_p`` rows: padded rows read row M-1 again and are never stored); L, P from the packed layout."""
    Bt, L, P = a.shape[0], packed.shape[3], packed.shape[4]
    row = (lambda m: te.min(m, M - 1)) if m_p != M else (lambda m: m)
    d = te.reduce_axis((0, d_p), name="d")
    return te.compute(
        (Bt, m_p, n_p),
        lambda b, m, n: te.sum(a[b, row(m), d].astype("int32")
                               * packed[b, n // L, d // P, n % L, d % P].astype("int32"), axis=d),
        name="acc",
    )


def qbmm(Bt: int, M: int, N: int, D: int, *, b_layout: str = "nd", tiles=(6, 2)) -> list[te.Tensor]:
    """TE compute ``[A, B, zp, scale, out]``; rows/columns are padded to whole register tiles.

    Padded rows read row M-1 again (clamped) and are never stored; padded columns and d are zeros.
    """
    if b_layout not in ("nd", "dn"):
        raise ValueError(f"b_layout must be 'nd' or 'dn', got {b_layout!r}")
    if D * 255 * 255 >= 2**31:
        raise ValueError(f"depth {D} could overflow the int32 accumulator")
    mi, nbi = tiles
    m_p, n_p, d_p = ceil_to(M, mi), ceil_to(N, LANES * nbi), ceil_to(D, KPACK)
    A = te.placeholder((Bt, M, D), "uint8", name="A")
    B = te.placeholder((Bt, N, D) if b_layout == "nd" else (Bt, D, N), "uint8", name="B")
    zp = te.placeholder((2,), "int32", name="zp")
    scale = te.placeholder((1,), "float32", name="scale")

    def centred(x, z, inside):
        v = (x.astype("int32") - z).astype("int16")
        return v if inside is None else te.if_then_else(inside, v, tvm.tirx.const(0, "int16"))

    def in_d(d):
        return None if d_p == D else d < D

    def rows16(X, z, rows, name):
        return te.compute((Bt, rows, d_p), lambda b, r, d: centred(X[b, r, te.min(d, D - 1)], z, in_d(d)), name=name)

    a16 = rows16(A, zp[0], M, "a16")
    if b_layout == "nd":  # centre rows with whole vectors, then the pack is a dword shuffle
        k16 = rows16(B, zp[1], N, "k16")

    def b_at(b, nb, db, l, p):
        n, d = nb * LANES + l, db * KPACK + p
        n_c = te.min(n, N - 1) if n_p != N else n
        if b_layout == "nd":
            x = k16[b, n_c, d]
            return x if n_p == N else te.if_then_else(n < N, x, tvm.tirx.const(0, "int16"))
        conds = [c for c in (n < N if n_p != N else None, in_d(d)) if c is not None]
        return centred(B[b, te.min(d, D - 1), n_c], zp[1], tvm.tirx.all(*conds) if conds else None)

    b16 = te.compute((Bt, n_p // LANES, d_p // KPACK, LANES, KPACK), b_at, name="b16")
    acc = _packed_acc(a16, b16, M, m_p, n_p, d_p)
    out = te.compute((Bt, M, N), lambda b, m, n: acc[b, m, n].astype("float32") * scale[0], name="out")
    return [A, B, zp, scale, out]


def qbmm_vnni(Bt: int, M: int, N: int, D: int, *, b_layout: str = "nd", tiles=(3, 4)) -> list[te.Tensor]:
    """TE compute ``[A, B, zp, scale, out]`` of the VNNI variant (see the module docstring).

    A is read in place (u8 codes are already the unsigned operand) unless D needs padding to 4.
    """
    if b_layout not in ("nd", "dn"):
        raise ValueError(f"b_layout must be 'nd' or 'dn', got {b_layout!r}")
    if D * 255 * 255 * 2 >= 2**31:
        raise ValueError(f"depth {D} could overflow the int32 accumulator")
    L, P = VNNI_LANES, VNNI_KPACK
    mi, nbi = tiles
    m_p, n_p, d_p = ceil_to(M, mi), ceil_to(N, L * nbi), ceil_to(D, P)
    A = te.placeholder((Bt, M, D), "uint8", name="A")
    B = te.placeholder((Bt, N, D) if b_layout == "nd" else (Bt, D, N), "uint8", name="B")
    zp = te.placeholder((2,), "int32", name="zp")
    scale = te.placeholder((1,), "float32", name="scale")
    zero8 = tvm.tirx.const(0, "uint8")
    a8 = A if d_p == D else te.compute(
        (Bt, M, d_p), lambda b, m, d: te.if_then_else(d < D, A[b, m, te.min(d, D - 1)], zero8), name="a8")

    def k_at(b, n, d):  # k - 128 as s8 (0 in the padding)
        n_c, d_c = te.min(n, N - 1), te.min(d, D - 1)
        x = B[b, n_c, d_c] if b_layout == "nd" else B[b, d_c, n_c]
        v = (x.astype("int32") - 128).astype("int8")
        return te.if_then_else(tvm.tirx.all(n < N, d < D), v, tvm.tirx.const(0, "int8"))

    b8 = te.compute((Bt, n_p // L, d_p // P, L, P), lambda b, nb, db, l, p: k_at(b, nb * L + l, db * P + p),
                    name="b8")
    # row sums of the raw codes, read where they are contiguous (LLVM vectorizes the sums)
    dq = te.reduce_axis((0, D), name="dq")
    qsum = te.compute((Bt, M), lambda b, m: te.sum(A[b, m, dq].astype("int32"), axis=dq), name="qsum")
    dk = te.reduce_axis((0, D), name="dk")
    k_raw = (lambda b, n, d: B[b, n, d]) if b_layout == "nd" else (lambda b, n, d: B[b, d, n])
    ksum = te.compute((Bt, N), lambda b, n: te.sum(k_raw(b, n, dk).astype("int32"), axis=dk), name="ksum")
    acc = _packed_acc(a8, b8, M, m_p, n_p, d_p)
    # sum_d k'[n, d] = ksum[n] - 128*D, so z_q*(sum k' + c*D) = z_q*(ksum[n] - z_k*D)
    out = te.compute(
        (Bt, M, N),
        lambda b, m, n: (acc[b, m, n] + (128 - zp[1]) * qsum[b, m] - zp[0] * (ksum[b, n] - zp[1] * D)
                         ).astype("float32") * scale[0],
        name="out")
    return [A, B, zp, scale, out]


def qbmm_spec(Bt: int, M: int, N: int, D: int, *, b_layout: str = "nd", variant: str = "vnni",
              tiles: tuple[int, int] = (3, 4), depth: int = SDOT_DEPTH) -> dict:
    """The kernel spec: everything that determines the compute, the tile it was padded for included (``m_tile``
    rows, ``n_tile`` = lanes x blocks columns; "neon_sdot" also its d tiles per step, ``depth``, which pads D);
    `repq_tvm.tuning.spaces` keys on it."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    mi, nbi = tiles
    spec = {"kind": "qbmm", "Bt": Bt, "M": M, "N": N, "D": D, "b_layout": b_layout, "variant": variant,
            "m_tile": mi, "n_tile": spec_lanes(variant) * nbi}
    return {**spec, "depth": depth} if variant == "neon_sdot" else spec


def spec_lanes(variant: str) -> int:
    """int32 lanes of a lane block of the variant."""
    return {"vnni": VNNI_LANES, "neon_sdot": SDOT_LANES}.get(variant, LANES)


def qbmm_func(spec: dict) -> tvm.tirx.PrimFunc:
    """The unscheduled PrimFunc of a spec (`qbmm_spec`), carrying it as its ``repq.kernel`` attribute."""
    tiles = (spec["m_tile"], spec["n_tile"] // spec_lanes(spec["variant"]))
    args = (spec["Bt"], spec["M"], spec["N"], spec["D"])
    if spec["variant"] == "neon_sdot":
        func = qbmm_sdot(*args, b_layout=spec["b_layout"], tiles=tiles, depth=spec["depth"])
    else:
        compute = qbmm_vnni if spec["variant"] == "vnni" else qbmm
        func = te.create_prim_func(compute(*args, b_layout=spec["b_layout"], tiles=tiles))
    return func.with_attr("repq.kernel", json.dumps(spec, sort_keys=True))


def apply_schedule(sch: Schedule, spec: dict, mi, nbi: int, ref: bool = False, order: str | None = None) -> Schedule:
    """The register-tiled schedule of the spec's variant on ``sch`` (holding its `qbmm_func`): tiles of ``mi``
    rows (an int or a sampled ExprRV dividing the padded rows) x ``nbi`` lane blocks (dividing N's padded
    blocks); ``order`` the sdot tile order (`sdot_order`)."""
    if spec["variant"] == "vnni":
        return _apply_vnni(sch, spec["D"], mi, nbi, ref)
    if spec["variant"] == "neon_sdot":
        return _apply_sdot(sch, mi, nbi, spec["depth"], order or sdot_order(spec["D"]), ref)
    return _apply_i16(sch, spec["variant"], spec["b_layout"], mi, nbi, ref)


def default_schedule(spec: dict, ref: bool = False) -> Schedule:
    """The hand schedule of a spec: the tile its compute was padded for (`schedule_qbmm`)."""
    nbi = spec["n_tile"] // spec_lanes(spec["variant"])
    return apply_schedule(Schedule(qbmm_func(spec)), spec, spec["m_tile"], nbi, ref)


def schedule_qbmm_vnni(Bt: int, M: int, N: int, D: int, *, b_layout: str = "nd",
                       tiles: tuple[int, int] | None = None, ref: bool = False) -> Schedule:
    """Per batch (the parallel loop): pack k - 128, row sums of q and k', then register tiles of
    ``vpdpbusd`` (rows x 16-lane blocks, int32 accumulators in zmm over the whole d loop) and the
    compensated epilogue.  Driven from `out` (acc `compute_at` its tiles): the epilogue has three
    producers.  ``ref``: the plain-loop twin of the intrinsic (any CPU; the portable stand-in)."""
    mi, nbi = tiles or default_tiles(M, "vnni")
    spec = qbmm_spec(Bt, M, N, D, b_layout=b_layout, variant="vnni", tiles=(min(mi, M), nbi))
    return default_schedule(spec, ref)


def _apply_vnni(sch: Schedule, D: int, mi, nbi: int, ref: bool) -> Schedule:
    acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
    b, m, n = sch.get_loops(out)
    mo, mo_i = sch.split(m, [None, mi])
    nbo, no_i = sch.split(n, [None, nbi * VNNI_LANES])
    sch.reorder(b, mo, nbo, mo_i, no_i)
    sch.compute_at(acc, nbo, preserve_unit_loops=True)
    m_i, n_t, d = sch.get_loops(acc)[-3:]
    nb_i, lane = sch.split(n_t, [nbi, VNNI_LANES])
    db, dp = sch.split(d, [None, VNNI_KPACK])
    sch.reorder(db, m_i, nb_i, lane, dp)
    sch.vectorize(sch.split(no_i, [None, VNNI_LANES])[1])
    names = ["ksum", "qsum", "b8"] + (["a8"] if D % VNNI_KPACK else [])
    for name in names:  # per batch, in L1/L2, before the tiles
        sch.compute_at(sch.get_sblock(name), b, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(sch.get_sblock("b8"))[-1])
    # Ragged N: LoopPartition splits off the last column tile, so the others' epilogue stays vector code
    sch.annotate(nbo, "pragma_loop_partition_hint", 1)
    sch.parallel(b)
    register_intrinsics()
    init = sch.decompose_reduction(acc, db)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(lane, ref_name(vnni_intrin()) if ref else vnni_intrin())
    sch.unroll(m_i)
    sch.unroll(nb_i)
    return sch


def qbmm_sdot(Bt: int, M: int, N: int, D: int, *, b_layout: str = "nd", tiles=(6, 3),
              depth: int = SDOT_DEPTH) -> tvm.tirx.PrimFunc:
    """Unscheduled PrimFunc ``main(A, B, zp, scale, out)`` of the Arm dot-product variant (module docstring).

    Both operands centred on 128 as s8: ``q' = q - 128`` ``[Bt, Mp, Dp]`` (padded rows repeat row M-1 and
    are never stored: a tile's rows are then one base address plus constant offsets) and ``k' = k - 128``
    packed ``[Bt, Np/4, Dp/4, 4, 4]``, zeros in the padding, Dp a multiple of ``4 * depth``.  The
    accumulator starts at the zero-point terms ``qterm[m] + kterm[n]``, so the epilogue is a convert and a
    multiply.  TVMScript rather than TE: `te.create_prim_func` drops a reduction's ``init`` value.
    """
    if b_layout not in ("nd", "dn"):
        raise ValueError(f"b_layout must be 'nd' or 'dn', got {b_layout!r}")
    if D * 255 * 255 * 2 >= 2**31:
        raise ValueError(f"depth {D} could overflow the int32 accumulator")
    L, P = SDOT_LANES, SDOT_KPACK
    mi, nbi = tiles
    m_p, n_p, d_p = ceil_to(M, mi), ceil_to(N, L * nbi), ceil_to(D, P * depth)
    nd = b_layout == "nd"
    b_shape = (Bt, N, D) if nd else (Bt, D, N)
    pad_m, pad_d = m_p != M, d_p != D

    @T.prim_func(s_tir=True)
    def main(A: T.Buffer((Bt, M, D), "uint8"), B: T.Buffer(b_shape, "uint8"), zp: T.Buffer((2,), "int32"),
             scale: T.Buffer((1,), "float32"), out: T.Buffer((Bt, M, N), "float32")):
        T.func_attr({"tirx.noalias": True})
        a8 = T.sblock_alloc_buffer((Bt, m_p, d_p), "int8")
        k8 = T.sblock_alloc_buffer((Bt, n_p, d_p), "int8")
        qsum = T.sblock_alloc_buffer((Bt, m_p), "int32")
        ksum = T.sblock_alloc_buffer((Bt, n_p), "int32")
        qterm = T.sblock_alloc_buffer((Bt, m_p), "int32")
        kterm = T.sblock_alloc_buffer((Bt, n_p), "int32")
        b8 = T.sblock_alloc_buffer((Bt, n_p // L, d_p // P, L, P), "int8")
        acc = T.sblock_alloc_buffer((Bt, m_p, n_p), "int32")
        for b in range(Bt):  # per batch, the stages in this order (the schedule keeps it; see acc)
            # q' and k' in rows [Mp | Np, Dp], centred with whole vectors along the contiguous axis of
            # the codes (dn: k is read down its columns); padded rows repeat the last one (q') or are 0 (k')
            for m, d in T.grid(m_p, d_p):
                with T.sblock("a8"):
                    vb, vm, vd = T.axis.remap("SSS", [b, m, d])
                    if pad_m or pad_d:
                        a8[vb, vm, vd] = T.if_then_else(
                            vd < D, T.Cast("int8", T.Cast("int32", A[vb, T.min(vm, M - 1), T.min(vd, D - 1)]) - 128),
                            T.int8(0))
                    else:
                        a8[vb, vm, vd] = T.Cast("int8", T.Cast("int32", A[vb, vm, vd]) - 128)
            for n, d in T.grid(n_p, d_p):
                with T.sblock("k8"):
                    vb, vn, vd = T.axis.remap("SSS", [b, n, d])
                    if nd:
                        k8[vb, vn, vd] = T.if_then_else(
                            vn < N and vd < D,
                            T.Cast("int8", T.Cast("int32", B[vb, T.min(vn, N - 1), T.min(vd, D - 1)]) - 128),
                            T.int8(0))
                    else:
                        k8[vb, vn, vd] = T.if_then_else(
                            vn < N and vd < D,
                            T.Cast("int8", T.Cast("int32", B[vb, T.min(vd, D - 1), T.min(vn, N - 1)]) - 128),
                            T.int8(0))
            # sum (q - z_q)(k - z_k) = sum q'k' + (128 - z_k) * sum q' + (128 - z_q) * (sum k' + (128 - z_k) D)
            for m, d in T.grid(m_p, d_p):
                with T.sblock("qsum"):
                    vb, vm, vd = T.axis.remap("SSR", [b, m, d])
                    with T.init():
                        qsum[vb, vm] = 0
                    qsum[vb, vm] = qsum[vb, vm] + T.Cast("int32", a8[vb, vm, vd])
            for n, d in T.grid(n_p, d_p):
                with T.sblock("ksum"):
                    vb, vn, vd = T.axis.remap("SSR", [b, n, d])
                    with T.init():
                        ksum[vb, vn] = 0
                    ksum[vb, vn] = ksum[vb, vn] + T.Cast("int32", k8[vb, vn, vd])
            for m in range(m_p):
                with T.sblock("qterm"):
                    vb, vm = T.axis.remap("SS", [b, m])
                    qterm[vb, vm] = (128 - zp[1]) * qsum[vb, vm]
            for n in range(n_p):
                with T.sblock("kterm"):
                    vb, vn = T.axis.remap("SS", [b, n])
                    kterm[vb, vn] = (128 - zp[0]) * (ksum[vb, vn] + (128 - zp[1]) * D)
            for nb, db, ln, p in T.grid(n_p // L, d_p // P, L, P):  # the pack: a copy of 4-byte words
                with T.sblock("b8"):
                    vb, vnb, vdb, vl, vp = T.axis.remap("SSSSS", [b, nb, db, ln, p])
                    b8[vb, vnb, vdb, vl, vp] = k8[vb, vnb * L + vl, vdb * P + vp]
            for m, n, d in T.grid(m_p, n_p, d_p):
                with T.sblock("acc"):
                    vb, vm, vn, vd = T.axis.remap("SSSR", [b, m, n, d])
                    # The accumulator starts at the zero-point terms, so the epilogue is a convert and a
                    # multiply.  Declared reads are the update's only (what the tensor intrinsic reads):
                    # qterm / kterm are computed before acc by this loop nest, not placed by compute_at.
                    T.reads(a8[vb, vm, vd], b8[vb, vn // L, vd // P, vn % L, vd % P])
                    T.writes(acc[vb, vm, vn])
                    with T.init():
                        acc[vb, vm, vn] = qterm[vb, vm] + kterm[vb, vn]
                    acc[vb, vm, vn] = acc[vb, vm, vn] + T.Cast("int32", a8[vb, vm, vd]) * T.Cast(
                        "int32", b8[vb, vn // L, vd // P, vn % L, vd % P])
            for m, n in T.grid(M, N):
                with T.sblock("out"):
                    vb, vm, vn = T.axis.remap("SSS", [b, m, n])
                    out[vb, vm, vn] = T.Cast("float32", acc[vb, vm, vn]) * scale[0]

    return main


def schedule_qbmm_sdot(Bt: int, M: int, N: int, D: int, *, b_layout: str = "nd",
                       tiles: tuple[int, int] | None = None, depth: int | None = None,
                       order: str | None = None, ref: bool = False) -> Schedule:
    """Per batch (the parallel loop, stages in `qbmm_sdot`'s order): centre q and k, row sums and the
    zero-point terms, pack k', then register tiles of ``sdot``: rows x 4-lane blocks of int32
    accumulators in q registers over the whole d loop, ``depth`` (default 2) d tiles per step sharing
    one 8-byte load of a q' row, read lane by lane by the indexed ``sdot v.4s, v.16b, v.4b[j]``; each
    tile ends with a convert and a multiply.  ``order`` (default `sdot_order(D)`): "rows" puts row tiles
    outer, "cols" column tiles.  ``ref``: the plain-loop twin of the intrinsic (any CPU; the portable
    stand-in)."""
    mi, nbi = tiles or default_tiles(M, "neon_sdot", N, D)
    spec = qbmm_spec(Bt, M, N, D, b_layout=b_layout, variant="neon_sdot", tiles=(min(mi, M), nbi),
                     depth=depth or SDOT_DEPTH)
    return apply_schedule(Schedule(qbmm_func(spec)), spec, spec["m_tile"], nbi, ref, order)


def _apply_sdot(sch: Schedule, mi, nbi: int, depth: int, order: str, ref: bool) -> Schedule:
    L, P = SDOT_LANES, SDOT_KPACK
    if order not in ("rows", "cols"):
        raise ValueError(f"order must be 'rows' or 'cols', got {order!r}")
    acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
    b, m, n = sch.get_loops(out)
    mo, mo_i = sch.split(m, [None, mi])
    nbo, no_i = sch.split(n, [None, nbi * L])
    if order == "cols":
        sch.reorder(nbo, mo, mo_i, no_i)
        tile = mo
    else:
        sch.reorder(mo, nbo, mo_i, no_i)
        tile = nbo
    sch.compute_at(acc, tile, preserve_unit_loops=True)
    m_i, n_t, d = sch.get_loops(acc)[-3:]
    nb_i, lane = sch.split(n_t, [nbi, L])
    if depth == 1:  # the depth-1 intrinsic has no tile loop (tensorize is structural)
        (db, dp), kd = sch.split(d, [None, P]), lane
        sch.reorder(db, m_i, nb_i, lane, dp)
    else:
        db, kd, dp = sch.split(d, [None, depth, P])
        sch.reorder(db, m_i, nb_i, kd, lane, dp)
    sch.vectorize(sch.split(no_i, [None, L])[1])
    for name in ("b8", "a8", "k8"):
        sch.vectorize(sch.get_loops(sch.get_sblock(name))[-1])
    # Ragged M / N: LoopPartition splits off the last row / column tile, so the others store whole vectors
    for loop in (mo, nbo):
        sch.annotate(loop, "pragma_loop_partition_hint", 1)
    sch.parallel(b)
    init = sch.decompose_reduction(acc, db)
    sch.vectorize(sch.get_loops(init)[-1])
    register_arm_intrinsics()
    intrin = sdot_intrin(depth)
    sch.tensorize(kd, ref_name(intrin) if ref else intrin)
    sch.unroll(m_i)
    sch.unroll(nb_i)
    return sch


def schedule_qbmm(Bt: int, M: int, N: int, D: int, target, *, b_layout: str = "nd",
                  tiles: tuple[int, int] | None = None, variant: str | None = None,
                  ref: bool = False) -> tuple[Schedule, str]:
    """Scheduled kernel for ``target`` and its variant name ("vnni", "neon_sdot", "avx2_i16" or "fallback").

    ``variant`` overrides `variant_for(target)`; ``ref`` swaps in the intrinsic's plain-loop twin so the
    schedule runs on any CPU.

    Per batch (the parallel loop): centre A, centre and pack B, then register tiles (rows x 8-lane
    blocks) whose int32 accumulators stay in ymm registers over the whole d loop, scaled to float
    as each tile finishes.  Parallel over batches only: Bt = batch x heads (x windows) is >= 4 here.
    """
    variant = variant or variant_for(target)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "vnni":
        if not ref and not target_has(target, "avx512vnni"):
            raise ValueError("the vnni variant needs a target with avx512vnni (or ref=True)")
        return schedule_qbmm_vnni(Bt, M, N, D, b_layout=b_layout, tiles=tiles, ref=ref), variant
    if variant == "neon_sdot":
        if not ref and not target_has(target, "dotprod"):
            raise ValueError("the neon_sdot variant needs an aarch64 target with dotprod (or ref=True)")
        return schedule_qbmm_sdot(Bt, M, N, D, b_layout=b_layout, tiles=tiles, ref=ref), variant
    mi, nbi = tiles or default_tiles(M, variant)
    spec = qbmm_spec(Bt, M, N, D, b_layout=b_layout, variant=variant, tiles=(min(mi, M), nbi))
    return default_schedule(spec, ref), variant


def _apply_i16(sch: Schedule, variant: str, b_layout: str, mi, nbi: int, ref: bool) -> Schedule:
    acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
    b, m, n, d = sch.get_loops(acc)
    mo, m_i = sch.split(m, [None, mi])
    nb, lane = sch.split(n, [None, LANES])
    nbo, nb_i = sch.split(nb, [None, nbi])
    db, dp = sch.split(d, [None, KPACK])
    sch.reorder(b, mo, nbo, db, m_i, nb_i, lane, dp)
    sch.reverse_compute_at(out, nbo, preserve_unit_loops=True)
    sch.vectorize(sch.split(sch.get_loops(out)[-1], [None, LANES])[1])
    for name in ("b16", "k16", "a16") if b_layout == "nd" else ("b16", "a16"):  # per batch: in L1/L2
        blk = sch.get_sblock(name)
        sch.compute_at(blk, b, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(blk)[-1])
    # Ragged N: LoopPartition splits off the last column tile (and pack block), so the others
    # carry no `n < N` test and their epilogue / packing stay vector code.
    for loop in (nbo, sch.get_loops(sch.get_sblock("b16"))[2]):
        sch.annotate(loop, "pragma_loop_partition_hint", 1)
    sch.parallel(b)
    if variant == "avx2_i16":
        register_intrinsics()
        init = sch.decompose_reduction(acc, db)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.tensorize(lane, ref_name(i16_intrin()) if ref else i16_intrin())
    else:
        sch.reorder(dp, m_i, nb_i, lane)
        sch.unroll(dp)
        sch.vectorize(lane)  # before decompose_reduction: vectorize wants a whole reduction block
        init = sch.decompose_reduction(acc, db)
        sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(m_i)
    sch.unroll(nb_i)
    return sch


def qbmm_primfunc(Bt: int, M: int, N: int, D: int, target, *, b_layout: str = "nd") -> tuple[tvm.tirx.PrimFunc, str]:
    """The scheduled PrimFunc (``main(A, B, zp, scale, out)``, marked scheduled) and a unique name for it."""
    sch, variant = schedule_qbmm(Bt, M, N, D, target, b_layout=b_layout)
    name = f"repq_qbmm_{variant}_{Bt}x{M}x{N}x{D}_{b_layout}"
    func = scheduled_kernel(sch, name)
    return func, name
