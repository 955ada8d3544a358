"""The whole log√2 attention of a head in one kernel on x86 vector dot products: q @ kᵀ → softmax → log√2 codes →
weights → attn @ V, for CPUs without AMX.

Why: the three kernels it replaces (`qbmm`, the fused softmax of `log_weights`, `attn_v`) pass their intermediates
through memory: float32 logits [Bt, M, N] written and read back, int16 weight planes [Bt, planes, M, Np] written
and read (0.9 MB per DeiT-Small call with two planes).  Here 4 rows of one head go through every step while
they sit in L1 (`attention_amx` does the same on AMX tiles).

Each step is the unfused kernel's own arithmetic, so the result is theirs bit for bit (tested against them):

==============  ====================================================  ===================================
variant         q @ kᵀ (4 rows x at most 2 / 4 key blocks)            attn @ V (2 rows x planes x d blocks)
==============  ====================================================  ===================================
``avx2_i16``    vpmaddwd ymm on ``q − z_q`` and ``k − z_k`` int16     vpmaddwd on the int16 weights and
                (`qbmm` avx2_i16: exact int32, one float multiply)    ``v − z_v`` (`attn_v` avx2_i16)
``vnni``        vpdpbusd zmm on q's u8 codes and ``k − 128`` s8, the  vpdpwssd zmm (`attn_v` vnni_i16)
                zero points in the epilogue (`qbmm` vnni)
==============  ====================================================  ===================================

then per row `log_weights`' fused softmax (`log_weights.softmax_codes_macro`: same sums in the same order),
`log_weights.plane_weight` of each code, and `attn_v`'s combination of the planes (`attn_v.acc_total_f64`).

Inputs: q, k, V u8 ``[Bt, M, D]``, ``[Bt, N, D]``, ``[Bt, N, D]``; ``qk_zp`` int32 [2] = (z_q, z_k), ``qk_scale``
float32 [1] (the logits' scale, softmax scale folded in), ``v_zp`` int32 [1], ``v_scale`` float32 [1], then the
logit terms' tables (below), then ``consts`` float64 (`attention_consts`: the log quantizer's log2(s), the q, k, v
and output quantizers); out float32 ``[Bt, M, D]``, or with ``out_codes`` the output projection's codes
(`attention_amx.Output`).  Heads run
in parallel; each packs its k and V first (O(N·D) against O(M·N·D)).  Row blocks of 4 (the last at M − 4: its
rows are computed again, with the same values).  Shapes it takes (`fits`):
M ≥ 4, D a multiple of the vector's int32 lanes (8 / 16).

With ``qkv`` in the spec ({"heads": H, "tops": the three codes' 2^b − 1}), the kernel reads the qkv projection's
float output instead, ``main(y, qk_zp, qk_scale, v_zp, v_scale, [terms,] consts, out)`` with y float32
[batch·T, 3·H·D] (Bt = batch·H, M = N = T), and quantizes head b's q, k and v itself under the consts' q, k and v
quantizers (`epilogue.quantize_codes`: the unfused quantizer's operations): k and v once per head, straight into
the packed operands, q per row block.  Why: otherwise three kernels per block slice, move and quantize them
(`passes.qkv_head_split`), writing and reading the codes again.  With ``"codes": true`` in ``qkv`` it reads those
codes instead, y uint8 [batch·T, 3·H·D] as the qkv kernel stored them (`qdense`'s ``column_codes`` tail,
`passes.qkv_column_codes`), and quantizes nothing: the float output was 4 bytes per value to write and read again.

With ``logit_terms`` in the spec ([[div, mod], …], at most two) the kernel takes one float32 table ``[mod, M, Np]``
per term after ``v_scale`` (`logit_term_shape`: keys padded with zeros to whole `VECTOR`s) and adds row
``(b // div) % mod`` of each to head b's logits, in order, before the softmax: Swin's relative position bias
(per head: (1, H)) and its shifted windows' mask (per window: (H, windows)), the float32 adds the graph does
between q @ kᵀ and the softmax (`passes.fused_attention`).

``emulate=True``: plain loops instead of the dot-product instructions (any CPU: the VNNI variant's arithmetic is
tested where the CPU has no AVX-512).
"""

from __future__ import annotations

import json

import tvm
from tvm.script import tirx as T

from ..targets import target_has
from . import (
    epilogue,
    macro_lookup,  # noqa: F401  (T.macro expansion without inspect's slow frame lookup)
)
from .attention_amx import (
    Output,
    attention_amx_func,
    kernel_name,  # noqa: F401  (one naming for both fused kernels)
)
from .attention_amx import attention_spec as amx_spec
from .attention_consts import CONSTS, SLOTS, loaded_log2_scale, loaded_quantizer
from .attn_v import _check_args, acc_total_f64, padded_tokens
from .log_weights import HALF, VECTOR, plane_weight, softmax_codes_macro
from .packing import ceil_to

RB = 4  # rows per block: the softmax reductions of 4 rows run interleaved, as in `attention_amx`
AV_ROWS = 2  # rows of one attn @ V register tile
# variant -> (int32 lanes per vector, q @ kᵀ depth per instruction, key blocks per q @ kᵀ tile, accumulators an
# attn @ V tile may hold): AVX2 16 ymm (4 x 2 logits accumulators + operands), VNNI 32 zmm (4 x 4)
VARIANTS = {"avx2_i16": (8, 2, 2, 12), "vnni": (16, 4, 4, 24)}


def variant_for(target) -> str | None:
    """"vnni" on AVX-512 VNNI targets, "avx2_i16" on AVX2 ones, else None (the three kernels stay)."""
    if target_has(target, "avx512vnni"):
        return "vnni"
    return "avx2_i16" if target_has(target, "avx2") else None


def fits(M: int, N: int, D: int, variant: str) -> bool:
    """True if the blocking takes the shape (see the module docstring)."""
    lanes, kpack, _, _ = VARIANTS[variant]
    return M >= RB and D % lanes == 0 and D % kpack == 0


def qk_tiles(blocks: int, most: int) -> tuple[int, int, int]:
    """(wide, width, narrow): the q @ kᵀ tiles of ``blocks`` key blocks, at most ``most`` per tile and as few tiles as
    that allows, ``wide`` tiles of width + 1 blocks then ``narrow`` of ``width``: every block once.  Why: tiles of
    ``most`` with the last one moved back to end at the last block computed DeiT-Small's 13 blocks as 16 (the last
    tile's first 3 again); 4 + 3 + 3 + 3 computes 13."""
    tiles = -(-blocks // most)
    width, wide = divmod(blocks, tiles)
    return wide, width, tiles - wide


def logit_term_shape(tables: int, M: int, N: int) -> tuple[int, int, int]:
    """Shape of a logit term's tables: keys padded with zeros to whole `VECTOR`s (the logits rows' length), so the
    kernel reads them as plain vectors."""
    return tables, M, ceil_to(N, VECTOR)


def av_blocks(D: int, variant: str, planes: int) -> int:
    """d blocks of one attn @ V tile: the most that divide D's blocks with `AV_ROWS` x planes x blocks
    accumulators in the registers (2 planes x 2 rows x 2 blocks on AVX2, x 4 blocks on VNNI)."""
    lanes, _, _, acc = VARIANTS[variant]
    blocks = D // lanes
    return max(b for b in range(1, blocks + 1) if blocks % b == 0 and AV_ROWS * planes * b <= acc)


def attention_spec(Bt: int, M: int, N: int, D: int, *, bits: int, sqrt2: bool, f: int, groups: int, v_bits: int,
                   variant: str) -> dict:
    """The kernel spec, as `attention_amx.attention_spec` with the variant."""
    return {**amx_spec(Bt, M, N, D, bits=bits, sqrt2=sqrt2, f=f, groups=groups, v_bits=v_bits), "variant": variant}


def word_part(word, c: int, dtype: str):
    """int32 of part c of an int32 word of packed ``dtype`` values (part 0 the low bits), as a vector load
    reinterprets it; the emulation's reading of `kp` / `vp`."""
    return T.Cast("int32", T.Cast(dtype, T.shift_right(word, c * tvm.DataType(dtype).bits)))


class _TileSums:
    """``acc[b, plane, a, (j, lane)]`` for `attn_v.acc_total_f64`: S_p of a tile's row a, d block j, lane."""

    def __init__(self, acc):
        self.acc = acc

    def __getitem__(self, idx):
        _, p, a, (j, ln) = idx
        return self.acc[a, p, j, ln]


def attention_vector_func(spec: dict, emulate: bool = False) -> tvm.tirx.PrimFunc:
    """PrimFunc ``main(q, k, qk_zp, qk_scale, v, v_zp, v_scale, [t0, t1,] consts, out)`` of a spec, carrying it as
    ``repq.kernel``."""
    Bt, M, N, D, variant = spec["Bt"], spec["M"], spec["N"], spec["D"], spec["variant"]
    sqrt2, f, groups, v_bits = spec["sqrt2"], spec["f"], spec["groups"], spec["v_bits"]
    m_log, vnni = (2 if sqrt2 else 1), variant == "vnni"
    _check_args(N, groups, f, v_bits)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    lanes, kpack, kt, _ = VARIANTS[variant]
    if not fits(M, N, D, variant):
        raise ValueError(f"the {variant} attention needs M >= {RB} and D % {lanes} == 0, got M={M}, D={D}")
    if D * 255 * 255 * 2 >= 2 ** 31:
        raise ValueError(f"depth {D} could overflow the int32 accumulator")
    planes, top = groups, 2 ** spec["bits"] - 1
    n_r, n_p = ceil_to(N, VECTOR), padded_tokens(N)  # logits / codes / weights rows; tokens in whole pairs
    n_w = ceil_to(n_p, HALF)  # codes and weights formed: the tokens attn @ V reads, in whole half vectors
    nb, steps, d_blocks = -(-N // lanes), D // kpack, D // lanes
    kt = min(kt, nb)  # key blocks per q @ kᵀ tile, at most
    wide_tiles, width, narrow_tiles = qk_tiles(nb, kt)
    db = av_blocks(D, variant, planes)
    output = Output(spec)
    store = output.store_macro(D)
    terms = [tuple(t) for t in spec.get("logit_terms", [])]  # (div, mod): term j of head b is table (b // div) % mod
    if len(terms) > 2 or any(div < 1 or mod < 1 for div, mod in terms):
        raise ValueError(f"at most two logit terms of positive (div, mod), got {terms}")
    term_shapes = [logit_term_shape(mod, M, N) for _, mod in terms] + [(1, 1, 1)] * (2 - len(terms))
    qkv = spec.get("qkv")
    if qkv is not None:
        heads, tops, stored = qkv["heads"], [int(t) for t in qkv["tops"]], bool(qkv.get("codes"))
        batch = Bt // heads
        if batch * heads != Bt or M != N:
            raise ValueError(f"q, k and v from one qkv output need Bt = batch x {heads} heads and M = N, got Bt={Bt}, "
                             f"M={M}, N={N}")

        def qkv_code(y, consts, third, b, n, d):
            """The code of token n, column d of head b's q (third 0), k (1) or v (2): the unfused quantizer of y, or
            y's own where it holds the codes."""
            value = y[(b // heads) * N + n, (third * heads + b % heads) * D + d]
            return value if stored else epilogue.quantize_codes(value, loaded_quantizer(consts, SLOTS[third]),
                                                                tops[third])

        def q_at(y, consts, b, m, d):
            return qkv_code(y, consts, 0, b, m, d)

        def k_at(y, consts, b, n, d):
            return qkv_code(y, consts, 1, b, n, d)

        def v_at(y, consts, b, n, d):
            return qkv_code(y, consts, 2, b, n, d)
    else:
        def q_at(q, consts, b, m, d):
            return q[b, m, d]

        def k_at(k, consts, b, n, d):
            return k[b, n, d]

        v_at = k_at
    softmax_codes = softmax_codes_macro(N, m_log, top, RB, n_w)
    k_dtype = "int8" if vnni else "int16"  # q @ kᵀ's k operands
    pmaddwd = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd")
    vpdpbusd = T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512")
    vpdpwssd = T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpwssd.512")

    @T.macro
    def qk_step(acc, i, j, qa, qc, kp, s, n0):
        """acc[i, j] += block row i's depth step s (kpack values of d) x key block n0 + j."""
        if emulate:
            for ln, c in T.grid(lanes, kpack):
                if vnni:
                    acc[i, j, ln] = acc[i, j, ln] + T.Cast("int32", qc[i, s * kpack + c]) * word_part(
                        kp[n0 + j, s, ln], c, k_dtype)
                else:
                    acc[i, j, ln] = acc[i, j, ln] + T.Cast("int32", qa[i, s * kpack + c]) * word_part(
                        kp[n0 + j, s, ln], c, k_dtype)
        elif vnni:  # q's 4 u8 codes as one word, broadcast
            acc[i, j, T.ramp(0, 1, lanes)] = T.call_llvm_pure_intrin(
                vpdpbusd, acc.vload([i, j, 0], dtype="int32x16"),
                T.reinterpret(T.broadcast(T.reinterpret(qc.vload([i, s * 4], dtype="uint8x4"), dtype="int32"), 16),
                              dtype="uint8x64"),
                T.reinterpret(kp.vload([n0 + j, s, 0], dtype="int32x16"), dtype="int8x64"), dtype="int32x16")
        else:
            acc[i, j, T.ramp(0, 1, lanes)] = acc.vload([i, j, 0], dtype="int32x8") + T.call_llvm_pure_intrin(
                pmaddwd, T.reinterpret(T.broadcast(T.reinterpret(qa.vload([i, s * 2], dtype="int16x2"),
                                                                 dtype="int32"), 8), dtype="int16x16"),
                T.reinterpret(kp.vload([n0 + j, s, 0], dtype="int32x8"), dtype="int16x16"), dtype="int32x8")

    @T.macro
    def av_step(acc, a, p, j, wb, i, t, vp, d0):
        """acc[a, p, j] += the plane-p weights of block row i at token pair t x V's d block d0 + j."""
        if emulate:
            for ln, c in T.grid(lanes, 2):
                acc[a, p, j, ln] = acc[a, p, j, ln] + T.Cast("int32", wb[p, i, t * 2 + c]) * word_part(
                    vp[d0 + j, t, ln], c, "int16")
        else:
            pair = T.meta_var(T.reinterpret(wb.vload([p, i, t * 2], dtype="int16x2"), dtype="int32"))
            if vnni:
                acc[a, p, j, T.ramp(0, 1, lanes)] = T.call_llvm_pure_intrin(
                    vpdpwssd, acc.vload([a, p, j, 0], dtype="int32x16"),
                    T.reinterpret(T.broadcast(pair, 16), dtype="int16x32"),
                    T.reinterpret(vp.vload([d0 + j, t, 0], dtype="int32x16"), dtype="int16x32"), dtype="int32x16")
            else:
                acc[a, p, j, T.ramp(0, 1, lanes)] = acc.vload([a, p, j, 0], dtype="int32x8") + T.call_llvm_pure_intrin(
                    pmaddwd, T.reinterpret(T.broadcast(pair, 8), dtype="int16x16"),
                    T.reinterpret(vp.vload([d0 + j, t, 0], dtype="int32x8"), dtype="int16x16"), dtype="int32x8")

    def with_terms(x, t0, t1, b, m, n):
        """x plus the logit terms of head b, row m, key n, in the order of the graph's adds (the tables' keys are
        padded to whole vectors, `logit_term_shape`: the padded logits are never used).  x is rounded first, as
        `qbmm` stores it (`epilogue.as_stored`: no FMA of the logits' scale and the first term)."""
        if terms:
            x = epilogue.as_stored(x)
        for term, (div, mod) in zip((t0, t1), terms):
            x = x + term[(b // div) % mod, m, n]
        return x

    @T.macro
    def qk_tile(qk_zp, qk_scale, qc, qa, kp, qsum, kterm, L, acc, b, m0, t0, t1, n0, width):
        """L[i, n] for the RB rows x ``width`` key blocks from block n0: the dot products, then `qbmm`'s epilogue."""
        for i, j, ln in T.grid(RB, width, lanes):
            acc[i, j, ln] = 0
        for s in range(steps):
            for i in T.unroll(RB):
                for j in T.unroll(width):
                    qk_step(acc, i, j, qa, qc, kp, s, n0)
        for i in T.unroll(RB):
            for j in T.unroll(width):
                for ln in T.vectorized(lanes):
                    col = T.meta_var((n0 + j) * lanes + ln)
                    if vnni:
                        L[i, col] = with_terms(T.Cast("float32", acc[i, j, ln] + (128 - qk_zp[1]) * qsum[i]
                                                      - kterm[col]) * qk_scale[0], t0, t1, b, m0 + i, col)
                    else:
                        L[i, col] = with_terms(T.Cast("float32", acc[i, j, ln]) * qk_scale[0], t0, t1, b, m0 + i,
                                               col)

    @T.macro
    def logits(q, qk_zp, qk_scale, consts, qc, qa, kp, qsum, kterm, L, acc, b, m0, t0, t1):
        """L[i, n] = the logits of rows m0 + i (`qbmm`'s arithmetic, then the spec's logit terms), in tiles of RB
        rows x the key blocks of `qk_tiles` (each block once)."""
        for i in range(RB):
            for d in T.vectorized(D):
                qc[i, d] = q_at(q, consts, b, m0 + i, d)
        if vnni:
            for i in range(RB):
                qsum[i] = 0
                for d in range(D):
                    qsum[i] = qsum[i] + T.Cast("int32", qc[i, d])
        else:
            for i in range(RB):
                for d in T.vectorized(D):
                    qa[i, d] = T.Cast("int16", T.Cast("int32", qc[i, d]) - qk_zp[0])
        if wide_tiles > 0:
            for t in range(wide_tiles):
                qk_tile(qk_zp, qk_scale, qc, qa, kp, qsum, kterm, L, acc, b, m0, t0, t1, t * (width + 1), width + 1)
        for t in range(narrow_tiles):
            qk_tile(qk_zp, qk_scale, qc, qa, kp, qsum, kterm, L, acc, b, m0, t0, t1,
                    wide_tiles * (width + 1) + t * width, width)

    @T.macro
    def attn_v(wb, vp, v_zp, v_scale, consts, out, acc, b, m0):
        """out rows m0 .. m0 + RB − 1 from the block's weight planes: tiles of AV_ROWS rows x db d blocks."""
        for r0, dt in T.grid(RB // AV_ROWS, d_blocks // db):
            for a, p, j, ln in T.grid(AV_ROWS, planes, db, lanes):
                acc[a, p, j, ln] = 0
            for t in range(n_p // 2):
                for p in T.unroll(planes):
                    for a in T.unroll(AV_ROWS):
                        for j in T.unroll(db):
                            av_step(acc, a, p, j, wb, r0 * AV_ROWS + a, t, vp, dt * db)
            for a in T.unroll(AV_ROWS):
                for j in T.unroll(db):
                    for ln in T.vectorized(lanes):
                        total = T.meta_var(acc_total_f64(_TileSums(acc), b, a, (j, ln), planes, f))
                        store(out, consts, b, m0 + r0 * AV_ROWS + a, (dt * db + j) * lanes + ln,
                              total.astype("float32") * v_scale[0])

    @T.macro
    def plane_weights(codes, wb, i, n0, lanes):
        """Every plane's int16 weights of codes n0 .. n0 + lanes − 1 of row i, in one loop: the planes share the
        code's shift and group (a loop per plane computed them again); the planes are constants in the code (a
        plane loop evaluated every plane's selects at run time)."""
        for ln in T.vectorized(lanes):
            wb[0, i, n0 + ln] = plane_weight(codes[i, n0 + ln], 0, sqrt2, f, groups)
            if planes > 1:
                wb[1, i, n0 + ln] = plane_weight(codes[i, n0 + ln], 1, sqrt2, f, groups)
            if planes > 2:
                wb[2, i, n0 + ln] = plane_weight(codes[i, n0 + ln], 2, sqrt2, f, groups)

    @T.macro
    def weights(codes, wb):
        """The block's weights of the tokens attn @ V reads (`n_w`)."""
        for i in range(RB):
            for c in range(n_w // VECTOR):
                plane_weights(codes, wb, i, c * VECTOR, VECTOR)
            if n_w % VECTOR != 0:
                plane_weights(codes, wb, i, n_w // VECTOR * VECTOR, HALF)

    @T.macro
    def head(q, k, v, qk_zp, qk_scale, v_zp, v_scale, consts, out, b, t0, t1):
        """Head b: pack its k and V, then its row blocks (q, k, v: the kernel's inputs, or the qkv output three
        times, read through `q_at` / `k_at` / `v_at`)."""
        kp = T.alloc_buffer((nb, steps, lanes), "int32", scope="local")  # words of kpack k operands; keys = lanes
        kterm = T.alloc_buffer((nb * lanes,), "int32", scope="local")
        qsum = T.alloc_buffer((RB,), "int32", scope="local")
        qc = T.alloc_buffer((RB, D), "uint8", scope="local")  # the block's q codes
        qa = T.alloc_buffer((RB, D), "int16", scope="local")  # the block's q − z_q (avx2_i16)
        vp = T.alloc_buffer((d_blocks, n_p // 2, lanes), "int32", scope="local")  # words: v − z_v of a token pair
        krow = T.alloc_buffer((D,), k_dtype, scope="local")  # one key's k operands
        L = T.alloc_buffer((RB, n_r), "float32", scope="local")
        codes = T.alloc_buffer((RB, n_r), "int32", scope="local")
        wb = T.alloc_buffer((planes, RB, n_r), "int16", scope="local")
        part = T.alloc_buffer((RB, VECTOR), "float32", scope="local")
        row = T.alloc_buffer((RB, 3), "float32", scope="local")  # max, sum, code bias
        acc_qk = T.alloc_buffer((RB, kt, lanes), "int32", scope="local")
        acc_av = T.alloc_buffer((AV_ROWS, planes, db, lanes), "int32", scope="local")
        for n in range(N):  # key n's operands (avx2_i16: k − z_k int16; vnni: u8 k − 128 as s8), a vector, then
            # its words into lane n % lanes of the key block
            for d in T.vectorized(D):
                krow[d] = T.Cast(k_dtype, T.Cast("int32", k_at(k, consts, b, n, d)) - (128 if vnni else qk_zp[1]))
            for s in range(steps):
                kp[n // lanes, s, n % lanes] = T.reinterpret(krow.vload([s * kpack], dtype=f"{k_dtype}x{kpack}"),
                                                             dtype="int32")
            if vnni:  # the zero points' column term z_q·(Σ_d k − z_k·D)
                kterm[n] = 0
                for d in range(D):
                    kterm[n] = kterm[n] + T.Cast("int32", krow[d])
                kterm[n] = qk_zp[0] * (kterm[n] + (128 - qk_zp[1]) * D)
        for n in range(nb * lanes - N):  # keys past N: 0
            for s in range(steps):
                kp[(N + n) // lanes, s, (N + n) % lanes] = 0
            if vnni:
                kterm[N + n] = 0
        for d0, t in T.grid(d_blocks, n_p // 2):  # tokens 2t and 2t + 1 (0 past N) as the low and high halves
            for ln in T.vectorized(lanes):
                vp[d0, t, ln] = T.bitwise_or(
                    T.bitwise_and(T.Cast("int32", v_at(v, consts, b, t * 2, d0 * lanes + ln)) - v_zp[0], 0xFFFF),
                    T.shift_left(T.Select(t * 2 + 1 < N, T.Cast("int32", v_at(v, consts, b, T.min(t * 2 + 1, N - 1),
                                                                             d0 * lanes + ln)) - v_zp[0], 0), 16))
        for i, n in T.grid(RB, n_r):
            L[i, n] = T.float32(0)
        for blk in range(-(-M // RB)):
            logits(q, qk_zp, qk_scale, consts, qc, qa, kp, qsum, kterm, L, acc_qk, b, T.min(blk * RB, M - RB), t0, t1)
            softmax_codes(L, codes, part, row, 0, loaded_log2_scale(consts))
            weights(codes, wb)
            attn_v(wb, vp, v_zp, v_scale, consts, out, acc_av, b, T.min(blk * RB, M - RB))

    if qkv is None:
        @T.prim_func
        def main(q: T.Buffer((Bt, M, D), "uint8"), k: T.Buffer((Bt, N, D), "uint8"), qk_zp: T.Buffer((2,), "int32"),
                 qk_scale: T.Buffer((1,), "float32"), v: T.Buffer((Bt, N, D), "uint8"), v_zp: T.Buffer((1,), "int32"),
                 v_scale: T.Buffer((1,), "float32"), t0: T.Buffer(term_shapes[0], "float32"),
                 t1: T.Buffer(term_shapes[1], "float32"), consts: T.Buffer((CONSTS,), "float64"),
                 out: T.Buffer(output.shape, output.dtype)):
            T.func_attr({"global_symbol": "main", "tirx.noalias": True})
            for b in T.parallel(Bt):
                head(q, k, v, qk_zp, qk_scale, v_zp, v_scale, consts, out, b, t0, t1)
    else:
        y_dtype = "uint8" if stored else "float32"

        @T.prim_func
        def main(y: T.Buffer((batch * N, 3 * heads * D), y_dtype), qk_zp: T.Buffer((2,), "int32"),
                 qk_scale: T.Buffer((1,), "float32"), v_zp: T.Buffer((1,), "int32"), v_scale: T.Buffer((1,), "float32"),
                 t0: T.Buffer(term_shapes[0], "float32"), t1: T.Buffer(term_shapes[1], "float32"),
                 consts: T.Buffer((CONSTS,), "float64"), out: T.Buffer(output.shape, output.dtype)):
            T.func_attr({"global_symbol": "main", "tirx.noalias": True})
            for b in T.parallel(Bt):
                head(y, y, y, qk_zp, qk_scale, v_zp, v_scale, consts, out, b, t0, t1)

    return _without_params(main, ("t0", "t1")[len(terms):]).with_attr("repq.kernel", json.dumps(spec, sort_keys=True))


def _without_params(func: tvm.tirx.PrimFunc, names) -> tvm.tirx.PrimFunc:
    """``func`` without the named parameters, which its body does not read (TVMScript has no optional
    parameters: the logit terms a spec does not have are declared, never read, and dropped here)."""
    return tvm.tirx.PrimFunc([p for p in func.params if p.name not in names], func.body, func.ret_type, func.attrs)


def attention_func(spec: dict, emulate: bool = False) -> tvm.tirx.PrimFunc:
    """The fused attention kernel of a spec, AMX (`attention_amx`) or vector (this module), by its variant."""
    if spec["variant"] == "amx":
        return attention_amx_func(spec, emulate)
    return attention_vector_func(spec, emulate)
