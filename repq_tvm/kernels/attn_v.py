"""log√2 attention ``attn @ V`` as an int16 dot product: ``out = (S_0 + √2·S_1) · scale``.

Computes exactly `repq_tvm.reference.ops.attn_v_acc` for a batch of heads:

    inputs   W  int16 [Bt, planes, M, Np]  power-of-two weights 2^(F − s) of the tokens whose log code has
                                      parity p (`reference.ops.attn_weights`; P = 2 for log√2, 1 for log2),
                                      0 elsewhere, plus one plane for shifts past F (codes of more than
                                      4 bits); Np = N rounded up to even, the padding 0
             V  uint8 [Bt, N, D]      V codes, zero point zp[0] (int32 [1]), layer-wise
    acc      S_p[m, d] = Σ_n W[p, m, n]·(v[n, d] − z)                     int32, exact, per plane
             acc = S_0·2^G + ((S_1 · SQRT2_FIXED + 2^(Q−G−1)) >> (Q−G))     int64, once per output
                   (+ S_2·2^(G−F−1), the plane of shifts past F: `reference.ops.attn_term`)
    out      float32(acc) · scale[0],  scale = s_attn · s_v / 2^(F+G)        G = ATTN_EXTRA_BITS

A right shift by s is a multiply by 2^−s: with F ≤ 14 fractional bits the weights are exact int16 powers
of two, and attn @ V runs on the int16 dot product of the target, like a matmul:

==============  ==========================================  ======================================
variant         inner step (per row, 2 tokens, lanes of d)  targets
==============  ==========================================  ======================================
``vnni_i16``    vpdpwssd zmm (16 lanes)                     AVX-512 VNNI
``avx2_i16``    vpmaddwd + vpaddd ymm (8 lanes)             AVX2
``fallback``    plain loops (LLVM: smull/smlal on NEON)     anything else (aarch64)
==============  ==========================================  ======================================

It replaced a kernel of right shifts and adds (one vpsrlvd + vpaddd per 16 MACs, both parities computed
for every token): 5.3 ms of DeiT-Small's 28 ms on a Zen 4, 7% of the int8 peak.  Both parities still
cost a dot product each (the weight of the other parity is 0), but a dot product step does 32 MACs.

Schedule (the `qbmm` int16 one, plus the parity axis inside the register tile): per batch (parallel),
centre V to int16 and pack it ``[D/L, Np/2, L, 2]``, then register tiles of rows x parities x lane blocks
whose int32 accumulators stay in registers over the whole token loop; the epilogue combines the two
parities of a tile and scales to float.
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import te
from tvm.s_tir import Schedule

from ..reference.ops import ATTN_EXTRA_BITS, SQRT2_FIXED, SQRT2_Q, attn_planes, sqrt2_weight
from ..relax_util import scheduled_kernel
from ..targets import as_target, check_runnable, target_has
from .intrinsics_x86 import i16_intrin, ref_name, register_intrinsics, vnni_i16_intrin
from .packing import ceil_to

KPACK = 2  # tokens per int16 pair
# variant -> (int32 lanes per vector, tensor intrinsic or None for plain loops, (rows, lane blocks) per tile)
VARIANTS = {
    "vnni_i16": (16, vnni_i16_intrin, (3, 4)),
    "avx2_i16": (8, i16_intrin, (3, 2)),
    "fallback": (4, None, (2, 4)),
}


def variant_for(target) -> str:
    """"vnni_i16" on AVX-512 VNNI targets, "avx2_i16" on AVX2, else "fallback"."""
    if target_has(target, "avx512vnni"):
        return "vnni_i16"
    return "avx2_i16" if target_has(target, "avx2") else "fallback"


def padded_tokens(n: int) -> int:
    """Np: tokens rounded up to whole int16 pairs (the weights' last axis)."""
    return ceil_to(n, KPACK)


# accumulator vectors a register tile may hold: 32 zmm (VNNI) / 32 q (NEON) less operands, 16 ymm (AVX2)
ACCUMULATORS = {"vnni_i16": 24, "avx2_i16": 12, "fallback": 24}


def default_tiles(M: int, variant: str, planes: int = 2) -> tuple[int, int]:
    """(rows, lane blocks): the variant's, rows lowered until planes x rows x blocks accumulators fit the
    registers (3 planes x 3 rows x 4 blocks = 36 zmm spilled: 0.32 ms against 0.25 at 2 rows, DeiT-S heads,
    Zen 4) and to M, else the size in (max/2, max] wasting the fewest clamped rows."""
    mi, nbi = VARIANTS[variant][2]
    mi = max(1, min(mi, ACCUMULATORS[variant] // (planes * nbi)))
    if M <= mi:
        return M, nbi
    return min(range(mi, mi // 2, -1), key=lambda t: ceil_to(M, t) - M), nbi


def attn_v(Bt: int, M: int, N: int, D: int, *, parities: int = 2, groups: int = 1, f: int = 14, v_bits: int = 8,
           lanes: int = 16, tiles=(3, 4), epilogue: bool = True) -> list[te.Tensor]:
    """TE compute ``[W, V, zp, scale, out]`` (``[W, V, zp, out]`` with the int64 acc when not ``epilogue``);
    W has ``groups * parities`` planes (`reference.ops.attn_weights`)."""
    if parities not in (1, 2) or groups not in (1, 2) or not 1 <= f <= 14 or not 1 <= v_bits <= 8:
        raise ValueError(f"parities {parities}, groups {groups}, F {f}, V bits {v_bits}: need 1 or 2, 1 or 2, "
                         "[1, 14], [1, 8]")
    if N * ((1 << v_bits) - 1) * sqrt2_weight(f) >= 1 << 31:
        raise ValueError(f"{N} tokens of {v_bits}-bit V with F={f} could overflow int32 (see attn_frac_bits)")
    mi, nbi = tiles
    n_p, m_p, d_p = padded_tokens(N), ceil_to(M, mi), ceil_to(D, lanes * nbi)
    planes = attn_planes(parities, groups)
    W = te.placeholder((Bt, planes, M, n_p), "int16", name="W")
    V = te.placeholder((Bt, N, D), "uint8", name="V")
    zp = te.placeholder((1,), "int32", name="zp")

    def v_at(b, db, nb, l, k):
        d, n = db * lanes + l, nb * KPACK + k
        x = (V[b, te.min(n, N - 1), te.min(d, D - 1)].astype("int32") - zp[0]).astype("int16")
        inside = [c for c in (d < D if d_p != D else None, n < N if n_p != N else None) if c is not None]
        return te.if_then_else(tvm.tirx.all(*inside), x, tvm.tirx.const(0, "int16")) if inside else x

    vp = te.compute((Bt, d_p // lanes, n_p // KPACK, lanes, KPACK), v_at, name="vp")
    row = (lambda m: te.min(m, M - 1)) if m_p != M else (lambda m: m)
    n = te.reduce_axis((0, n_p), name="n")
    acc = te.compute(
        (Bt, planes, m_p, d_p),
        lambda b, p, m, d: te.sum(W[b, p, row(m), n].astype("int32")
                                  * vp[b, d // lanes, n // KPACK, d % lanes, n % KPACK].astype("int32"), axis=n),
        name="acc",
    )

    g, q = ATTN_EXTRA_BITS, SQRT2_Q - ATTN_EXTRA_BITS

    def term(b, pl, m, d):  # `reference.ops.attn_term`
        s = acc[b, pl, m, d].astype("int64")
        if pl >= parities:
            return s << (g - f - 1)
        if pl == 0:
            return s << g
        return (s * tvm.tirx.const(SQRT2_FIXED, "int64") + tvm.tirx.const(1 << (q - 1), "int64")) >> q

    def total(b, m, d):
        out = term(b, 0, m, d)
        for pl in range(1, planes):
            out = out + term(b, pl, m, d)
        return out

    if not epilogue:
        return [W, V, zp, te.compute((Bt, M, D), lambda b, m, d: total(b, m, d), name="out")]
    scale = te.placeholder((1,), "float32", name="scale")
    out = te.compute((Bt, M, D), lambda b, m, d: total(b, m, d).astype("float32") * scale[0], name="out")
    return [W, V, zp, scale, out]


def attn_v_spec(Bt: int, M: int, N: int, D: int, *, parities: int = 2, groups: int = 1, f: int = 14,
                v_bits: int = 8, variant: str = "vnni_i16", tiles: tuple[int, int] = (3, 4),
                epilogue: bool = True) -> dict:
    """The kernel spec: everything that determines the TE compute, the (rows, lane blocks) tile it was padded
    for included (``m_tile`` rows, ``d_tile`` = lanes x blocks columns); `repq_tvm.tuning.spaces` keys on it."""
    lanes = VARIANTS[variant][0]
    mi, nbi = tiles
    return {"kind": "attn_v", "Bt": Bt, "M": M, "N": N, "D": D, "parities": parities, "groups": groups, "f": f,
            "v_bits": v_bits, "variant": variant, "epilogue": epilogue, "m_tile": mi, "d_tile": lanes * nbi}


def attn_v_func(spec: dict) -> tvm.tirx.PrimFunc:
    """The unscheduled PrimFunc of a spec (`attn_v_spec`), carrying it as its ``repq.kernel`` attribute."""
    lanes = VARIANTS[spec["variant"]][0]
    tensors = attn_v(spec["Bt"], spec["M"], spec["N"], spec["D"], parities=spec["parities"], groups=spec["groups"],
                     f=spec["f"], v_bits=spec["v_bits"], lanes=lanes,
                     tiles=(spec["m_tile"], spec["d_tile"] // lanes), epilogue=spec["epilogue"])
    return te.create_prim_func(tensors).with_attr("repq.kernel", json.dumps(spec, sort_keys=True))


def apply_schedule(sch: Schedule, variant: str, mi, nbi: int, ref: bool = False) -> Schedule:
    """The register-tiled schedule on ``sch`` (holding an `attn_v_func`): tiles of ``mi`` rows (an int or a
    sampled ExprRV dividing the padded rows) x ``nbi`` lane blocks (dividing the padded D's blocks)."""
    lanes, intrin, _ = VARIANTS[variant]
    acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
    # driven from out (its epilogue reads both parities of a tile): tiles of mi rows x nbi*lanes columns
    b, m, d = sch.get_loops(out)
    mo, mo_i = sch.split(m, [None, mi])
    do, do_i = sch.split(d, [None, nbi * lanes])
    sch.reorder(b, mo, do, mo_i, do_i)
    sch.compute_at(acc, do, preserve_unit_loops=True)
    p, m_i, d_t, n = sch.get_loops(acc)[-4:]
    nb_i, lane = sch.split(d_t, [nbi, lanes])
    nb, k = sch.split(n, [None, KPACK])
    sch.reorder(nb, p, m_i, nb_i, lane, k)
    sch.vectorize(sch.split(do_i, [None, lanes])[1])
    vp = sch.get_sblock("vp")
    sch.compute_at(vp, b, preserve_unit_loops=True)  # per batch, in L1 / L2, before the tiles
    sch.vectorize(sch.get_loops(vp)[-1])
    sch.annotate(do, "pragma_loop_partition_hint", 1)  # ragged D: only the last column tile checks
    sch.parallel(b)
    if intrin is not None:
        register_intrinsics()
        init = sch.decompose_reduction(acc, nb)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.tensorize(lane, ref_name(intrin()) if ref else intrin())
    else:
        sch.reorder(k, p, m_i, nb_i, lane)
        sch.unroll(k)
        sch.vectorize(lane)  # before decompose_reduction: vectorize wants a whole reduction block
        init = sch.decompose_reduction(acc, nb)
        sch.vectorize(sch.get_loops(init)[-1])
    for loop in (p, m_i, nb_i):
        sch.unroll(loop)
    return sch


def default_schedule(spec: dict, ref: bool = False) -> Schedule:
    """The hand schedule of a spec: the tile its compute was padded for (`schedule_attn_v`)."""
    lanes = VARIANTS[spec["variant"]][0]
    return apply_schedule(Schedule(attn_v_func(spec)), spec["variant"], spec["m_tile"], spec["d_tile"] // lanes, ref)


def schedule_attn_v(Bt: int, M: int, N: int, D: int, target, *, parities: int = 2, groups: int = 1, f: int = 14,
                    v_bits: int = 8, variant: str | None = None, tiles: tuple[int, int] | None = None,
                    ref: bool = False, epilogue: bool = True) -> tuple[Schedule, str]:
    """The scheduled kernel and its variant; ``ref`` swaps in the intrinsic's plain-loop twin (any CPU)."""
    variant = variant or variant_for(target)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    if variant == "vnni_i16" and not ref and not target_has(target, "avx512vnni"):
        raise ValueError("the vnni_i16 variant needs a target with avx512vnni (or ref=True)")
    mi, nbi = tiles or default_tiles(M, variant, attn_planes(parities, groups))
    spec = attn_v_spec(Bt, M, N, D, parities=parities, groups=groups, f=f, v_bits=v_bits, variant=variant,
                       tiles=(min(mi, M), nbi), epilogue=epilogue)
    return default_schedule(spec, ref), variant


def kernel_name(Bt, M, N, D, parities, groups, f, v_bits, variant) -> str:
    return f"repq_attn_v_{variant}_{Bt}x{M}x{N}x{D}_p{parities}g{groups}_v{v_bits}_f{f}"


def attn_v_primfunc(Bt: int, M: int, N: int, D: int, target, *, parities: int = 2, groups: int = 1, f: int = 14,
                    v_bits: int = 8) -> tuple[tvm.tirx.PrimFunc, str]:
    """The scheduled PrimFunc ``main(W, V, zp, scale, out)`` (marked scheduled) and a unique name for it."""
    sch, variant = schedule_attn_v(Bt, M, N, D, target, parities=parities, groups=groups, f=f, v_bits=v_bits)
    name = kernel_name(Bt, M, N, D, parities, groups, f, v_bits, variant)
    return scheduled_kernel(sch, name), name


class AttnV:
    """A compiled kernel: ``kernel(weights, v, z_v, scale)`` → float32 [Bt, M, D] (int64 acc without epilogue)."""

    def __init__(self, Bt, M, N, D, target, *, parities=2, groups=1, f=14, v_bits=8, variant=None, tiles=None,
                 ref=False, epilogue=True):
        self.shape, self.target, self.epilogue, self.v_bits = (Bt, M, N, D), target, epilogue, v_bits
        sch, self.variant = schedule_attn_v(Bt, M, N, D, target, parities=parities, groups=groups, f=f,
                                            v_bits=v_bits, variant=variant, tiles=tiles, ref=ref, epilogue=epilogue)
        self.executable = tvm.compile(sch.mod, target=as_target(target))
        self._fn = None

    def args(self, weights, v, z_v: int, scale: float = 1.0) -> list:
        """Runtime tensors; weights [Bt, P, M, N] are padded to whole token pairs here."""
        Bt, M, N, D = self.shape
        top = (1 << self.v_bits) - 1
        if not 0 <= z_v <= top or np.asarray(v).max(initial=0) > top:
            raise ValueError(f"V codes or zero point {z_v} exceed {self.v_bits} bits")
        w = np.zeros((*weights.shape[:-1], padded_tokens(N)), np.int16)
        w[..., :N] = weights
        arrays = [w, np.ascontiguousarray(v, np.uint8), np.array([z_v], np.int32)]
        if self.epilogue:
            arrays.append(np.array([scale], np.float32))
        arrays.append(np.empty((Bt, M, D), np.float32 if self.epilogue else np.int64))
        return [tvm.runtime.tensor(a) for a in arrays]

    def function(self):
        """The runtime function (refused when this machine cannot run the target's code)."""
        if self._fn is None:
            check_runnable(self.target, "kernel")
            self._fn = self.executable.jit()["main"]
        return self._fn

    def __call__(self, weights, v, z_v: int, scale: float = 1.0) -> np.ndarray:
        args = self.args(weights, v, z_v, scale)
        self.function()(*args)
        return args[-1].numpy()

    def asm(self) -> str:
        return self.executable.mod.inspect_source("asm")
