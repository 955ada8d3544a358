"""The whole log√2 attention of a head in one AMX kernel: q @ kᵀ → softmax → log√2 codes → weights → attn @ V.

Why: on a Sapphire Rapids the three kernels that do this one after another (`qbmm`'s vnni q @ kᵀ, the fused
softmax of `log_weights`, `attn_v_amx`) took ~3.4 of DeiT-Small's ~9.5 ms, mostly moving their intermediates:
float32 logits [Bt, M, N] written and read back, int16 weight planes [Bt, planes, M, Np] written, read and split
into bytes.  Here a 32-row block of one head goes through all three steps while it sits in L1/L2 (ragged M:
the last block is a 16-row half block at M − 16 when M % 32 is 1..16, else a full one at M − 32, as
`qdense_amx.row_blocks`; DeiT-Small's heads: 0.223 → 0.212 ms per call, `benchmarks/kernel_attention.py`,
Sapphire Rapids, 2 threads).

Each step is the unfused kernel's own arithmetic, so the result is theirs bit for bit (tested against them):

1. logits of 32 rows x 32 keys on AMX (`tdpbusd`: q's u8 codes x ``k − 128`` as s8), then `qbmm`'s vnni
   epilogue ``float32(acc + (128 − z_k)·Σ_d q − z_q·(Σ_d k − z_k·D))·scale`` (the int32 value is exact, so
   equal whatever the order; ragged N: the last key block starts at N − 32);
2. per row, `log_weights`' fused softmax: the max and the sum of `epilogue.fast_exp` (as `fast_exp_nonpositive`)
   as 16 partial lanes added in the same order as its rfactor, `log_weights._code_bias`, `log_weights.softmax_code`;
3. each token's byte in each of `attn_v_amx`'s u8 bands of each plane by one ``vpermb`` lookup per 64 tokens in a
   table of `log_weights.plane_weight` of codes −1 .. 62 (every later code has no weight), the bands' row sums
   Σ W (``vpsadbw``), then the band products with V (`tdpbuud`) and their combination as in `attn_v_amx`.

Inputs: q, k, V u8 ``[Bt, M, D]``, ``[Bt, N, D]``, ``[Bt, N, D]``; ``qk_zp`` int32 [2] = (z_q, z_k), ``qk_scale``
float32 [1] (the logits' scale, softmax scale folded in), ``v_zp`` int32 [1], ``v_scale`` float32 [1]
(`attn_v`'s), ``consts`` float64 (`attention_consts`: the log quantizer's log2(s), the output quantizer); out
float32 ``[Bt, M, D]``.  The spec holds the structure only (shapes, code widths, which tails): every block of a
model with the same shapes runs the same kernel.  Heads run in parallel; each packs its k, V and row sums first.
Shapes it takes (`fits`): M ≥ 32 and N ≥ 32, D a multiple of 64 (the tile's k step over the head dim).

``emulate=True``: plain loops on tile-shaped buffers instead of the tile instructions (any CPU).
"""

from __future__ import annotations

import json

import numpy as np
import tvm
from tvm.script import tirx as T

from ..reference import ops
from . import (
    epilogue,
    macro_lookup,  # noqa: F401  (T.macro expansion without inspect's slow frame lookup)
)
from .attention_consts import CONSTS, loaded_log2_scale, loaded_quantizer
from .attn_v import HI_SHIFT, _acc_total, _check_args, weight_bands
from .attn_v_amx import _PlaneSums, band_byte
from .log_weights import VECTOR, plane_weight, softmax_codes_macro
from .packing import ceil_to
from .qdense_amx import (
    COLS,
    HALF,
    K_STEP,
    ROWS,
    amx_intrin,
    load_tile_config,
    request_amx,
    row_blocks,
    tile_macros,
)

RB = 4  # rows whose softmax reductions run interleaved (`log_weights.softmax_codes_macro`)
TABLE = 64  # byte-table entries: code + 1 for codes −1 (none) .. 62, one `vpermb` (AVX-512 VBMI) per 64 tokens


class Output:
    """What a fused attention stores for its float result of head b, row m, column d (`store`).

    Without ``out_codes`` in the spec: float32 ``[Bt, M, D]``, attn @ V's output.  With ``out_codes`` = {"heads": H,
    "top": 2^b − 1, "operand": None or (dtype, minus)}: the output projection's input codes in token layout
    ``[Bt/H, M, H·D]`` (head b's column d at (b mod H)·D + d), as that layer reads them, under the "out" quantizer
    of the kernel's ``consts`` (`epilogue.quantize_codes`, `epilogue.as_operand`, minus `epilogue.ZERO_POINT`: that
    quantizer's zero point; the unfused quantizer's and casts' operations).  Why: otherwise a
    kernel per block moved the float heads back to token order and quantized them (`passes.attention_out_codes`).
    """

    def __init__(self, spec: dict):
        bt, m, d, codes = spec["Bt"], spec["M"], spec["D"], spec.get("out_codes")
        self.heads = codes["heads"] if codes else 0
        if not codes:
            self.shape, self.dtype = (bt, m, d), "float32"
            return
        if self.heads < 1 or bt % self.heads:
            raise ValueError(f"out_codes needs Bt = batch x heads, got Bt={bt}, heads={self.heads}")
        self.top = int(codes["top"])
        self.operand = tuple(codes["operand"]) if codes.get("operand") else None
        self.shape = (bt // self.heads, m, self.heads * d)
        self.dtype = self.operand[0] if self.operand else "uint8"

    def value(self, x, consts):
        """The stored value of float result ``x`` (``consts``: the kernel's `attention_consts` buffer)."""
        if not self.heads:
            return x
        quant = loaded_quantizer(consts, "out")
        return epilogue.as_operand(epilogue.quantize_codes(x, quant, self.top), self.operand, quant.z)

    def store_macro(self, D: int):
        """The macro ``store(out, consts, b, m, d, x)``."""
        heads, value = self.heads, self.value

        @T.macro
        def store(out, consts, b, m, d, x):
            if heads > 0:
                out[b // heads, m, (b % heads) * D + d] = value(x, consts)
            else:
                out[b, m, d] = x

        return store


def check_table(f: int, sqrt2: bool, groups: int) -> None:
    """Refuse an F whose codes past the byte table have weights (`reference.ops.attn_weights`; the largest code
    with one is 4F + 2 = 58 for log√2 at F = 14, 2F + 1 for log2)."""
    codes = np.arange(TABLE - 1, 256)
    if np.any(ops.attn_weights(codes[None], np.zeros((1, codes.size), bool), f, sqrt2, groups)):
        raise ValueError(f"codes past {TABLE - 2} have weights at F = {f}: the byte table cannot hold them")


def table_index(codes, i, c: int):
    """uint8x64 table indices of the 64 codes from token 64c: code + 1, at most TABLE − 1 (an entry of zeros), in
    registers: a 64-byte load of four 16-byte stores would wait for them (no store forwarding across stores)."""
    lanes = TABLE
    return T.Cast(f"uint8x{lanes}", T.min(codes.vload([i, c * lanes], dtype=f"int32x{lanes}") + T.broadcast(T.int32(1), lanes),
                                          T.broadcast(T.int32(TABLE - 1), lanes)))


def byte_sums(wb, pb, r, kp: int):
    """int64x8 partial sums of the u8 row ``wb[pb, r, :kp]`` (``vpsadbw`` against zeros, 64 bytes at a time)."""
    total = None
    for c in range(kp // TABLE):
        sad = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.psad.bw.512"),
                                      wb.vload([pb, r, c * TABLE], dtype="uint8x64"),
                                      T.broadcast(T.uint8(0), TABLE), dtype="int64x8")
        total = sad if total is None else total + sad
    return total


def fits(M: int, N: int, D: int) -> bool:
    """True if the blocking takes the shape (see the module docstring)."""
    return M >= ROWS and N >= COLS and D % K_STEP == 0


def attention_spec(Bt: int, M: int, N: int, D: int, *, bits: int, sqrt2: bool, f: int, groups: int,
                   v_bits: int) -> dict:
    """The kernel spec (``bits``, ``sqrt2``, ``f``, ``groups``: the log quantizer's, as `log_weights_spec`; its scale
    is a run-time constant, `attention_consts`; ``v_bits``: V's code width, as `attn_v`)."""
    return {"kind": "attention", "Bt": Bt, "M": M, "N": N, "D": D, "bits": bits, "sqrt2": bool(sqrt2), "f": f,
            "groups": groups, "v_bits": v_bits, "variant": "amx"}


def kernel_name(spec: dict) -> str:
    """``repq_attention_{variant}_…``: this kernel's and `attention_vector`'s (the variant is in the spec), ending in
    what the kernel reads (after ``_t<n>`` where it adds n logit terms, `attention_vector`): ``_codes`` (q, k, v
    codes), ``_qkv`` (the qkv output, quantized in the kernel) or ``_qkv_codes`` (the qkv output's codes), then
    ``_out_codes`` where it stores the next layer's codes (`Output`).  A
    word last: the numbers TVM appends to tell the per-block copies apart stay separable (`profile.kernel_group`)."""
    kind = "sqrt2" if spec["sqrt2"] else "log2"
    terms = f"_t{len(spec['logit_terms'])}" if spec.get("logit_terms") else ""
    return (f"repq_attention_{spec['variant']}_{spec['Bt']}x{spec['M']}x{spec['N']}x{spec['D']}_{kind}_b{spec['bits']}"
            f"_g{spec['groups']}_v{spec['v_bits']}_f{spec['f']}{terms}" + _source_suffix(spec.get("qkv"))
            + ("_out_codes" if spec.get("out_codes") else ""))


def _source_suffix(qkv: dict | None) -> str:
    return "_codes" if qkv is None else "_qkv_codes" if qkv.get("codes") else "_qkv"


def attention_amx_func(spec: dict, emulate: bool = False) -> tvm.tirx.PrimFunc:
    """PrimFunc ``main(q, k, qk_zp, qk_scale, v, v_zp, v_scale, consts, out)`` of a spec, carrying it as
    ``repq.kernel``."""
    Bt, M, N, D = spec["Bt"], spec["M"], spec["N"], spec["D"]
    sqrt2, f, groups, v_bits = spec["sqrt2"], spec["f"], spec["groups"], spec["v_bits"]
    m_log = 2 if sqrt2 else 1
    _check_args(N, groups, f, v_bits)
    if not fits(M, N, D):
        raise ValueError(f"amx attention needs M >= {ROWS}, N >= {COLS} and D % {K_STEP} == 0, got M={M}, N={N}, "
                         f"D={D}")
    if D * 255 * 255 * 2 >= 2 ** 31:
        raise ValueError(f"depth {D} could overflow the int32 accumulator")
    planes, bands = groups, weight_bands(f, groups)
    pb_count, kp, n_r, top = planes * bands, ceil_to(N, K_STEP), ceil_to(N, VECTOR), 2 ** spec["bits"] - 1
    n_blocks, d_blocks, qk_steps, av_steps = -(-N // COLS), D // COLS, D // K_STEP, kp // K_STEP
    check_table(f, sqrt2, groups)
    output = Output(spec)
    store = output.store_macro(D)
    emu = (2, 16, 64) if emulate else (1,)
    emu_c = (4, 16, 16) if emulate else (1,)

    full, half = row_blocks(M)

    def logits_of(rows: int):
        """The macro ``logits(...)`` of a block of ``rows`` rows: L[r, n] = the logits of rows m0 + r (`qbmm`'s vnni
        epilogue), key blocks of 32 (the last at N − 32)."""
        zero_tiles, dot_tiles, store_tiles = tile_macros(emulate, rows)

        @T.macro
        def logits(q, kb, qk_zp, qk_scale, qsum, kterm, L, Cq, ta, tbs, tc, b, m0):
            for nb in range(n_blocks):
                zero_tiles(tc)
                for kt in range(qk_steps):
                    if emulate:
                        for i, r, j in T.grid(rows // 16, 16, 64):
                            ta[i, r, j] = q[b, m0 + 16 * i + r, kt * K_STEP + j]
                        for i, r, j in T.grid(2, 16, 64):
                            tbs[i, r, j] = kb[kt * 16 + r, T.min(nb * COLS, N - COLS) + 16 * i + j // 4, j % 4]
                    else:
                        for i in T.unroll(rows // 16):
                            T.evaluate(amx_intrin("tileloadd64", T.int8(4 + i),
                                                  T.address_of(q[b, m0 + 16 * i, kt * K_STEP]), T.int64(D)))
                        for i in T.unroll(2):
                            T.evaluate(amx_intrin("tileloadd64", T.int8(6 + i),
                                                  T.address_of(kb[kt * 16, T.min(nb * COLS, N - COLS) + 16 * i, 0]),
                                                  T.int64(N * 4)))
                    dot_tiles(ta, tbs, tc, "tdpbusd")
                store_tiles(tc, Cq, 0)
                for r in range(rows):
                    for j in T.vectorized(COLS):
                        L[r, T.min(nb * COLS, N - COLS) + j] = T.Cast(
                            "float32", Cq[0, r, j] + (128 - qk_zp[1]) * qsum[m0 + r] - kterm[T.min(nb * COLS, N - COLS) + j]
                        ) * qk_scale[0]

        return logits

    softmax_codes = softmax_codes_macro(N, m_log, top, RB)

    @T.macro
    def weights(codes, tab, wb, wsum, bsum, sad, i, r, slot):
        """Row r (codes[i]): plane weights → u8 bands (one table lookup per 64 tokens) and their row sums."""
        for pb in range(pb_count):  # each token's byte: the table entry of its code + 1 (codes past it: 0)
            for c in range(kp // TABLE):
                if emulate:
                    for j in range(TABLE):
                        wb[slot * pb_count + pb, r, c * TABLE + j] = tab[pb, T.min(codes[i, c * TABLE + j] + 1, TABLE - 1)]
                else:
                    wb[slot * pb_count + pb, r, T.ramp(c * TABLE, 1, TABLE)] = T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id("llvm.x86.avx512.permvar.qi.512"),
                        tab.vload([pb, 0], dtype="uint8x64"), table_index(codes, i, c), dtype="uint8x64")
            if emulate:  # the band's row sum, from the bytes just written (L1)
                bsum[pb] = 0
                for n in range(kp):
                    bsum[pb] = bsum[pb] + T.Cast("int32", wb[slot * pb_count + pb, r, n])
            else:  # vpsadbw: 8 sums of 8 bytes per 64 tokens
                sad[T.ramp(0, 1, 8)] = byte_sums(wb, slot * pb_count + pb, r, kp)
                bsum[pb] = T.Cast("int32", sad[0] + sad[1] + sad[2] + sad[3] + sad[4] + sad[5] + sad[6] + sad[7])
        for p in range(planes):  # Σ_n W_p = 2^7·Σ hi + Σ lo
            if bands == 2:
                wsum[slot * planes + p, r] = (bsum[p * 2] << HI_SHIFT) + bsum[p * 2 + 1]
            else:
                wsum[slot * planes + p, r] = bsum[p]

    @T.macro
    def codes_and_weights(L, codes, part, row, tab, wb, wsum, bsum, sad, consts, rows, slot):
        """The block's rows of L → codes → bands in slot ``slot`` (RB rows at a time)."""
        for rb in range(rows // RB):
            softmax_codes(L, codes, part, row, rb * RB, loaded_log2_scale(consts))
            for i in range(RB):
                weights(codes, tab, wb, wsum, bsum, sad, i, rb * RB + i, slot)

    def attn_v_of(rows: int):
        """The macro ``attn_v(...)`` of a block of ``rows`` rows: out rows m0.. = the band products with V combined
        (`attn_v_amx`), 32 columns of D at a time."""
        zero_tiles, dot_tiles, store_tiles = tile_macros(emulate, rows)

        @T.macro
        def attn_v(vp, wb, wsum, v_zp, v_scale, consts, out, C, ta, tbu, tc, b, m0, slot):
            for db in range(d_blocks):
                for pb in range(pb_count):
                    zero_tiles(tc)
                    for kt in range(av_steps):
                        if emulate:
                            for i, r, j in T.grid(rows // 16, 16, 64):
                                ta[i, r, j] = wb[slot * pb_count + pb, 16 * i + r, kt * K_STEP + j]
                            for i, r, j in T.grid(2, 16, 64):
                                tbu[i, r, j] = vp[kt * 16 + r, db * COLS + 16 * i + j // 4, j % 4]
                        else:
                            for i in T.unroll(rows // 16):
                                T.evaluate(amx_intrin("tileloadd64", T.int8(4 + i),
                                                      T.address_of(wb[slot * pb_count + pb, 16 * i, kt * K_STEP]),
                                                      T.int64(kp)))
                            for i in T.unroll(2):
                                T.evaluate(amx_intrin("tileloadd64", T.int8(6 + i),
                                                      T.address_of(vp[kt * 16, db * COLS + 16 * i, 0]), T.int64(D * 4)))
                        dot_tiles(ta, tbu, tc, "tdpbuud")
                    store_tiles(tc, C, pb)
                for r in range(rows):
                    for j in T.vectorized(COLS):
                        total = T.meta_var(_acc_total(_PlaneSums(C, wsum, v_zp, bands, 0, slot * planes), b, r, j,
                                                      planes, f))
                        store(out, consts, b, m0 + r, db * COLS + j, T.Cast("float32", total) * v_scale[0])

        return attn_v

    logits, logits_half = logits_of(ROWS), logits_of(HALF)
    attn_v, attn_v_half = attn_v_of(ROWS), attn_v_of(HALF)

    @T.prim_func
    def main(q: T.Buffer((Bt, M, D), "uint8"), k: T.Buffer((Bt, N, D), "uint8"), qk_zp: T.Buffer((2,), "int32"),
             qk_scale: T.Buffer((1,), "float32"), v: T.Buffer((Bt, N, D), "uint8"), v_zp: T.Buffer((1,), "int32"),
             v_scale: T.Buffer((1,), "float32"), consts: T.Buffer((CONSTS,), "float64"),
             out: T.Buffer(output.shape, output.dtype)):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        if not emulate:
            request_amx()
        k32 = T.decl_buffer((Bt, N, D // 4), "int32", data=k.data)  # k's 4-code groups as words
        for b in T.parallel(Bt):
            cfg = T.alloc_buffer((64,), "uint8", scope="local")
            kb = T.alloc_buffer((D // 4, N, 4), "int8", scope="local")  # k − 128, AMX's B layout (keys = columns)
            kb32 = T.decl_buffer((D // 4, N), "int32", data=kb.data, scope="local")  # kb's 4-code groups as words
            kterm = T.alloc_buffer((N,), "int32", scope="local")
            qsum = T.alloc_buffer((M,), "int32", scope="local")
            vp = T.alloc_buffer((kp // 4, D, 4), "uint8", scope="local")  # V codes, B layout (tokens = k dim)
            L = T.alloc_buffer((ROWS, n_r), "float32", scope="local")
            codes = T.alloc_buffer((RB, kp), "int32", scope="local")  # −1 past n_r (table entry 0: no weight)
            tab = T.alloc_buffer((pb_count, TABLE), "uint8", scope="local")
            bsum = T.alloc_buffer((pb_count,), "int32", scope="local")
            sad = T.alloc_buffer((8,), "int64", scope="local")
            wb = T.alloc_buffer((2 * pb_count, ROWS, kp), "uint8", scope="local")  # two blocks' bands
            wsum = T.alloc_buffer((2 * planes, ROWS), "int32", scope="local")
            row = T.alloc_buffer((RB, 3), "float32", scope="local")  # max, sum, code bias of RB rows
            part = T.alloc_buffer((RB, VECTOR), "float32", scope="local")
            Cq = T.alloc_buffer((1, ROWS, COLS), "int32", scope="local")
            C = T.alloc_buffer((pb_count, ROWS, COLS), "int32", scope="local")
            ta = T.alloc_buffer(emu, "uint8", scope="local")
            tbs = T.alloc_buffer(emu, "int8", scope="local")
            tbu = T.alloc_buffer(emu, "uint8", scope="local")
            tc = T.alloc_buffer(emu_c, "int32", scope="local")
            if not emulate:
                load_tile_config(cfg)
            for n in range(N):
                kterm[n] = 0
                for d in range(D):
                    kterm[n] = kterm[n] + T.Cast("int32", k[b, n, d])
                kterm[n] = qk_zp[0] * (kterm[n] - qk_zp[1] * D)
                for r in T.vectorized(D // 4):  # 4 codes at a time: u8 x - 128 as s8 is x ^ 0x80 in each byte
                    kb32[r, n] = k32[b, n, r] ^ T.int32(-0x7F7F7F80)
            for m in range(M):
                qsum[m] = 0
                for d in range(D):
                    qsum[m] = qsum[m] + T.Cast("int32", q[b, m, d])
            for r, d, i in T.grid(kp // 4, D, 4):
                vp[r, d, i] = T.if_then_else(4 * r + i < N, v[b, T.min(4 * r + i, N - 1), d], T.uint8(0))
            for r in range(ROWS):
                for n in T.vectorized(n_r):
                    L[r, n] = T.float32(0)
            for i, n in T.grid(RB, kp - n_r):
                codes[i, n_r + n] = -1
            for pb, i in T.grid(pb_count, TABLE):  # code i − 1's byte in band pb % bands of plane pb // bands
                tab[pb, i] = T.Cast("uint8", band_byte(plane_weight(i - 1, pb // bands, sqrt2, f, groups), pb % bands,
                                                               bands))
            # software-pipelined: block mb's weights are written one block before its tile products read them
            # (two slots of bands): a tile load of bytes just stored by vector code waits for those stores
            logits(q, kb, qk_zp, qk_scale, qsum, kterm, L, Cq, ta, tbs, tc, b, 0)
            codes_and_weights(L, codes, part, row, tab, wb, wsum, bsum, sad, consts, ROWS, 0)
            for mb in range(full):
                if mb + 1 < full:
                    logits(q, kb, qk_zp, qk_scale, qsum, kterm, L, Cq, ta, tbs, tc, b, T.min((mb + 1) * ROWS, M - ROWS))
                    codes_and_weights(L, codes, part, row, tab, wb, wsum, bsum, sad, consts, ROWS, (mb + 1) % 2)
                elif half:  # the last block: 16 rows from M − 16
                    logits_half(q, kb, qk_zp, qk_scale, qsum, kterm, L, Cq, ta, tbs, tc, b, M - HALF)
                    codes_and_weights(L, codes, part, row, tab, wb, wsum, bsum, sad, consts, HALF, (mb + 1) % 2)
                attn_v(vp, wb, wsum, v_zp, v_scale, consts, out, C, ta, tbu, tc, b, T.min(mb * ROWS, M - ROWS), mb % 2)
            if half:
                attn_v_half(vp, wb, wsum, v_zp, v_scale, consts, out, C, ta, tbu, tc, b, M - HALF, full % 2)
            if not emulate:
                T.evaluate(amx_intrin("tilerelease"))

    return main.with_attr("repq.kernel", json.dumps(spec, sort_keys=True))

