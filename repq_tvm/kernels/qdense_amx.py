"""AMX-INT8 quantized dense (Sapphire Rapids and newer Xeons): `tdpbusd` on 16 x 64-byte tiles.

Why: one `tdpbusd` multiplies a 16 x 64 u8 tile by a 64 x 16 s8 tile into 16 x 16 int32 accumulators,
16,384 MACs, where a `vpdpbusd` zmm does 64: on a 2-core Sapphire Rapids the VNNI linears of DeiT-Small sit
near the vpdpbusd peak and this kernel runs the same shapes well past it (`benchmarks/kernel_dense.py`).

Same operands and epilogue as `qdense`'s vnni variant: A ``[M, Kp]`` u8 codes, W ``[N/16, Kp/4, 16, 4]`` s8
(the VNNI packing is AMX's B layout: a 16-column x 64-k tile is ``W[nb, 16 kt : 16 kt + 16]``, 1 KB in
64-byte rows), the per-channel compensation ``comp[n] * sum_k A[m, k]`` (weights offset into int8,
`packing.weight_offset`; zeros when they fit) and the float epilogue
``(acc + comp[n] * asum[m] - zp_wsum[n]) * scale[n] + bias[n]``.  Only that form (always compensated,
always with the epilogue) exists: it is the one the compiler emits, and the row sums cost 1/N of the MACs.
After it, the tails the epilogue passes fuse: `epilogue.tail` (GELU → codes, a residual add) or the q/k/v
codes of a qkv projection (``qkv_codes``).

Blocking: 2 x 2 accumulator tiles (32 rows x 32 columns, tmm0-3), two A tiles (tmm4-5) and two B tiles
(tmm6-7) per 64-deep k step: all 8 tile registers.  Tasks run in parallel over 32-column blocks; each loads
the tile configuration, then walks all row blocks (its B panel, Kp x 32 bytes, stays in L1), asking for the next
block's panel a few lines per k step (`prefetch_ahead`: the whole DeiT-S W8/A8 6.87 → 6.55 ms, `compare_artifacts.py`,
Sapphire Rapids, 2 threads).  From
`ROWS_PARALLEL_M` rows (batch 8 of DeiT-Small: M = 1576) tasks run over row blocks instead and walk the column
blocks: A (up to 2.4 MB) no longer fits L2 and every column task read it again from L3, while W (<= 0.6 MB) stays in
L2 (DeiT-S batch 8: 56.7 -> 49.5 ms, `benchmarks/compare_artifacts.py`, Sapphire Rapids).  Either way software-
pipelined: block mb - 1's epilogue reads the other half of a two-block C buffer while block mb's tiles multiply
(fc1 with its GELU → codes epilogue, DeiT-Small 197x1536x384: 0.199 → 0.154 ms per call, the standalone column of
`repq-tvm profile` on the artifacts compiled at cb6fc26 and e8395c2, Sapphire Rapids, 2 threads), its rows spread
over block mb's k steps when K is deep (`SPREAD_K_STEPS`).  Ragged M (`row_blocks`): the last row block starts at M - 32,
recomputing rows the previous block stored and storing the same values again (no padding, no masks), or is a
16-row half block at M - 16.  Shapes the blocking cannot take (`fits`: M < 32, N % 32, Kp % 64) use vnni.

Linux gives a process AMX state only after it asks (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``,
else the first tile instruction is SIGILL): the kernel asks on every call (one syscall, well under a
microsecond against tens of microseconds of work), so an artifact needs nothing from the runtime.

``emulate=True`` builds the same kernel with the tile instructions replaced by plain loops on tile-shaped
buffers (same blocking, same indices, same epilogue): it runs on any CPU, so the kernel's indexing is
tested bit for bit where AMX is missing; the instructions themselves are checked in the assembly.
"""

from __future__ import annotations

from tvm.script import tirx as T

from . import (
    epilogue,
    macro_lookup,  # noqa: F401  (T.macro expansion without inspect's slow frame lookup)
)

ROWS, COLS, K_STEP = 32, 32, 64  # one block: 2 x 2 tiles of 16 rows x 16 int32 columns, k step of 64 bytes
# from this many k steps a block's epilogue is spread over the next block's k steps (`qdense_amx_func`): DeiT-Small's
# fc2 (24 steps) + residual 51 -> 44 us per call; with 6 steps (qkv, proj, fc1 + GELU) within noise or up to 5%
# slower (`benchmarks/kernel_amx_tails.py`, Sapphire Rapids, 2 threads)
SPREAD_K_STEPS = 12
HALF = 16  # rows of a half block (1 x 2 tiles): the last block when M % 32 is 1..16 (`row_blocks`)
# from this many rows (batch > 1 of a ViT) tasks run over row blocks: A ([M, K] codes, 0.6-2.4 MB for DeiT-Small
# at batch 8) no longer fits L2 and would be streamed again by every column-block task; W (<= 0.6 MB) does
ROWS_PARALLEL_M = 512
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


def fits(M: int, N: int, K: int) -> bool:
    """True if the AMX blocking takes this shape: at least one 32-row block, whole 32-column blocks, K
    padded to 4 a multiple of 64 (the k step)."""
    return M >= ROWS and N % COLS == 0 and -(-K // 4) * 4 % K_STEP == 0


def row_blocks(M: int) -> tuple[int, bool]:
    """(full 32-row blocks, whether a 16-row half block ends the rows).  Ragged M: the last full block starts at
    M - 32, or, when M % 32 is 1..16, a half block at M - 16 (a full one would recompute up to 31 rows: 27 of
    DeiT-Small's 197, 12% more work for the row-proportional epilogues)."""
    if M % ROWS == 0 or M < ROWS:
        return -(-M // ROWS), False
    if M % ROWS <= HALF:
        return M // ROWS, True
    return -(-M // ROWS), False


def amx_intrin(name: str, *args):
    """A call of the LLVM intrinsic ``llvm.x86.<name>`` (tile numbers must be immediates: unrolled loops)."""
    return T.call_llvm_intrin("void", f"llvm.x86.{name}", *args)


@T.macro
def request_amx():
    """``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`` (idempotent; see the module docstring)."""
    T.evaluate(T.call_extern("int64", "syscall", T.int64(_SYS_ARCH_PRCTL), T.int64(_ARCH_REQ_XCOMP_PERM),
                             T.int64(_XFEATURE_XTILEDATA)))


@T.macro
def load_tile_config(cfg):
    """``ldtilecfg`` of palette 1 with all 8 tiles 16 rows x 64 bytes (``cfg``: a 64-byte local buffer).
    The configuration is per thread: every parallel task loads it before its first tile instruction."""
    for i in range(64):
        cfg[i] = T.uint8(0)
    cfg[0] = T.uint8(1)
    for t in T.unroll(8):
        cfg[16 + 2 * t] = T.uint8(64)
        cfg[48 + t] = T.uint8(16)
    T.evaluate(amx_intrin("ldtilecfg", T.address_of(cfg[0])))


@T.macro
def zero_accumulators():
    """tilezero tmm0-3, the 2 x 2 accumulator tiles."""
    for c in T.unroll(4):
        T.evaluate(amx_intrin("tilezero", T.int8(c)))


@T.macro
def dot_2x2():
    """One k step of the 2 x 2 blocking: accumulator c (tmm0-3) += A tile c // 2 (tmm4-5, u8) x B tile c % 2
    (tmm6-7, s8)."""
    for c in T.unroll(4):
        T.evaluate(amx_intrin("tdpbusd", T.int8(c), T.int8(4 + c // 2), T.int8(6 + c % 2)))


def tile_macros(emulate: bool, rows: int = ROWS):
    """(zero, dot, store) of the 2 x 2 blocking, shared by the AMX kernels: ``zero(tc)`` the accumulators tmm0-3,
    ``dot(ta, tb, tc, instr)`` one k step (``instr`` "tdpbusd" u8 x s8 or "tdpbuud" u8 x u8: accumulator c +=
    A tile c // 2 (tmm4-5) x B tile c % 2 (tmm6-7)), ``store(tc, C, slot)`` the accumulators into the 32 x 32 int32
    block ``C[slot]``.  ``emulate``: plain loops on tile-shaped buffers ``ta``, ``tb`` [2, 16, 64], ``tc`` [4, 16, 16]
    (any CPU); else the instructions (the buffers unused).  ``rows`` = `HALF`: the 1 x 2 blocking of a 16-row block
    (accumulators tmm0-1 from A tile tmm4, the block's first 16 rows of ``C[slot]``)."""
    acc = 4 if rows == ROWS else 2

    @T.macro
    def zero(tc):
        if emulate:
            for c, r, j in T.grid(acc, 16, 16):
                tc[c, r, j] = 0
        else:
            for c in T.unroll(acc):
                T.evaluate(amx_intrin("tilezero", T.int8(c)))

    @T.macro
    def dot(ta, tb, tc, instr):
        if emulate:  # C[m, n] += sum_{r, q} A[m, 4r + q] * B[r, 4n + q]
            for c, m, n, r, q in T.grid(acc, 16, 16, 16, 4):
                tc[c, m, n] = tc[c, m, n] + T.Cast("int32", ta[c // 2, m, 4 * r + q]) * T.Cast(
                    "int32", tb[c % 2, r, 4 * n + q])
        else:
            for c in T.unroll(acc):
                T.evaluate(amx_intrin(instr, T.int8(c), T.int8(4 + c // 2), T.int8(6 + c % 2)))

    @T.macro
    def store(tc, C, slot):
        if emulate:
            for c, r, j in T.grid(acc, 16, 16):
                C[slot, (c // 2) * 16 + r, (c % 2) * 16 + j] = tc[c, r, j]
        else:
            for c in T.unroll(acc):
                T.evaluate(amx_intrin("tilestored64", T.int8(c), T.address_of(C[slot, (c // 2) * 16, (c % 2) * 16]),
                                      T.int64(COLS * 4)))

    return zero, dot, store


def qdense_amx_func(M: int, N: int, K: int, emulate: bool = False, gelu_codes: int | None = None,
                    residual: bool = False, qkv_codes: dict | None = None, prefetch: bool = True):
    """The PrimFunc ``main(A, W, comp, zp_wsum, scale, bias, [quant | res,] out)`` (signature of `qdense.qdense`
    with compensation and epilogue).  ``emulate``: plain-loop tiles instead of AMX instructions (any CPU).
    The tails of `epilogue.tail`: ``gelu_codes`` (the top code): ``out`` holds the uint8 codes of GELU of the
    result under the run-time quantizer ``quant`` (float32 [3], `epilogue.quantizer_args`); ``residual``:
    ``out = res + result``.  ``qkv_codes`` ({"tokens", "heads", "tops": the three codes' 2^b − 1}): the result is
    a fused q/k/v projection ``[B·tokens, 3·heads·D]``; ``out`` is three outputs ``q, k, v`` ``[B, heads, tokens,
    D]`` uint8 (in place of ``out``), each the codes under its own quantizer, row i of the run-time operand
    ``quant`` float32 [3, 3] (after ``bias``; `epilogue.quantizer_args` of q's, k's, v's), in the layout the
    attention kernels read (`passes.qkv_codes_epilogue`).  Why operands: the blocks' qkv kernels are then one.
    ``prefetch`` False: the column tasks do not ask for the next block's weights ahead (`prefetch_ahead`; to
    compare)."""
    if not fits(M, N, K):
        raise ValueError(f"amx qdense needs M >= {ROWS}, N % {COLS} == 0 and K padded to 4 a multiple of {K_STEP}, "
                         f"got {M}x{N}x{K}")
    Kp = -(-K // 4) * 4
    n_blocks, k_steps = N // COLS, Kp // K_STEP
    full, half = row_blocks(M)
    spread = k_steps >= SPREAD_K_STEPS
    rows_parallel = M >= ROWS_PARALLEL_M
    # emulated tile registers: 2 A tiles (16 x 64 u8), 2 B tiles (16 x 64 s8), 4 accumulators (16 x 16 s32)
    out_dtype = "float32" if gelu_codes is None and qkv_codes is None else "uint8"
    out_shape = (M, N)
    if qkv_codes is not None:
        tokens, heads = qkv_codes["tokens"], qkv_codes["heads"]
        dim = N // (3 * heads)
        if M % tokens or N % (3 * heads) or dim % COLS:
            raise ValueError(f"qkv codes need M = B x {tokens} tokens and N = 3 x {heads} heads x D with D % {COLS} "
                             f"== 0, got {M}x{N}")
        out_shape = (M // tokens, heads, tokens, dim)
        tops = [int(t) for t in qkv_codes["tops"]]

    def result(C, slot, comp, asum, zp_wsum, scale, bias, r, m, n):
        """The float epilogue of accumulator C[slot, r, n mod 32] of output row m, column n (`qdense.qdense`'s)."""
        return T.Cast("float32", C[slot, r, n % COLS] + comp[n] * asum[m] - zp_wsum[n]) * scale[n] + bias[n]

    def tail(y, extra, m, n):
        """``extra``: the quantizer operand of GELU → codes, the residual input of a residual add, or None."""
        if gelu_codes is not None:
            return epilogue.tail(y, (epilogue.Quantizer.loaded(extra), gelu_codes))
        return epilogue.tail(y, None, None if extra is None else extra[m, n])

    ta_shape, tb_shape, tc_shape = ((2, 16, 64), (2, 16, 64), (4, 16, 16)) if emulate else ((1,), (1,), (1,))

    @T.macro
    def ask_permission():
        if not emulate:
            request_amx()

    @T.macro
    def configure(cfg):
        if not emulate:
            load_tile_config(cfg)

    @T.macro
    def load(A, W, ta, tb, m0, nb, kt, a_tiles):
        if emulate:
            for i, r, j in T.grid(a_tiles, 16, 64):
                ta[i, r, j] = A[m0 + 16 * i + r, kt * 64 + j]
            for i, r, j in T.grid(2, 16, 64):
                tb[i, r, j] = W[nb * 2 + i, kt * 16 + r, j // 4, j % 4]
        else:
            for i in T.unroll(a_tiles):
                T.evaluate(amx_intrin("tileloadd64", T.int8(4 + i), T.address_of(A[m0 + 16 * i, kt * 64]), T.int64(Kp)))
            for i in T.unroll(2):
                T.evaluate(amx_intrin("tileloadd64", T.int8(6 + i), T.address_of(W[nb * 2 + i, kt * 16, 0, 0]), T.int64(64)))

    @T.macro
    def qkv_row(out, C, slot, comp, asum, zp_wsum, scale, bias, quant, m0, r, nb, which, top):  # q, k or v
        """Row r of the block's codes if column block nb belongs to q, k or v = ``which`` (its quantizer: row
        ``which`` of ``quant``): head h = its columns // D, dims from its columns % D; row m0 + r = image b,
        token t."""
        if nb * COLS // (heads * dim) == which:
            for j in T.vectorized(COLS):
                out[(m0 + r) // tokens, nb * COLS % (heads * dim) // dim, (m0 + r) % tokens,
                    nb * COLS % dim + j] = epilogue.quantize_codes(
                        result(C, slot, comp, asum, zp_wsum, scale, bias, r, m0 + r, nb * COLS + j),
                        epilogue.Quantizer.loaded(quant, which), top)

    @T.macro
    def finish_rows(C, slot, comp, asum, zp_wsum, scale, bias, res, out, m0, nb, r_lo, r_hi):
        if qkv_codes is None:
            for r in range(r_lo, r_hi):
                for j in T.vectorized(COLS):
                    out[m0 + r, nb * COLS + j] = tail(
                        result(C, slot, comp, asum, zp_wsum, scale, bias, r, m0 + r, nb * COLS + j), res, m0 + r,
                        nb * COLS + j)
        else:
            for r in range(r_lo, r_hi):  # one branch per q, k, v: its quantizer, the unfused ops' operations
                qkv_row(out[0], C, slot, comp, asum, zp_wsum, scale, bias, res, m0, r, nb, 0, tops[0])
                qkv_row(out[1], C, slot, comp, asum, zp_wsum, scale, bias, res, m0, r, nb, 1, tops[1])
                qkv_row(out[2], C, slot, comp, asum, zp_wsum, scale, bias, res, m0, r, nb, 2, tops[2])

    @T.macro
    def finish(C, slot, ep, m0, nb, r_lo, r_hi):
        """The epilogue (and tail) of rows r_lo .. r_hi - 1 of the block at rows m0.., column block nb, from C[slot];
        ``ep`` = (comp, asum, zp_wsum, scale, bias, the tail's input (`tail`), out)."""
        finish_rows(C, slot, ep[0], ep[1], ep[2], ep[3], ep[4], ep[5], ep[6], m0, nb, r_lo, r_hi)

    per_block = -(-32 // full)  # of a k step's 32 weight lines (2 tiles x 16 rows of 64 bytes), per full row block

    @T.macro
    def prefetch_ahead(W, nb, kt, first):
        """Ask for `per_block` of the 32 weight lines column block nb's k step kt reads, from line ``first`` (those
        below 32), into L2 (``prefetcht1``); none for nb past the last block, for ``first`` None, or emulated.
        Why: in a model a linear's weights come from L3 or memory (the other layers' weights passed through the caches
        since its last call) and each column task's first row block waited for them: the DeiT-S linears took 20-30%
        longer with cold weights than warm (`benchmarks/kernel_dense.py --cold 24`, Sapphire Rapids, 2 threads)."""
        if prefetch and not emulate and first is not None:
            if nb < n_blocks:
                for ln in T.unroll(per_block):
                    if first + ln < 32:
                        T.evaluate(T.call_llvm_intrin(
                            "void", "llvm.prefetch.p0",
                            T.address_of(W[nb * 2 + (first + ln) // 16, kt * 16 + (first + ln) % 16, 0, 0]), 0, 2, 1))

    def products_of(rows: int):
        """The macro ``products(A, W, ta, tb, tc, C, m0, nb, slot, ep, prev, ahead)``: the accumulators of the block
        of ``rows`` rows from m0, column block nb, into C[slot].  ``prev`` = (slot, m0, nb, rows) of the block before
        (or None): its epilogue (`finish`, operands ``ep``), after the products, or with `SPREAD_K_STEPS` k steps
        or more a share of its rows after each k step's tile products: issued after many products, the epilogue
        waited behind them (the reorder buffer holds a few hundred instructions, a 32 x 32 epilogue thousands).
        ``ahead`` = (column block, first line or None): with each k step, `prefetch_ahead` of that block's lines of the
        same k step from the first (the next column block's weights, spread over this one's row blocks)."""
        zero, dot, store = tile_macros(emulate, rows)

        @T.macro
        def products(A, W, ta, tb, tc, C, m0, nb, slot, ep, prev, ahead):
            zero(tc)
            for kt in range(k_steps):
                load(A, W, ta, tb, m0, nb, kt, rows // 16)
                dot(ta, tb, tc, "tdpbusd")
                prefetch_ahead(W, ahead[0], kt, ahead[1])
                if spread and prev is not None:
                    finish(C, prev[0], ep, prev[1], prev[2], kt * prev[3] // k_steps, (kt + 1) * prev[3] // k_steps)
            store(tc, C, slot)
            if not spread and prev is not None:
                finish(C, prev[0], ep, prev[1], prev[2], 0, prev[3])

        return products

    products, products_half = products_of(ROWS), products_of(HALF)

    blocks = {ROWS: products, HALF: products_half}

    @T.macro
    def row_task(A, W, ep, C, ta, tb, tc, m0, rows):
        """A row-block task of ``rows`` rows from m0 walking the column blocks, each block's epilogue spread over
        the next one's products."""
        blocks[rows](A, W, ta, tb, tc, C, m0, 0, 0, ep, None, (0, None))
        for nb in range(1, n_blocks):
            blocks[rows](A, W, ta, tb, tc, C, m0, nb, nb % 2, ep, ((nb - 1) % 2, m0, nb - 1, rows), (0, None))
        finish(C, (n_blocks - 1) % 2, ep, m0, n_blocks - 1, 0, rows)

    @T.macro
    def body(A, W, comp, zp_wsum, scale, bias, res, out):
        asum = T.alloc_buffer((M,), "int32")
        ask_permission()
        for m in T.parallel(M):
            asum[m] = 0
            for k in range(Kp):
                asum[m] = asum[m] + T.Cast("int32", A[m, k])
        ep = T.meta_var((comp, asum, zp_wsum, scale, bias, res, out))
        if rows_parallel:  # tasks over row blocks, each walking the column blocks (W stays in L2)
            for mb in T.parallel(full + half):
                cfg = T.alloc_buffer((64,), "uint8", scope="local")
                C = T.alloc_buffer((2, ROWS, COLS), "int32", scope="local")
                ta = T.alloc_buffer(ta_shape, "uint8", scope="local")
                tb = T.alloc_buffer(tb_shape, "int8", scope="local")
                tc = T.alloc_buffer(tc_shape, "int32", scope="local")
                configure(cfg)
                if half:
                    if mb < full:
                        row_task(A, W, ep, C, ta, tb, tc, mb * ROWS, ROWS)
                    else:
                        row_task(A, W, ep, C, ta, tb, tc, M - HALF, HALF)
                else:
                    row_task(A, W, ep, C, ta, tb, tc, T.min(mb * ROWS, M - ROWS), ROWS)
                if not emulate:
                    T.evaluate(amx_intrin("tilerelease"))
        else:  # tasks over column blocks, each walking the row blocks (its B panel stays in L1)
            for nb in T.parallel(n_blocks):
                cfg = T.alloc_buffer((64,), "uint8", scope="local")
                C = T.alloc_buffer((2, ROWS, COLS), "int32", scope="local")  # two blocks: see the module docstring
                ta = T.alloc_buffer(ta_shape, "uint8", scope="local")
                tb = T.alloc_buffer(tb_shape, "int8", scope="local")
                tc = T.alloc_buffer(tc_shape, "int32", scope="local")
                configure(cfg)
                # software-pipelined: block mb's epilogue runs during block mb + 1's tile products (`products_of`),
                # from the other half of C
                # and the next column block's weights asked for while this one's run (`prefetch_ahead`)
                products(A, W, ta, tb, tc, C, 0, nb, 0, ep, None, (nb + 1, 0))
                for mb in range(1, full):
                    products(A, W, ta, tb, tc, C, T.min(mb * ROWS, M - ROWS), nb, mb % 2, ep,
                             ((mb - 1) % 2, T.min((mb - 1) * ROWS, M - ROWS), nb, ROWS),
                             (nb + 1, mb * per_block))
                if half:
                    products_half(A, W, ta, tb, tc, C, M - HALF, nb, full % 2, ep,
                                  ((full - 1) % 2, (full - 1) * ROWS, nb, ROWS), (nb + 1, None))
                    finish(C, full % 2, ep, M - HALF, nb, 0, HALF)
                else:
                    finish(C, (full - 1) % 2, ep, M - ROWS, nb, 0, ROWS)
                if not emulate:
                    T.evaluate(amx_intrin("tilerelease"))

    # TVMScript signatures are fixed: one function per parameter list, the same body
    if qkv_codes is not None:
        @T.prim_func
        def main_qkv(A: T.Buffer((M, Kp), "uint8"), W: T.Buffer((N // 16, Kp // 4, 16, 4), "int8"),
                     comp: T.Buffer((N,), "int32"), zp_wsum: T.Buffer((N,), "int32"),
                     scale: T.Buffer((N,), "float32"), bias: T.Buffer((N,), "float32"),
                     quant: T.Buffer((3, epilogue.QUANT), "float32"), q: T.Buffer(out_shape, "uint8"),
                     k: T.Buffer(out_shape, "uint8"), v: T.Buffer(out_shape, "uint8")):
            T.func_attr({"global_symbol": "main", "tirx.noalias": True})
            body(A, W, comp, zp_wsum, scale, bias, quant, (q, k, v))

        return main_qkv

    if gelu_codes is not None:
        @T.prim_func
        def main_gelu(A: T.Buffer((M, Kp), "uint8"), W: T.Buffer((N // 16, Kp // 4, 16, 4), "int8"),
                      comp: T.Buffer((N,), "int32"), zp_wsum: T.Buffer((N,), "int32"),
                      scale: T.Buffer((N,), "float32"), bias: T.Buffer((N,), "float32"),
                      quant: T.Buffer((epilogue.QUANT,), "float32"), out: T.Buffer(out_shape, out_dtype)):
            T.func_attr({"global_symbol": "main", "tirx.noalias": True})
            body(A, W, comp, zp_wsum, scale, bias, quant, out)

        return main_gelu

    if residual:
        @T.prim_func
        def main_res(A: T.Buffer((M, Kp), "uint8"), W: T.Buffer((N // 16, Kp // 4, 16, 4), "int8"),
                     comp: T.Buffer((N,), "int32"), zp_wsum: T.Buffer((N,), "int32"),
                     scale: T.Buffer((N,), "float32"), bias: T.Buffer((N,), "float32"),
                     res: T.Buffer((M, N), "float32"), out: T.Buffer(out_shape, out_dtype)):
            T.func_attr({"global_symbol": "main", "tirx.noalias": True})
            body(A, W, comp, zp_wsum, scale, bias, res, out)

        return main_res

    @T.prim_func
    def main(A: T.Buffer((M, Kp), "uint8"), W: T.Buffer((N // 16, Kp // 4, 16, 4), "int8"),
             comp: T.Buffer((N,), "int32"), zp_wsum: T.Buffer((N,), "int32"), scale: T.Buffer((N,), "float32"),
             bias: T.Buffer((N,), "float32"), out: T.Buffer(out_shape, out_dtype)):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        body(A, W, comp, zp_wsum, scale, bias, None, out)

    return main
