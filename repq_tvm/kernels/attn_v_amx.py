"""AMX-INT8 ``attn @ V`` of the log√2 attention (Sapphire Rapids and newer Xeons): `tdpbuud` on byte bands.

Why: the int16 dot product (`attn_v`'s ``vnni_i16``, `vpdpwssd`: 32 MACs per instruction) was the largest
attention kernel of DeiT-Small on a Sapphire Rapids once the linears ran on AMX; one ``tdpbuud`` does 16,384
u8 x u8 MACs.  AMX has no int16 product, so the weights go in as bytes, exactly as `attn_v`'s ``neon_udot``
does: ``W = 2^7·hi + lo`` with ``hi = W >> 7`` and ``lo = W & 127`` (one band ``lo = W`` when every weight fits
a byte, `attn_v.weight_bands`), V as its raw u8 codes, so per weight plane p

    S_p = 2^7·Σ_n hi_p·v + Σ_n lo_p·v − z·Σ_n W_p          (int32, exact: the bound `attn_v._check_args` checks)

and the int64 combination of the planes and the float scale are `attn_v`'s (`attn_v._acc_total`): the kernel
computes `reference.ops.attn_v_acc` bit for bit, with the same inputs and outputs as the other variants.

Per batch (head; the parallel loop): V packed once as AMX's B layout ``[Kp/4, D, 4]`` (4 consecutive tokens
of one column in 4 bytes, zeros past N: the weights there are never read as non-zero products), and every
row of every plane split into the u8 bands ``[planes·bands, M, Kp]`` with their row sums Σ W, all before the
first tile product (a tile load of bytes that vector stores have just written waits for them: splitting each
32-row block right before its products was slower in a one-off check on a Sapphire Rapids).  Then for each 32-row block (the last one starting at M − 32: ragged M recomputes rows, as
`qdense_amx`) every 32-column block of D runs the 2 x 2 tile blocking of `qdense_amx` once per band (tmm0-3 accumulate,
tmm4-5 the band's two 16-row tiles, tmm6-7 V's two 16-column tiles), storing each band's 32 x 32 sums; the
epilogue combines them.  Shapes it cannot take (`fits`: M < 32, D % 32) keep `attn_v`'s int16 kernel.

``emulate=True``: plain loops on tile-shaped buffers instead of the tile instructions (any CPU), so the
indexing is tested bit for bit everywhere; the instructions themselves are checked in the assembly.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

from . import macro_lookup  # noqa: F401  (T.macro expansion without inspect's slow frame lookup)
from .attn_v import HI_SHIFT, _acc_total, _check_args, padded_tokens, weight_bands
from .packing import ceil_to
from .qdense_amx import (
    COLS,
    K_STEP,
    ROWS,
    amx_intrin,
    load_tile_config,
    request_amx,
    tile_macros,
)

CHUNK = 32  # the weight split's vector width (int16 lanes per zmm)


def fits(M: int, D: int, N: int = CHUNK) -> bool:
    """True if the blocking takes the shape: at least one 32-row block, whole 32-column blocks of D, and at
    least one whole vector of tokens."""
    return M >= ROWS and D % COLS == 0 and N >= CHUNK


class _PlaneSums:
    """``acc[b, plane, r, j]`` for `attn_v._acc_total`: S_p of the block's row r, column j from its band sums
    (the plane's row sums at ``wsum[plane0 + p, m0 + r]``)."""

    def __init__(self, C, wsum, zp, bands: int, m0, plane0=0):
        self.C, self.wsum, self.zp, self.bands, self.m0, self.plane0 = C, wsum, zp, bands, m0, plane0

    def __getitem__(self, idx):
        _, p, r, j = idx
        s = self.C[p * self.bands + self.bands - 1, r, j] - self.zp[0] * self.wsum[self.plane0 + p, self.m0 + r]
        if self.bands == 2:
            s = (self.C[p * self.bands, r, j] << HI_SHIFT) + s
        return s


def band_byte(w, band, bands: int):
    """Byte ``band`` of weight w (int16 ≥ 0): with two bands W = 2^7·hi + lo (band 0 hi, band 1 lo), with one w."""
    if bands == 1:
        return w
    return tvm.tirx.Select(band == 0, w >> T.int16(HI_SHIFT), w & T.int16((1 << HI_SHIFT) - 1))


def attn_v_amx_func(Bt: int, M: int, N: int, D: int, *, groups: int = 1, f: int = 14, v_bits: int = 8,
                    epilogue: bool = True, emulate: bool = False):
    """PrimFunc ``main(W, V, zp, scale, out)`` (``main(W, V, zp, out)`` with the int64 acc when not ``epilogue``),
    `attn_v.attn_v`'s signature: W int16 ``[Bt, planes, M, Np]``, V u8 ``[Bt, N, D]``."""
    _check_args(N, groups, f, v_bits)
    if not fits(M, D, N):
        raise ValueError(f"amx attn@V needs M >= {ROWS}, D % {COLS} == 0 and N >= {CHUNK}, got M={M}, N={N}, D={D}")
    planes, bands = groups, weight_bands(f, groups)
    pb_count, n_w, kp = planes * bands, padded_tokens(N), ceil_to(N, K_STEP)
    k_steps, m_blocks, d_blocks = kp // K_STEP, -(-M // ROWS), D // COLS
    ta_shape, tb_shape, tc_shape = ((2, 16, 64), (2, 16, 64), (4, 16, 16)) if emulate else ((1,), (1,), (1,))

    @T.macro
    def split(w, wb, p, r, n):
        """Band bytes of weight w (row r, token n, plane p)."""
        for band in T.unroll(bands):
            wb[p * bands + band, r, n] = T.Cast("uint8", band_byte(w, band, bands))

    @T.macro
    def split_rows(W, wb, wsum, part, b):
        """Every row of every plane as u8 bands, and their sums Σ_{n<N} W, in whole vectors: the last vector ends
        at token N − 1 and re-splits tokens of the one before it (same bytes), adding only its new tokens to the
        sum."""
        for p, r in T.grid(planes, M):
            for ln in T.vectorized(CHUNK):
                part[ln] = 0
            for c in range(N // CHUNK):
                for ln in T.vectorized(CHUNK):
                    split(W[b, p, r, c * CHUNK + ln], wb, p, r, c * CHUNK + ln)
                    part[ln] = part[ln] + T.Cast("int32", W[b, p, r, c * CHUNK + ln])
            if N % CHUNK != 0:
                for ln in T.vectorized(CHUNK):
                    split(W[b, p, r, N - CHUNK + ln], wb, p, r, N - CHUNK + ln)
                    part[ln] = part[ln] + T.if_then_else(ln >= CHUNK - N % CHUNK,
                                                         T.Cast("int32", W[b, p, r, N - CHUNK + ln]), 0)
            wsum[p, r] = 0
            for ln in range(CHUNK):
                wsum[p, r] = wsum[p, r] + part[ln]

    zero_tiles, dot_tiles, store_tiles = tile_macros(emulate)

    @T.macro
    def band_products(wb, vp, ta, tb, tc, C, pb, m0, d0):
        """C[pb] = the 32 x 32 block of band pb's sums Σ_n band·v of rows m0.., columns d0.."""
        zero_tiles(tc)
        for kt in range(k_steps):
            if emulate:
                for i, r, j in T.grid(2, 16, 64):
                    ta[i, r, j] = wb[pb, m0 + 16 * i + r, kt * K_STEP + j]
                for i, r, j in T.grid(2, 16, 64):
                    tb[i, r, j] = vp[kt * 16 + r, d0 + 16 * i + j // 4, j % 4]
            else:
                for i in T.unroll(2):
                    T.evaluate(amx_intrin("tileloadd64", T.int8(4 + i), T.address_of(wb[pb, m0 + 16 * i, kt * K_STEP]),
                                          T.int64(kp)))
                for i in T.unroll(2):
                    T.evaluate(amx_intrin("tileloadd64", T.int8(6 + i), T.address_of(vp[kt * 16, d0 + 16 * i, 0]),
                                          T.int64(D * 4)))
            dot_tiles(ta, tb, tc, "tdpbuud")
        store_tiles(tc, C, pb)

    @T.macro
    def body(W, V, zp, scale, out):
        if not emulate:
            request_amx()
        for b in T.parallel(Bt):
            cfg = T.alloc_buffer((64,), "uint8", scope="local")
            vp = T.alloc_buffer((kp // 4, D, 4), "uint8", scope="local")
            wb = T.alloc_buffer((pb_count, M, kp), "uint8")
            wsum = T.alloc_buffer((planes, M), "int32", scope="local")
            part = T.alloc_buffer((CHUNK,), "int32", scope="local")
            C = T.alloc_buffer((pb_count, ROWS, COLS), "int32", scope="local")
            ta = T.alloc_buffer(ta_shape, "uint8", scope="local")
            tb = T.alloc_buffer(tb_shape, "uint8", scope="local")
            tc = T.alloc_buffer(tc_shape, "int32", scope="local")
            if not emulate:
                load_tile_config(cfg)
            for r, d, q in T.grid(kp // 4, D, 4):
                vp[r, d, q] = T.if_then_else(4 * r + q < N, V[b, T.min(4 * r + q, N - 1), d], T.uint8(0))
            for pb, r in T.grid(pb_count, M):  # tokens past N stay 0 (V is 0 there too)
                for n in T.vectorized(kp - N // CHUNK * CHUNK):
                    wb[pb, r, N // CHUNK * CHUNK + n] = T.uint8(0)
            split_rows(W, wb, wsum, part, b)
            for mb in range(m_blocks):
                m0 = T.meta_var(T.min(mb * ROWS, M - ROWS))
                for db in range(d_blocks):
                    for pb in range(pb_count):
                        band_products(wb, vp, ta, tb, tc, C, pb, m0, db * COLS)
                    for r in range(ROWS):
                        for j in T.vectorized(COLS):
                            total = T.meta_var(_acc_total(_PlaneSums(C, wsum, zp, bands, m0), b, r, j, planes, f))
                            if epilogue:
                                out[b, m0 + r, db * COLS + j] = T.Cast("float32", total) * scale[0]
                            else:
                                out[b, m0 + r, db * COLS + j] = total
            if not emulate:
                T.evaluate(amx_intrin("tilerelease"))

    w_shape = (Bt, planes, M, n_w)
    if epilogue:
        @T.prim_func
        def main(W: T.Buffer(w_shape, "int16"), V: T.Buffer((Bt, N, D), "uint8"), zp: T.Buffer((1,), "int32"),
                 scale: T.Buffer((1,), "float32"), out: T.Buffer((Bt, M, D), "float32")):
            T.func_attr({"global_symbol": "main", "tirx.noalias": True})
            body(W, V, zp, scale, out)

        return main

    @T.prim_func
    def main_acc(W: T.Buffer(w_shape, "int16"), V: T.Buffer((Bt, N, D), "uint8"), zp: T.Buffer((1,), "int32"),
                 out: T.Buffer((Bt, M, D), "int64")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        body(W, V, zp, None, out)

    return main_acc
