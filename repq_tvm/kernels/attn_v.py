"""log√2 attention ``attn @ V`` as an int16 dot product: ``out = (S_0·2^(F+1) + S_1) · scale``.

Computes exactly `repq_tvm.reference.ops.attn_v_acc` for a batch of heads:

    inputs   W  int16 [Bt, planes, M, Np]  the weight W = round(2^(2F + 1 − c/2)) of each token's log code
                                      (`reference.ops.attn_weights`) as W >> (F + 1) in plane 0 (2^(F − s),
                                      exact, for even codes) and its low F + 1 bits in plane 1 (odd codes'
                                      rounded bits, shifts past F); Np = N rounded up to even, the padding 0
             V  uint8 [Bt, N, D]      V codes, zero point zp[0] (int32 [1]), layer-wise
    acc      S_p[m, d] = Σ_n W[p, m, n]·(v[n, d] − z)                     int32, exact, per plane
             acc = S_0·2^G + S_1·2^(G−F−1)                                  int64, once per output
                   (`reference.ops.attn_term`)
    out      float32(acc) · scale[0],  scale = s_attn · s_v / 2^(F+G)        G = ATTN_EXTRA_BITS

A right shift by s is a multiply by 2^−s: with F ≤ 14 fractional bits the weights are int16 integers, and
attn @ V runs on the int16 dot product of the target, like a matmul:

==============  ==================================================  ======================================
variant         inner step (per row)                                targets
==============  ==================================================  ======================================
``vnni_i16``    vpdpwssd zmm: 2 tokens x 16 lanes of d              AVX-512 VNNI
``avx2_i16``    vpmaddwd + vpaddd ymm: 2 tokens x 8 lanes           AVX2
``neon_udot``   indexed udot (u8 x u8): 4 tokens x 4 lanes, once    aarch64 with dot product (``dotprod``)
                per weight band (two bands: 2 udot per 16 MACs)
``fallback``    plain loops (LLVM: smull/smlal on NEON)             anything else (aarch64 without dotprod)
``amx``         tdpbuud on u8 byte bands of the weights and raw V   AMX-INT8, M ≥ 32, D % 32 = 0, N ≥ 32
                (`attn_v_amx`: 32 x 32 blocks, the udot split)
==============  ==================================================  ======================================

It replaced a kernel of right shifts and adds (one vpsrlvd + vpaddd per 16 MACs, both parities computed
for every token): 5.3 ms of DeiT-Small's 28 ms on a Zen 4, 7% of the int8 peak.  Each plane costs a dot
product (even codes up to shift F have 0 in plane 1), but a dot product step does 32 MACs.  Until 2026-12 8-bit codes took
three planes (one per parity, one for shifts past F); two since (DeiT-Small's heads on a Zen 4, 2 threads,
`benchmarks/kernel_attention.py` before and after: 0.218 → 0.148 ms per call; README "attn @ V").

Schedule (the `qbmm` int16 one, plus the plane axis inside the register tile): per batch (parallel),
centre V to int16 and pack it ``[D/L, Np/2, L, 2]``, then register tiles of rows x planes x lane blocks
whose int32 accumulators stay in registers over the whole token loop; the epilogue combines the planes of
a tile and scales to float.

``neon_udot``: Arm's dot product is 8-bit only (``udot``: u8 x u8, 16 MACs, exact).  Any weight 0 ≤ W < 2^15
is ``W = 2^7·hi + lo`` with the bytes ``hi = W >> 7`` (≤ 255 for 2^15 − 1, the largest weight) and
``lo = W & 127``, so with raw V codes (no centring)
``Σ_n W·(v − z) = 2^7·Σ_n hi·v + Σ_n lo·v − z·Σ_n W``.  Per batch V is packed ``[D/4, Np/4, 4 lanes of d,
4 tokens]`` u8 (Np a multiple of 8, zeros in the padding); per row tile the kernel splits its weight rows into
the two bands and sums them (``Σ_{n<N} W``).  A register tile's accumulators run the hi band's udot loop, are
shifted left by 7 and less ``z·Σ_n W`` (the lo loop's start value), then run the lo band's loop: the
accumulators of one band, no more registers than one int16 dot product.  When every weight fits a byte
(F ≤ 7, `weight_bands`) the weights are the one band ``lo = W``.  No int32 intermediate exceeds the bound
`attn_v` already checks: 2^7·Σ hi·v ≤ Σ W·v < N·(2^b − 1)·(2^(F+1) − 1) < 2^31, and likewise z·Σ W.  Tiles
(llvm-mca, no ARM hardware: `default_tiles`): 20 q accumulators, 2 blocks of 4 lanes x 10 / 5 / 3 rows for
1 / 2 / 3 planes; a step loads two V tiles per block and 8 weight bytes per row and plane, read lane by lane
by the indexed ``udot v.4s, v.16b, v.4b[j]``.  The token loop runs at 15-16 useful (int16-equivalent) MACs
per cycle in the estimate, the two bands halving udot's 32 (README "ARM (aarch64)").
"""

from __future__ import annotations

import json

import tvm
from tvm import te
from tvm.s_tir import Schedule
from tvm.script import tirx as T

from ..reference.ops import attn_max_weight, attn_shift, attn_term
from ..relax_util import scheduled_kernel
from ..targets import target_has
from . import macro_lookup  # noqa: F401  (T.macro expansion without inspect's slow frame lookup)
from .intrinsics_arm import register_intrinsics as register_arm_intrinsics
from .intrinsics_arm import udot_intrin
from .intrinsics_x86 import i16_intrin, ref_name, register_intrinsics, vnni_i16_intrin
from .packing import ceil_to

KPACK = 2  # tokens per int16 pair
UDOT_KPACK, UDOT_DEPTH = 4, 2  # udot: 4 tokens per 32-bit lane; 2 token tiles (one 8-byte load) per step
HI_SHIFT = 7  # the udot bands: W = (W >> 7)·2^7 + (W & 127)
# variant -> (int32 lanes per vector, tensor intrinsic or None for plain loops, (rows, lane blocks) per tile)
VARIANTS = {
    "vnni_i16": (16, vnni_i16_intrin, (3, 4)),
    "avx2_i16": (8, i16_intrin, (3, 2)),
    "neon_udot": (4, udot_intrin, (10, 2)),
    "fallback": (4, None, (2, 4)),
    "amx": (16, None, (32, 2)),  # its own TVMScript kernel (`attn_v_amx`): 32 rows x 2 blocks of 16 columns
}


def variant_for(target, M: int | None = None, N: int | None = None, D: int | None = None) -> str:
    """"amx" on AMX-INT8 targets for shapes (``M`` rows, ``N`` tokens, head dim ``D``) its blocking takes (`attn_v_amx.fits`),
    "vnni_i16" on AVX-512 VNNI targets, "avx2_i16" on AVX2, "neon_udot" on aarch64 with the dot-product
    extension (LLVM ``dotprod``), else "fallback"."""
    from . import attn_v_amx

    if M is not None and target_has(target, "amx-int8") and attn_v_amx.fits(M, D, N):
        return "amx"
    if target_has(target, "avx512vnni"):
        return "vnni_i16"
    if target_has(target, "dotprod"):
        return "neon_udot"
    return "avx2_i16" if target_has(target, "avx2") else "fallback"


def padded_tokens(n: int) -> int:
    """Np: tokens rounded up to whole int16 pairs (the weights' last axis)."""
    return ceil_to(n, KPACK)


def weight_bands(f: int, groups: int) -> int:
    """u8 bands of the weights in the udot variant: 1 when every weight fits a byte (the largest is 2^F, or
    2^(F + 1) − 1 with plane 1, `reference.ops.attn_max_weight`: F ≤ 7), else 2 (hi = W >> 7 ≤ 255 and
    lo = W & 127)."""
    return 1 if (attn_max_weight(f) if groups == 2 else 1 << f) < 256 else 2


# accumulator vectors a register tile may hold: 32 zmm (VNNI) / 32 q (NEON) less operands, 16 ymm (AVX2);
# udot: 20 q accumulators, 4 V tiles and the rows' 8-byte band loads (llvm-mca: 24 accumulators spill)
ACCUMULATORS = {"vnni_i16": 24, "avx2_i16": 12, "neon_udot": 20, "fallback": 24}


def default_tiles(M: int, variant: str, planes: int = 2) -> tuple[int, int]:
    """(rows, lane blocks): the variant's, rows lowered until planes x rows x blocks accumulators fit the
    registers (3 planes x 3 rows x 4 blocks = 36 zmm spilled: 0.32 ms against 0.25 at 2 rows, DeiT-S heads,
    Zen 4) and to M, else the size in (max/2, max] wasting the fewest clamped rows.

    neon_udot: the most rows whose padding is within 2% of the fewest (llvm-mca, Cortex-A76 model: 3 rows of
    2 planes 13.7 useful MACs/cycle, 5 rows 15.9): 3 planes x 3 rows, 2 x 5, 1 x 10, all x 2 blocks."""
    mi, nbi = VARIANTS[variant][2]
    mi = max(1, min(mi, ACCUMULATORS[variant] // (planes * nbi)))
    if M <= mi:
        return M, nbi
    options = range(mi, mi // 2, -1)
    if variant == "neon_udot":
        fewest = min(ceil_to(M, t) for t in options)
        return next(t for t in options if ceil_to(M, t) <= 1.02 * fewest), nbi
    return min(options, key=lambda t: ceil_to(M, t) - M), nbi


def _check_args(N: int, groups: int, f: int, v_bits: int) -> None:
    """Refuse what the kernel cannot compute exactly.  The bound N·(2^b − 1)·(2^(F+1) − 1) < 2^31 covers every
    int32 sum of both formulations: Σ W·(v − z) (int16), and udot's Σ W·v, z·Σ W, 2^7·Σ hi·v ≤ Σ W·v and the
    partial sums between them (all weights ≤ `attn_max_weight`, codes and z ≤ 2^b − 1)."""
    if groups not in (1, 2) or not 1 <= f <= 14 or not 1 <= v_bits <= 8:
        raise ValueError(f"groups {groups}, F {f}, V bits {v_bits}: need 1 or 2, [1, 14], [1, 8]")
    if N * ((1 << v_bits) - 1) * attn_max_weight(f) >= 1 << 31:
        raise ValueError(f"{N} tokens of {v_bits}-bit V with F={f} could overflow int32 (see attn_frac_bits)")


def _acc_total(acc, b, m, d, planes: int, f: int):
    """int64 acc of output (b, m, d) from the int32 plane sums ``acc[b, plane, m, d]`` (`reference.ops.attn_term`);
    ``acc`` a TE tensor or a TIR buffer."""
    out = attn_term(acc[b, 0, m, d].astype("int64"), 0, f)
    for pl in range(1, planes):
        out = out + attn_term(acc[b, pl, m, d].astype("int64"), pl, f)
    return out


def acc_total_f64(acc, b, m, d, planes: int, f: int):
    """`_acc_total`'s acc as an exact float64, from int32 plane sums: S_0·2^G + S_1·2^(G−F−1) is a multiple of
    2^(G−F−1) below 2^(31+F+1) + 2^31 ≤ 2^47 in that unit, so every product and the sum are exact.  Cast to float32
    it is `to_float32` of the int64 acc bit for bit.  Why: AVX2 has no 64-bit arithmetic shift or conversion to
    float, and the int64 combination emulated them per output, which weighs most in small heads (Swin's 49 tokens:
    few products per output)."""

    def f64(v):
        return tvm.tirx.const(float(v), "float64")

    out = acc[b, 0, m, d].astype("float64") * f64(2.0 ** attn_shift(0, f))
    for pl in range(1, planes):
        out = out + acc[b, pl, m, d].astype("float64") * f64(2.0 ** attn_shift(pl, f))
    return out


def to_float32(acc, via_float64: bool):
    """float32 of an int64 acc (`_acc_total`, |acc| < 2^49), rounded once as a plain cast.  ``via_float64``: by
    the float64 bits of 1.5·2^52 + acc (exact for |acc| < 2^51), then one rounding to float32: AVX2 has no vector
    int64 → float conversion, and the cast ran as 8 scalar ``vcvtsi2ss`` per 8 outputs (AVX-512 has
    ``vcvtqq2ps``)."""
    if not via_float64:
        return acc.astype("float32")
    magic = tvm.tirx.reinterpret("float64", acc + tvm.tirx.const(0x4338000000000000, "int64"))
    return (magic - tvm.tirx.const(6755399441055744.0, "float64")).astype("float32")


def attn_v(Bt: int, M: int, N: int, D: int, *, groups: int = 1, f: int = 14, v_bits: int = 8, lanes: int = 16,
           tiles=(3, 4), epilogue: bool = True, via_float64: bool = False) -> list[te.Tensor]:
    """TE compute ``[W, V, zp, scale, out]`` (``[W, V, zp, out]`` with the int64 acc when not ``epilogue``);
    W has ``groups`` planes (`reference.ops.attn_weights`); ``via_float64``: see `to_float32`."""
    _check_args(N, groups, f, v_bits)
    mi, nbi = tiles
    n_p, m_p, d_p = padded_tokens(N), ceil_to(M, mi), ceil_to(D, lanes * nbi)
    planes = groups
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

    def total(b, m, d):
        return _acc_total(acc, b, m, d, planes, f)

    if not epilogue:
        return [W, V, zp, te.compute((Bt, M, D), total, name="out")]
    scale = te.placeholder((1,), "float32", name="scale")
    out = te.compute((Bt, M, D), lambda b, m, d: to_float32(total(b, m, d), via_float64) * scale[0], name="out")
    return [W, V, zp, scale, out]


def attn_v_udot(Bt: int, M: int, N: int, D: int, *, groups: int = 1, f: int = 14, v_bits: int = 8, tiles=(3, 2),
                epilogue: bool = True) -> tvm.tirx.PrimFunc:
    """PrimFunc of the "neon_udot" variant (module docstring) with `attn_v`'s inputs and outputs:
    ``main(W, V, zp, scale, out)``, or ``main(W, V, zp, out)`` with the int64 acc when not ``epilogue``.

    Stages: ``vb`` V packed [Bt, Dp/4, Np/4, 4, 4] u8 (0 in the padding); ``whi = W >> 7`` and ``wlo = W & 127``
    [Bt, planes, Mp, Np] u8 (padded rows repeat row M − 1, tokens past W's end 0: V is 0 past N);
    ``wsum = Σ_{n<N} W``; ``hi = Σ_n whi·v``; ``acc`` from ``(hi << 7) − z·wsum`` plus ``Σ_n wlo·v``; ``out``.
    One band (``wlo = W``, no whi / hi) when every weight fits a byte (`weight_bands`).  The weights must be
    ≥ 0 (`reference.ops.attn_weights`).  TVMScript: `te.create_prim_func` drops a reduction's init value.
    """
    _check_args(N, groups, f, v_bits)
    L, P = VARIANTS["neon_udot"][0], UDOT_KPACK
    mi, nbi = tiles
    planes, two = groups, weight_bands(f, groups) == 2
    n_w, n_p, m_p, d_p = padded_tokens(N), ceil_to(N, P * UDOT_DEPTH), ceil_to(M, mi), ceil_to(D, L * nbi)
    lo_mask = (1 << HI_SHIFT) - 1 if two else 255
    pad_v = n_p != N or d_p != D

    @T.macro
    def dot_products(W, V, zp, acc):
        wlo = T.sblock_alloc_buffer((Bt, planes, m_p, n_p), "uint8")
        wsum = T.sblock_alloc_buffer((Bt, planes, m_p), "int32")
        vb = T.sblock_alloc_buffer((Bt, d_p // L, n_p // P, L, P), "uint8")
        if two:
            whi = T.sblock_alloc_buffer((Bt, planes, m_p, n_p), "uint8")
            hi = T.sblock_alloc_buffer((Bt, planes, m_p, d_p), "int32")
        for b, db, nb, ln, k in T.grid(Bt, d_p // L, n_p // P, L, P):
            with T.sblock("vb"):
                vb_, vdb, vnb, vl, vk = T.axis.remap("SSSSS", [b, db, nb, ln, k])
                if pad_v:
                    vb[vb_, vdb, vnb, vl, vk] = T.if_then_else(
                        vnb * P + vk < N and vdb * L + vl < D,
                        V[vb_, T.min(vnb * P + vk, N - 1), T.min(vdb * L + vl, D - 1)], T.uint8(0))
                else:
                    vb[vb_, vdb, vnb, vl, vk] = V[vb_, vnb * P + vk, vdb * L + vl]
        if two:
            for b, p, m, n in T.grid(Bt, planes, m_p, n_p):
                with T.sblock("whi"):
                    vb_, vp, vm, vn = T.axis.remap("SSSS", [b, p, m, n])
                    w = T.meta_var(W[vb_, vp, T.min(vm, M - 1), T.min(vn, n_w - 1)])
                    whi[vb_, vp, vm, vn] = T.if_then_else(vn < n_w, T.Cast("uint8", w >> T.int16(HI_SHIFT)),
                                                          T.uint8(0))
        for b, p, m, n in T.grid(Bt, planes, m_p, n_p):
            with T.sblock("wlo"):
                vb_, vp, vm, vn = T.axis.remap("SSSS", [b, p, m, n])
                w = T.meta_var(W[vb_, vp, T.min(vm, M - 1), T.min(vn, n_w - 1)])
                wlo[vb_, vp, vm, vn] = T.if_then_else(vn < n_w, T.Cast("uint8", w & T.int16(lo_mask)), T.uint8(0))
        for b, p, m, n in T.grid(Bt, planes, m_p, n_p):  # whole vectors of tokens (`_apply_udot` sums 8 a time)
            with T.sblock("wsum"):
                vb_, vp, vm, vn = T.axis.remap("SSSR", [b, p, m, n])
                with T.init():
                    wsum[vb_, vp, vm] = 0
                wsum[vb_, vp, vm] = wsum[vb_, vp, vm] + T.if_then_else(
                    vn < N, T.Cast("int32", W[vb_, vp, T.min(vm, M - 1), T.min(vn, N - 1)]), 0)
        if two:
            for b, p, m, d, n in T.grid(Bt, planes, m_p, d_p, n_p):
                with T.sblock("hi"):
                    vb_, vp, vm, vd, vn = T.axis.remap("SSSSR", [b, p, m, d, n])
                    with T.init():
                        hi[vb_, vp, vm, vd] = 0
                    hi[vb_, vp, vm, vd] = hi[vb_, vp, vm, vd] + T.Cast("int32", whi[vb_, vp, vm, vn]) * T.Cast(
                        "int32", vb[vb_, vd // L, vn // P, vd % L, vn % P])
        for b, p, m, d, n in T.grid(Bt, planes, m_p, d_p, n_p):
            with T.sblock("acc"):
                vb_, vp, vm, vd, vn = T.axis.remap("SSSSR", [b, p, m, d, n])
                with T.init():  # the start value: its reads are hidden from tensorize (`_apply_udot`)
                    if two:
                        acc[vb_, vp, vm, vd] = (hi[vb_, vp, vm, vd] << HI_SHIFT) - zp[0] * wsum[vb_, vp, vm]
                    else:
                        acc[vb_, vp, vm, vd] = 0 - zp[0] * wsum[vb_, vp, vm]
                acc[vb_, vp, vm, vd] = acc[vb_, vp, vm, vd] + T.Cast("int32", wlo[vb_, vp, vm, vn]) * T.Cast(
                    "int32", vb[vb_, vd // L, vn // P, vd % L, vn % P])

    acc_shape, w_shape = (Bt, planes, m_p, d_p), (Bt, planes, M, n_w)
    if epilogue:
        @T.prim_func(s_tir=True)
        def main(W: T.Buffer(w_shape, "int16"), V: T.Buffer((Bt, N, D), "uint8"), zp: T.Buffer((1,), "int32"),
                 scale: T.Buffer((1,), "float32"), out: T.Buffer((Bt, M, D), "float32")):
            T.func_attr({"tirx.noalias": True})
            acc = T.sblock_alloc_buffer(acc_shape, "int32")
            dot_products(W, V, zp, acc)
            for b, m, d in T.grid(Bt, M, D):
                with T.sblock("out"):
                    vb_, vm, vd = T.axis.remap("SSS", [b, m, d])
                    total = T.meta_var(_acc_total(acc, vb_, vm, vd, planes, f))
                    out[vb_, vm, vd] = T.Cast("float32", total) * scale[0]
    else:
        @T.prim_func(s_tir=True)
        def main(W: T.Buffer(w_shape, "int16"), V: T.Buffer((Bt, N, D), "uint8"), zp: T.Buffer((1,), "int32"),
                 out: T.Buffer((Bt, M, D), "int64")):
            T.func_attr({"tirx.noalias": True})
            acc = T.sblock_alloc_buffer(acc_shape, "int32")
            dot_products(W, V, zp, acc)
            for b, m, d in T.grid(Bt, M, D):
                with T.sblock("out"):
                    vb_, vm, vd = T.axis.remap("SSS", [b, m, d])
                    out[vb_, vm, vd] = _acc_total(acc, vb_, vm, vd, planes, f)
    return main


def attn_v_spec(Bt: int, M: int, N: int, D: int, *, groups: int = 1, f: int = 14, v_bits: int = 8,
                variant: str = "vnni_i16", tiles: tuple[int, int] = (3, 4), epilogue: bool = True) -> dict:
    """The kernel spec: everything that determines the TE compute, the (rows, lane blocks) tile it was padded
    for included (``m_tile`` rows, ``d_tile`` = lanes x blocks columns); `repq_tvm.tuning.spaces` keys on it."""
    lanes = VARIANTS[variant][0]
    mi, nbi = tiles
    return {"kind": "attn_v", "Bt": Bt, "M": M, "N": N, "D": D, "groups": groups, "f": f,
            "v_bits": v_bits, "variant": variant, "epilogue": epilogue, "m_tile": mi, "d_tile": lanes * nbi}


def attn_v_func(spec: dict) -> tvm.tirx.PrimFunc:
    """The unscheduled PrimFunc of a spec (`attn_v_spec`), carrying it as its ``repq.kernel`` attribute."""
    lanes = VARIANTS[spec["variant"]][0]
    shape = spec["Bt"], spec["M"], spec["N"], spec["D"]
    kw = {"groups": spec["groups"], "f": spec["f"], "v_bits": spec["v_bits"],
          "tiles": (spec["m_tile"], spec["d_tile"] // lanes), "epilogue": spec["epilogue"]}
    if spec["variant"] == "neon_udot":
        func = attn_v_udot(*shape, **kw)
    elif spec["variant"] == "amx":
        func = _amx_func(spec)
    else:
        func = te.create_prim_func(attn_v(*shape, lanes=lanes, via_float64=spec["variant"] == "avx2_i16", **kw))
    return func.with_attr("repq.kernel", json.dumps(spec, sort_keys=True))


def apply_schedule(sch: Schedule, variant: str, mi, nbi: int, ref: bool = False) -> Schedule:
    """The register-tiled schedule on ``sch`` (holding an `attn_v_func`): tiles of ``mi`` rows (an int or a
    sampled ExprRV dividing the padded rows) x ``nbi`` lane blocks (dividing the padded D's blocks)."""
    if variant == "neon_udot":
        return _apply_udot(sch, mi, nbi, ref)
    lanes, intrin, _ = VARIANTS[variant]
    acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
    # driven from out (its epilogue reads every plane of a tile): tiles of mi rows x nbi*lanes columns
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


def _apply_udot(sch: Schedule, mi, nbi: int, ref: bool) -> Schedule:
    """`apply_schedule` of "neon_udot" (stages: `attn_v_udot`): per batch pack V; per row tile its weight bands
    and row sums (in L1 across the row's column tiles); per tile the hi band's udot loop, then the lo band's on
    the same accumulators (q registers), then the epilogue.  A step of a band loop loads 8 bytes of each row
    and feeds them to its ``nbi`` x `UDOT_DEPTH` indexed ``udot v.4s, v.16b, v.4b[j]`` (no broadcast)."""
    spec = json.loads(sch.mod["main"].attrs["repq.kernel"])
    two = weight_bands(spec["f"], spec["groups"]) == 2
    bands, splits = (["hi", "acc"], ["wlo", "whi"]) if two else (["acc"], ["wlo"])
    lanes = VARIANTS["neon_udot"][0]
    b, m, d = sch.get_loops(sch.get_sblock("out"))
    mo, mo_i = sch.split(m, [None, mi])
    do, do_i = sch.split(d, [None, nbi * lanes])
    sch.reorder(b, mo, do, mo_i, do_i)
    sch.vectorize(sch.split(do_i, [None, lanes])[1])
    for name in reversed(bands):  # acc first: hi then lands before its consumer
        sch.compute_at(sch.get_sblock(name), do, preserve_unit_loops=True)
    for name in ["wsum", *splits]:
        sch.compute_at(sch.get_sblock(name), mo, preserve_unit_loops=True)
    for name in splits:  # 8 weights a vector; only the last 8 may pass W's end (partitioned off)
        n_o, n_i = sch.split(sch.get_loops(sch.get_sblock(name))[-1], [None, UDOT_KPACK * UDOT_DEPTH])
        sch.vectorize(n_i)
        sch.annotate(n_o, "pragma_loop_partition_hint", 1)
    n_o, n_i = sch.split(sch.get_loops(sch.get_sblock("wsum"))[-1], [None, UDOT_KPACK * UDOT_DEPTH])
    *_, rf_o, rf_i = sch.get_loops(sch.rfactor(n_i, 0))  # row sums: 8 partial sums a row, in one vector
    sch.vectorize(rf_i)
    sch.annotate(rf_o, "pragma_loop_partition_hint", 1)
    sch.compute_at(sch.get_sblock("vb"), b, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(sch.get_sblock("vb"))[-1])
    sch.annotate(do, "pragma_loop_partition_hint", 1)  # ragged D: only the last column tile checks
    sch.parallel(b)
    register_arm_intrinsics()
    for name in bands:
        _tensorize_band(sch, name, nbi, ref)
    return sch


def _tensorize_band(sch: Schedule, name: str, nbi: int, ref: bool) -> None:
    """Block ``name``'s token loop on the udot intrinsic: steps of `UDOT_DEPTH` x `UDOT_KPACK` tokens outermost,
    planes, rows and lane blocks unrolled inside."""
    block = sch.get_sblock(name)
    p, m_i, d_t, n = sch.get_loops(block)[-4:]
    nb_i, lane = sch.split(d_t, [nbi, VARIANTS["neon_udot"][0]])
    step, kd, k = sch.split(n, [None, UDOT_DEPTH, UDOT_KPACK])
    sch.reorder(step, p, m_i, nb_i, kd, lane, k)
    init = sch.decompose_reduction(block, step)
    sch.vectorize(sch.get_loops(init)[-1])
    if name == "acc":  # tensorize compares the reads with the intrinsic's: the start value's are the init's
        reads = sch.get(block).reads
        sch.unsafe_hide_buffer_access(block, "read", [i for i, r in enumerate(reads)
                                                      if r.source.name in ("hi", "zp", "wsum")])
    intrin = udot_intrin(UDOT_DEPTH)
    sch.tensorize(kd, ref_name(intrin) if ref else intrin)
    for loop in (p, m_i, nb_i):
        sch.unroll(loop)


def _amx_func(spec: dict, emulate: bool = False) -> tvm.tirx.PrimFunc:
    """The AMX kernel of a spec (hand-written: its definition is its schedule); ``emulate``: plain-loop tiles."""
    from .attn_v_amx import attn_v_amx_func

    return attn_v_amx_func(spec["Bt"], spec["M"], spec["N"], spec["D"], groups=spec["groups"], f=spec["f"],
                           v_bits=spec["v_bits"], epilogue=spec["epilogue"], emulate=emulate)


def default_schedule(spec: dict, ref: bool = False) -> Schedule:
    """The hand schedule of a spec: the tile its compute was padded for (`schedule_attn_v`); the AMX kernel as it
    is (``ref``: its plain-loop emulation)."""
    if spec["variant"] == "amx":
        return Schedule(_amx_func(spec, emulate=ref).with_attr("repq.kernel", json.dumps(spec, sort_keys=True)))
    lanes = VARIANTS[spec["variant"]][0]
    return apply_schedule(Schedule(attn_v_func(spec)), spec["variant"], spec["m_tile"], spec["d_tile"] // lanes, ref)


def schedule_attn_v(Bt: int, M: int, N: int, D: int, target, *, groups: int = 1, f: int = 14, v_bits: int = 8,
                    variant: str | None = None, tiles: tuple[int, int] | None = None,
                    ref: bool = False, epilogue: bool = True) -> tuple[Schedule, str]:
    """The scheduled kernel and its variant; ``ref`` swaps in the intrinsic's plain-loop twin (any CPU)."""
    variant = variant or variant_for(target, M, N, D)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    if variant == "amx":
        if not ref and not target_has(target, "amx-int8"):
            raise ValueError("the amx variant needs a target with amx-int8 (or ref=True)")
        spec = attn_v_spec(Bt, M, N, D, groups=groups, f=f, v_bits=v_bits, variant=variant,
                           tiles=VARIANTS["amx"][2], epilogue=epilogue)
        return default_schedule(spec, ref), variant
    if variant == "vnni_i16" and not ref and not target_has(target, "avx512vnni"):
        raise ValueError("the vnni_i16 variant needs a target with avx512vnni (or ref=True)")
    if variant == "neon_udot" and not ref and not target_has(target, "dotprod"):
        raise ValueError("the neon_udot variant needs an aarch64 target with dotprod (or ref=True)")
    mi, nbi = tiles or default_tiles(M, variant, groups)
    spec = attn_v_spec(Bt, M, N, D, groups=groups, f=f, v_bits=v_bits, variant=variant,
                       tiles=(min(mi, M), nbi), epilogue=epilogue)
    return default_schedule(spec, ref), variant


def kernel_name(Bt, M, N, D, groups, f, v_bits, variant) -> str:
    return f"repq_attn_v_{variant}_{Bt}x{M}x{N}x{D}_g{groups}_v{v_bits}_f{f}"


def attn_v_primfunc(Bt: int, M: int, N: int, D: int, target, *, groups: int = 1, f: int = 14,
                    v_bits: int = 8) -> tuple[tvm.tirx.PrimFunc, str]:
    """The scheduled PrimFunc ``main(W, V, zp, scale, out)`` (marked scheduled) and a unique name for it."""
    sch, variant = schedule_attn_v(Bt, M, N, D, target, groups=groups, f=f, v_bits=v_bits)
    name = kernel_name(Bt, M, N, D, groups, f, v_bits, variant)
    return scheduled_kernel(sch, name), name
