"""log√2 shift attention: ``attn @ V`` from post-Softmax log codes as right shifts of integer V (no float MACs).

Computes exactly `repq_tvm.reference.ops.log2_attn_v` for a batch of heads:

    inputs   C  int32 [Bt, M, N]  log codes c ∈ [0, 2^b − 1], or −1 where the entry is dead (underflow, p = 0)
             V  uint8 [Bt, N, D]  b-bit V codes in [0, 2^b − 1] (b = v_bits), zero point zp[0] ∈ [0, 2^b − 1]
                                  (int32 [1]), layer-wise
    per n    s = ⌈c/2⌉ (log√2) or c (plain log2); dead also when s > F + b (only the sign would be left)
    acc      S_p[m, d] = Σ_{n alive, c ≡ p mod 2} ((v − z)·2^F) >> s   (int32; arithmetic shift = floor)
             acc = S_0 + ((S_1 · SQRT2_FIXED + 2^(Q−1)) >> Q)          (int64, once per output; Q = SQRT2_Q)
    out      float32(acc) · scale[0],  scale = s_attn · s_v / 2^F           (or the int32 acc itself)

F = `frac_bits(N, b)` by default: the largest F for which the sums below cannot wrap (`check_frac_bits`).

How it is fast without tuning (inner step per (row m, token n, 8 lanes of d): 2 shifts + 2 adds, no masks):

- Biased V.  With K = F + b, u = (v − z + 2^b)·2^F = Vz·2^F + 2^K lies in [2^F, (2^(b+1) − 1)·2^F] (never
  negative, below 2^(K+1)), and for every shift s ≤ K, (Vz·2^F + 2^K) >> s = ((Vz·2^F) >> s) + 2^(K−s) exactly
  (2^K/2^s is an integer).  So the kernel sums logical shifts of u and subtracts the per-row correction
  Σ 2^(K−s) (a scalar per (m, parity), not per d).  A dead entry, or an entry of the other parity, gets shift
  K + 1: u >> (K+1) = 0, so it adds nothing.  No select or mask per element, no shift count ≥ 32 (LLVM
  poison: K + 1 ≤ 31).  Sums are uint32 and never wrap (TVM emits `add nuw`): Σ_n u ≤ N·(2^(b+1) − 1)·2^F
  < 2^32 and the correction Σ_n 2^(K−s) ≤ N·2^K is smaller (`check_frac_bits`); the true S_p and acc fit int32
  (see `frac_bits`), so the difference taken in int64 in the epilogue is exact.
- Per row tile the shift counts of the tile's rows (both parities) are computed once into a small table; the
  inner loop broadcasts one count per (m, n, parity) to all lanes (LLVM: one vpsrld by an xmm count).
- Register tile of `rows` rows × 2 parities × `vecs` vectors of `lanes` uint32 accumulators, kept in
  registers across the whole n loop (fully unrolled, < 1 KB so TVM stack-allocates it).  One parallel loop
  over (Bt, row group) tasks (`row_groups`); a task computes u[N, Dp] of its head (uint32, d padded to the
  vector width by repeating column D − 1), then its row tiles.  Ragged M is computed on clamped rows and
  not stored, ragged D on padded lanes.

aarch64 (NEON, 4 lanes) uses the same schedule; LLVM lowers the variable shifts to ushl by a negated count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te
from tvm.s_tir import Schedule

from ..relax_util import scheduled_kernel
from ..reference.ops import SQRT2_FIXED, SQRT2_Q, frac_bits
from ..targets import as_target, check_runnable, target_has
from .packing import ceil_to
from .qdense import AARCH64_TARGET, X86_AVX2_TARGET

__all__ = ["shift_attention", "schedule_shift_attention", "shift_attention_primfunc", "build_shift_attention",
           "ShiftAttention", "kernel_codes", "default_tiles", "row_groups", "vector_lanes", "check_frac_bits",
           "AARCH64_TARGET", "X86_AVX2_TARGET"]


def vector_lanes(target) -> int:
    """uint32 lanes of one vector register: 16 (AVX-512), 8 (AVX2), else 4 (NEON / SSE)."""
    if target_has(target, "avx512f"):
        return 16
    if target_has(target, "avx2"):
        return 8
    return 4


def check_frac_bits(n: int, f: int, v_bits: int = 8) -> None:
    """Refuse F where the sums could wrap: Σ_n u ≤ N·(2^(b+1) − 1)·2^F must stay below 2^32 (which keeps the true
    sums and acc in int32 for F ≥ 1, see `frac_bits`), and the dead shift F + b + 1 below 32."""
    if not 1 <= v_bits <= 8:
        raise ValueError(f"V codes of {v_bits} bits")
    if not 1 <= f <= 30 - v_bits or max(n, 2) * ((2 << v_bits) - 1) * (1 << f) >= 1 << 32:
        raise ValueError(f"F={f} fractional bits overflow the uint32 sums for {n} tokens of {v_bits}-bit V "
                         f"(use frac_bits({n}, {v_bits}))")


# --- compute -------------------------------------------------------------------------------------
def shift_attention(Bt: int, M: int, N: int, D: int, *, sqrt2: bool = True, f: int | None = None,
                    v_bits: int = 8, lanes: int = 8, m_tile: int = 1, epilogue: bool = True) -> list[te.Tensor]:
    """TE compute ``[C, V, zp, scale, out]`` (``[C, V, zp, out]`` int32 acc when ``epilogue`` is False).

    Rows are computed up to a multiple of ``m_tile`` (clamped row index, extra rows never stored) and d up
    to a multiple of ``lanes`` (clamped column), so the register tile has no tail predicate.
    """
    f = frac_bits(N, v_bits) if f is None else f
    check_frac_bits(N, f, v_bits)
    big = f + v_bits  # K: Vz·2^F + 2^K ≥ 2^F
    dead_shift = big + 1  # u >> (K + 1) == 0 for every u
    parities = 2 if sqrt2 else 1
    m_p, d_p = ceil_to(M, m_tile), ceil_to(D, lanes)
    C = te.placeholder((Bt, M, N), "int32", name="C")
    V = te.placeholder((Bt, N, D), "uint8", name="V")
    zp = te.placeholder((1,), "int32", name="zp")
    row = (lambda m: te.min(m, M - 1)) if m_p != M else (lambda m: m)
    col = (lambda d: te.min(d, D - 1)) if d_p != D else (lambda d: d)

    U = te.compute(
        (Bt, N, d_p),
        lambda b, n, d: (V[b, n, col(d)].astype("int32") + ((1 << v_bits) - zp[0])).astype("uint32") << f,
        name="U",
    )

    def shift_of(b, m, p, n):
        c = C[b, row(m), n]
        s = (c + 1) >> 1 if sqrt2 else c
        ok = tvm.tirx.all(c >= 0, s <= big)
        if sqrt2:
            ok = tvm.tirx.all(ok, (c & 1) == p)
        return te.if_then_else(ok, s, dead_shift).astype("uint32")

    one = tvm.tirx.const(1 << big, "uint32")
    n1 = te.reduce_axis((0, N), name="n")
    n2 = te.reduce_axis((0, N), name="n")
    SH = te.compute((Bt, m_p, parities, N), shift_of, name="shift")
    corr = te.compute(  # Σ_n 2^(K−s): what the bias 2^K of u added to each parity's sum
        (Bt, m_p, parities),
        lambda b, m, p: te.sum(one >> SH[b, m, p, n1], axis=n1),
        name="corr",
    )
    acc = te.compute(
        (Bt, m_p, parities, d_p),
        lambda b, m, p, d: te.sum(U[b, n2, d] >> SH[b, m, p, n2], axis=n2),
        name="acc",
    )

    def total(b, m, d):
        s_even = acc[b, m, 0, d].astype("int64") - corr[b, m, 0].astype("int64")
        if not sqrt2:
            return s_even.astype("int32")
        s_odd = acc[b, m, 1, d].astype("int64") - corr[b, m, 1].astype("int64")
        half = tvm.tirx.const(1 << (SQRT2_Q - 1), "int64")
        return (s_even + ((s_odd * tvm.tirx.const(SQRT2_FIXED, "int64") + half) >> SQRT2_Q)).astype("int32")

    # res: the padded [m_p, d_p] result (no tail predicate in the tile); out keeps the valid part
    if epilogue:
        scale = te.placeholder((1,), "float32", name="scale")
        res = te.compute((Bt, m_p, d_p), lambda b, m, d: total(b, m, d).astype("float32") * scale[0], name="res")
    else:
        res = te.compute((Bt, m_p, d_p), total, name="res")
    out = te.compute((Bt, M, D), lambda b, m, d: res[b, m, d], name="out")
    return [C, V, zp, scale, out] if epilogue else [C, V, zp, out]


# --- schedule ------------------------------------------------------------------------------------
def default_tiles(M: int, D: int, lanes: int, sqrt2: bool = True) -> tuple[int, int]:
    """(rows, vectors) of the register tile: rows × parities × vectors accumulators.

    AVX2 (16 ymm): 8 accumulators, i.e. 2 rows × 2 vectors for log√2 and 4 rows × 2 vectors for plain log2
    (measured on Zen 3, 1 thread, DeiT-S heads 197×197×64; 3 rows × 2 vectors × 2 parities makes LLVM spill
    an accumulator, 6 × 1 is as fast as 2 × 2).  NEON (32 q registers of 4 lanes): 16 accumulators,
    2 (4) rows × 4 vectors.  The vector count is lowered until it divides the padded D's vectors; rows
    are the size in (max/2, max] wasting the fewest clamped rows.
    """
    n_vec = ceil_to(D, lanes) // lanes
    rows_max = 2 if sqrt2 else 4
    vecs = 4 if lanes == 4 else 2
    while n_vec % vecs:
        vecs -= 1
    if M <= rows_max:
        return M, vecs
    return min(range(rows_max, rows_max // 2, -1), key=lambda t: ceil_to(M, t) - M), vecs


def row_groups(tiles: int) -> int:
    """Row groups per head (parallel tasks with the heads): the most whose tiles divide evenly, ≥ 8 tiles each.

    Each task recomputes u for its head (N·D work, vs tiles·rows·N·D for its tiles: ≤ 1/16 extra at 8 tiles
    of 2 rows); one parallel region per call instead of two, and heads × groups tasks to spread over cores.
    """
    return max((g for g in range(1, tiles + 1) if tiles % g == 0 and tiles // g >= 8), default=1)


def schedule_shift_attention(Bt: int, M: int, N: int, D: int, target=X86_AVX2_TARGET, *, sqrt2: bool = True,
                             f: int | None = None, v_bits: int = 8, epilogue: bool = True,
                             tiles: tuple[int, int] | None = None) -> tuple[Schedule, dict]:
    """The scheduled kernel for ``target`` (not compiled) and its parameters {lanes, rows, vecs, f, v_bits}."""
    lanes = vector_lanes(target)
    rows, vecs = tiles or default_tiles(M, D, lanes, sqrt2)
    n_vec = ceil_to(D, lanes) // lanes
    if n_vec % vecs:
        raise ValueError(f"{vecs} vectors per tile must divide the {n_vec} vectors of D={D}")
    f = frac_bits(N, v_bits) if f is None else f
    func = te.create_prim_func(shift_attention(Bt, M, N, D, sqrt2=sqrt2, f=f, v_bits=v_bits, lanes=lanes,
                                               m_tile=rows, epilogue=epilogue))
    sch = Schedule(func)

    # tasks: (Bt, row group), parallel; each computes u of its head, then its row tiles one after another
    res = sch.get_sblock("res")
    b, m, d = sch.get_loops(res)
    mo, mi = sch.split(m, [None, rows])
    go, mo = sch.split(mo, [row_groups(ceil_to(M, rows) // rows), None])
    dv, dl = sch.split(d, [None, lanes])
    do, di = sch.split(dv, [None, vecs])
    sch.reorder(b, go, mo, do, mi, di, dl)
    task = sch.fuse(b, go)
    sch.parallel(task)
    sch.vectorize(dl)
    sch.reverse_compute_at(sch.get_sblock("out"), do, preserve_unit_loops=True)
    # acc: the register tile of one (row tile, d tile), n outermost: rows, parities, vectors, lanes
    acc = sch.get_sblock("acc")
    sch.compute_at(acc, do, preserve_unit_loops=True)
    *_, ar, ap, ad, n = sch.get_loops(acc)
    av, al = sch.split(ad, [None, lanes])
    sch.reorder(n, ar, ap, av, al)
    # shift table and corrections: once per row tile; u: once per task
    sch.compute_at(sch.get_sblock("corr"), mo, preserve_unit_loops=True)
    sch.compute_at(sch.get_sblock("shift"), mo, preserve_unit_loops=True)
    u = sch.get_sblock("U")
    sch.compute_at(u, task, preserve_unit_loops=True)
    sch.vectorize(sch.split(sch.get_loops(u)[-1], [None, lanes])[1])
    for loop in (ar, ap, av):
        sch.unroll(loop)
    sch.vectorize(al)  # before decompose_reduction: vectorize wants the whole reduction block
    init = sch.decompose_reduction(acc, n)
    sch.vectorize(sch.get_loops(init)[-1])
    return sch, {"lanes": lanes, "rows": rows, "vecs": vecs, "f": f, "v_bits": v_bits}


# --- build ---------------------------------------------------------------------------------------
def kernel_name(Bt: int, M: int, N: int, D: int, sqrt2: bool, f: int, lanes: int, v_bits: int = 8) -> str:
    return f"repq_shift_attn_{'sqrt2' if sqrt2 else 'log2'}_l{lanes}_{Bt}x{M}x{N}x{D}_v{v_bits}_f{f}"


def shift_attention_primfunc(Bt: int, M: int, N: int, D: int, target, *, sqrt2: bool = True,
                             f: int | None = None, v_bits: int = 8) -> tuple[tvm.tirx.PrimFunc, str]:
    """The scheduled PrimFunc ``main(C, V, zp, scale, out)`` (marked scheduled) and a unique name for it.

    C int32 [Bt, M, N] codes (−1 dead), V uint8 [Bt, N, D] `v_bits`-bit codes, zp int32 [1] (z_v), scale float32 [1]
    (s_attn·s_v/2^F), out float32 [Bt, M, D].  Zero point and scale are run-time operands: layers of the
    same shape share the kernel.
    """
    sch, params = schedule_shift_attention(Bt, M, N, D, target, sqrt2=sqrt2, f=f, v_bits=v_bits)
    name = kernel_name(Bt, M, N, D, sqrt2, params["f"], params["lanes"], v_bits)
    func = scheduled_kernel(sch, name)
    return func, name


@dataclass
class ShiftAttention:
    """A compiled kernel: ``kernel(codes, v, z_v, scale)`` → float32 [Bt, M, D] (int32 acc without epilogue)."""

    Bt: int
    M: int
    N: int
    D: int
    sqrt2: bool
    epilogue: bool
    params: dict
    target: object
    executable: object
    _fn: object = None

    @property
    def f(self) -> int:
        return self.params["f"]

    @property
    def v_bits(self) -> int:
        return self.params["v_bits"]

    def args(self, codes, v, z_v: int, scale: float = 1.0) -> list:
        """Runtime tensors ``[C, V, zp, (scale,) out]`` for NumPy codes (int32, −1 dead) and uint8 V codes
        (V and z_v must fit `v_bits`: larger ones would make the biased u negative)."""
        top = (1 << self.v_bits) - 1
        if not 0 <= z_v <= top or np.asarray(v).max(initial=0) > top:
            raise ValueError(f"V codes or zero point {z_v} exceed {self.v_bits} bits")
        arrays = [np.ascontiguousarray(codes, np.int32), np.ascontiguousarray(v, np.uint8),
                  np.array([z_v], np.int32)]
        if self.epilogue:
            arrays.append(np.array([scale], np.float32))
        arrays.append(np.empty((self.Bt, self.M, self.D), np.float32 if self.epilogue else np.int32))
        return [tvm.runtime.tensor(a) for a in arrays]

    def function(self):
        """The runtime function (refused when this machine cannot run the target's code)."""
        if self._fn is None:
            check_runnable(self.target, "kernel")
            self._fn = self.executable.jit()["main"]
        return self._fn

    def __call__(self, codes, v, z_v: int, scale: float = 1.0) -> np.ndarray:
        args = self.args(codes, v, z_v, scale)
        self.function()(*args)
        return args[-1].numpy()

    def asm(self) -> str:
        return self.executable.mod.inspect_source("asm")


def build_shift_attention(Bt: int, M: int, N: int, D: int, target=X86_AVX2_TARGET, *, sqrt2: bool = True,
                          f: int | None = None, v_bits: int = 8, epilogue: bool = True,
                          tiles: tuple[int, int] | None = None) -> ShiftAttention:
    """Compile `schedule_shift_attention` for ``target`` (same arguments) into a callable `ShiftAttention`."""
    sch, params = schedule_shift_attention(Bt, M, N, D, target, sqrt2=sqrt2, f=f, v_bits=v_bits, epilogue=epilogue,
                                           tiles=tiles)
    exe = tvm.compile(sch.mod, target=as_target(target))
    return ShiftAttention(Bt, M, N, D, sqrt2, epilogue, params, target, exe)


def kernel_codes(codes: np.ndarray, dead: np.ndarray) -> np.ndarray:
    """`reference.ops.log_sqrt2_codes` (codes, dead) → the kernel's int32 codes (−1 where dead)."""
    return np.where(dead, -1, codes).astype(np.int32)
