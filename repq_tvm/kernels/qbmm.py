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
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te
from tvm.s_tir import Schedule

from ..relax_util import scheduled_kernel
from ..targets import as_target, check_runnable, target_has
from .intrinsics_x86 import i16_intrin, ref_name, register_intrinsics, vnni_intrin
from .packing import ceil_to

LANES, KPACK = 8, 2  # the int16 intrinsic: 8 int32 outputs x 2 consecutive d
VNNI_LANES, VNNI_KPACK = 16, 4  # vpdpbusd: 16 int32 outputs x 4 consecutive d
# (rows, lane blocks) per register tile; VNNI: 3 x 4 = 12 zmm accumulators (4 blocks of 16 cover the
# 65 / 197 columns of the fixture / DeiT with little padding)
DEFAULT_TILES = {"avx2_i16": (6, 2), "fallback": (6, 2), "vnni": (3, 4)}
VARIANTS = tuple(DEFAULT_TILES)


def variant_for(target) -> str:
    """"vnni" on AVX-512 VNNI targets, "avx2_i16" on AVX2, else "fallback" (plain loops, any CPU)."""
    if target_has(target, "avx512vnni"):
        return "vnni"
    return "avx2_i16" if target_has(target, "avx2") else "fallback"


def default_tiles(M: int, variant: str) -> tuple[int, int]:
    """(rows, 8-lane blocks) per register tile: 6 x 2 (12 ymm accumulators) was fastest on Zen 3 for
    both benchmark shapes; rows in [3, 6] wasting the fewest padded rows (65 -> 5, 197 -> 6)."""
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


def schedule_qbmm_vnni(Bt: int, M: int, N: int, D: int, *, b_layout: str = "nd",
                       tiles: tuple[int, int] | None = None, ref: bool = False) -> Schedule:
    """Per batch (the parallel loop): pack k - 128, row sums of q and k', then register tiles of
    ``vpdpbusd`` (rows x 16-lane blocks, int32 accumulators in zmm over the whole d loop) and the
    compensated epilogue.  Driven from `out` (acc `compute_at` its tiles): the epilogue has three
    producers.  ``ref``: the plain-loop twin of the intrinsic (any CPU; the portable stand-in)."""
    mi, nbi = tiles or default_tiles(M, "vnni")
    mi = min(mi, M)
    func = te.create_prim_func(qbmm_vnni(Bt, M, N, D, b_layout=b_layout, tiles=(mi, nbi)))
    sch = Schedule(func)
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


def schedule_qbmm(Bt: int, M: int, N: int, D: int, target, *, b_layout: str = "nd",
                  tiles: tuple[int, int] | None = None, variant: str | None = None,
                  ref: bool = False) -> tuple[Schedule, str]:
    """Scheduled kernel for ``target`` and its variant name ("vnni", "avx2_i16" or "fallback").

    ``variant`` overrides `variant_for(target)`; ``ref`` (VNNI only) swaps in the intrinsic's plain-loop
    twin so the VNNI schedule runs on any CPU.

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
    mi, nbi = tiles or default_tiles(M, variant)
    mi = min(mi, M)
    func = te.create_prim_func(qbmm(Bt, M, N, D, b_layout=b_layout, tiles=(mi, nbi)))
    sch = Schedule(func)
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
        sch.tensorize(lane, i16_intrin())
    else:
        sch.reorder(dp, m_i, nb_i, lane)
        sch.unroll(dp)
        sch.vectorize(lane)  # before decompose_reduction: vectorize wants a whole reduction block
        init = sch.decompose_reduction(acc, db)
        sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(m_i)
    sch.unroll(nb_i)
    return sch, variant


def qbmm_primfunc(Bt: int, M: int, N: int, D: int, target, *, b_layout: str = "nd") -> tuple[tvm.tirx.PrimFunc, str]:
    """The scheduled PrimFunc (``main(A, B, zp, scale, out)``, marked scheduled) and a unique name for it."""
    sch, variant = schedule_qbmm(Bt, M, N, D, target, b_layout=b_layout)
    name = f"repq_qbmm_{variant}_{Bt}x{M}x{N}x{D}_{b_layout}"
    func = scheduled_kernel(sch, name)
    return func, name


class QBmm:
    """A compiled kernel callable with NumPy arrays: ``k(a, b, z_a, z_b, scale) -> float32 [Bt, M, N]``."""

    def __init__(self, Bt, M, N, D, target, b_layout="nd", tiles=None, variant=None, ref=False):
        self.shape, self.target, self.b_layout = (Bt, M, N, D), target, b_layout
        sch, self.variant = schedule_qbmm(Bt, M, N, D, target, b_layout=b_layout, tiles=tiles, variant=variant,
                                          ref=ref)
        self.executable = tvm.compile(sch.mod, target=as_target(target))
        self._fn = None

    def args(self, a, b, z_a: int, z_b: int, scale: float = 1.0) -> list:
        Bt, M, N, _ = self.shape
        arrays = [a, b, np.array([z_a, z_b], np.int32), np.array([scale], np.float32),
                  np.empty((Bt, M, N), np.float32)]
        return [tvm.runtime.tensor(np.ascontiguousarray(x)) for x in arrays]

    def function(self):
        """The runtime function ``main(A, B, zp, scale, out)``; refuses code this CPU cannot run."""
        if self._fn is None:
            check_runnable(self.target, "kernel")
            self._fn = self.executable.jit()["main"]
        return self._fn

    def __call__(self, a, b, z_a: int, z_b: int, scale: float = 1.0) -> np.ndarray:
        args = self.args(a, b, z_a, z_b, scale)
        self.function()(*args)
        return args[-1].numpy()
