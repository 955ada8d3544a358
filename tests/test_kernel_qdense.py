"""qdense kernels: bit-exact int32 accumulators for every variant, fused epilogue, variant choice, codegen.

Every variant is checked on every x86 host: the ones the CPU can run (AVX2 everywhere, VNNI on
AVX-512 VNNI CPUs) run for real, bit for bit, with the extreme codes at the edge of their exactness
bound.  VNNI also runs everywhere as its portable stand-in ("ref"): the same tensorized schedule,
packing, 8-bit weight compensation and epilogue, with the plain-loop twin of the intrinsic (u8 x s8,
4-wide sums into int32) compiled for the host; its instruction and operand order are checked in the asm.
"""

import re

import numpy as np
import pytest
import tvm

from conftest import extreme_codes
from repq_tvm import targets
from repq_tvm.kernels import packing as P
from repq_tvm.kernels import qdense as Q
from repq_tvm.kernels.intrinsics_x86 import register_intrinsics
from repq_tvm.testing.qdense import build_qdense

SHAPES = [
    (65, 384, 128),
    (197, 384, 384),
    (7, 200, 130),  # M below a tile; N = 25 ymm blocks (odd), K not a multiple of 4
    (33, 1000, 190),  # 1000 classes: N pads to 1008; K pads to 192
]
# (variant, bits_a, bits_w, ref): each at the edge of its exactness bound (see `_operands`); 8-bit
# weights on int8 variants are centred 8-bit codes (+-255), offset into int8 and compensated in-kernel
KERNELS = [
    ("avx2_u8s8", 6, 6, False),  # depth 4 where K allows: 8 products of 63*63 = 31752 in int16
    ("avx2_u8s8", 8, 6, False),  # depth 1: 2*255*63 = 32130
    ("avx2_u8s8", 6, 8, False),  # depth 2: 4*63*128 = 32256, compensated
    ("avx2_i16", 8, 8, False),
    ("fallback", 8, 8, False),  # compensated
    ("fallback", 4, 4, False),
    ("vnni", 8, 8, True),  # the portable stand-in, any CPU, compensated
    ("vnni", 8, 8, False),  # the real instruction, VNNI CPUs only
    ("vnni", 4, 4, False),
]
IDS = [f"{v}-a{a}w{w}{'-ref' if r else ''}" for v, a, w, r in KERNELS]
HOST_FLAGS = targets.host_flags()


def _target(variant, ref):
    """The host's target; skip (naming the missing CPU feature) what this CPU cannot execute."""
    if variant.startswith("avx2") and "avx2" not in HOST_FLAGS:
        pytest.skip("this CPU lacks avx2")
    if variant == "vnni" and not ref and "avx512_vnni" not in HOST_FLAGS:
        pytest.skip("this CPU lacks avx512_vnni: VNNI is checked through its stand-in (ref) and its asm")
    return Q.host_target(1)


def _operands(M, N, K, variant, bits_a, bits_w, seed=0):
    """`conftest.extreme_codes`: the +-255 8-bit range is what the int16 and compensated int8 variants take."""
    return extreme_codes(M, N, K, bits_a, bits_w, seed)


def _build(M, N, K, variant, bits_a, bits_w, ref, **kw):
    """`build_qdense` for the host; 8-bit weights on int8 variants get the compensation by default."""
    return build_qdense(
        M, N, K, _target(variant, ref), variant=variant, bits_a=bits_a, bits_w=bits_w, ref=ref, **kw
    )


# --- layouts and exactness bounds ---------------------------------------------------------------
@pytest.mark.parametrize("lanes,kpack,dtype", [(16, 4, np.int8), (8, 4, np.int8), (8, 2, np.int16)])
def test_pack_weight_roundtrip_and_zero_padding(lanes, kpack, dtype):
    w = np.random.default_rng(0).integers(-128, 128, (20, 7)).astype(dtype)
    packed = P.pack_weight(w, lanes, kpack, dtype)
    n_p, k_p = P.ceil_to(20, lanes), P.ceil_to(7, kpack)
    assert packed.shape == (n_p // lanes, k_p // kpack, lanes, kpack) and packed.dtype == dtype
    assert np.array_equal(P.unpack_weight(packed, 20, 7), w)
    full = P.unpack_weight(packed)
    assert full.shape == (n_p, k_p) and not full[20:].any() and not full[:, 7:].any()
    assert packed[18 // lanes, 3 // kpack, 18 % lanes, 3 % kpack] == w[18, 3]


def test_pack_weight_refuses_values_that_would_wrap():
    with pytest.raises(ValueError, match="do not fit int8"):
        P.pack_weight(np.array([[200]], np.int16), 8, 4, np.int8)


def test_center_activation_keeps_padding_zero():
    a = np.array([[0, 255, 7]], np.uint8)
    assert np.array_equal(P.center_activation(a, 100, kpack=2), [[-100, 155, -93, 0]])


@pytest.mark.parametrize(
    "bits_a,bits_w,depth,exact",
    [(4, 4, 4, True), (6, 6, 4, True), (6, 6, 8, False), (8, 6, 1, True), (8, 6, 2, False),
     (6, 8, 2, True), (8, 7, 1, False), (8, 8, 1, False)],
)
def test_u8s8_bound(bits_a, bits_w, depth, exact):
    assert P.u8s8_is_exact(bits_a, bits_w, depth) is exact


def test_choose_variant_by_target_and_bits():
    assert Q.choose_variant(Q.X86_AVX2_TARGET, 6, 6).name == "avx2_u8s8"
    assert Q.choose_variant(Q.X86_AVX2_TARGET, 8, 6).name == "avx2_u8s8"
    assert Q.choose_variant(Q.X86_AVX2_TARGET, 8, 8).name == "avx2_i16"
    assert Q.choose_variant(Q.X86_VNNI_TARGET, 8, 8).name == "vnni"
    assert Q.choose_variant(Q.AARCH64_TARGET, 4, 4).name == "neon_sdot"
    assert Q.choose_variant(Q.AARCH64_TARGET, 8, 8).name == "neon_sdot"
    assert Q.choose_variant(Q.AARCH64_NEON_TARGET, 4, 4).name == "fallback"
    assert Q.VARIANTS["avx2_u8s8"].max_depth(6, 6, 384) == 4
    assert Q.VARIANTS["avx2_u8s8"].max_depth(6, 6, 136) == 2  # 34 k tiles
    assert Q.VARIANTS["avx2_u8s8"].max_depth(8, 6, 384) == 1


def test_saturating_u8s8_is_refused():
    with pytest.raises(ValueError, match="not exact"):
        build_qdense(16, 16, 16, Q.X86_AVX2_TARGET, variant="avx2_u8s8", bits_a=8, bits_w=8)
    with pytest.raises(ValueError, match="not exact"):
        build_qdense(16, 16, 16, Q.X86_AVX2_TARGET, variant="avx2_u8s8", bits_a=8, bits_w=6, depth=2)
    with pytest.raises(ValueError, match="no depth-8"):
        build_qdense(16, 16, 32, Q.X86_AVX2_TARGET, variant="avx2_u8s8", bits_a=4, bits_w=4, depth=8)
    with pytest.raises(ValueError, match="lacks avx2"):
        build_qdense(16, 16, 16, Q.AARCH64_TARGET, variant="avx2_i16")


def test_u8s8_bound_is_real_and_checked_at_call():
    """Codes past the bound really saturate (so the refusal matters), and __call__ rejects them."""
    M, N, K = 4, 8, 16
    kernel = _build(M, N, K, "avx2_u8s8", 6, 6, False, depth=1)
    a = np.full((M, K), 255, np.uint8)
    w = np.full((N, K), -128, np.int8)
    args = kernel._args(kernel.prepare_activation(a), kernel.pack_weight(w))
    kernel.function()(*args)
    assert (args[-1].numpy() == 16 // 2 * -32768).all()  # each pair sum clamps to -32768
    assert not (args[-1].numpy() == P.reference(a, w)).any()
    with pytest.raises(ValueError, match="exceeds bits_a"):
        kernel(kernel.prepare_activation(a), kernel.pack_weight(w))


def test_weight_offset_moves_8bit_rows_into_int8():
    w = np.array([[-255, -200, 0], [255, 130, 200], [-128, 0, 127], [-100, 100, 155]])
    d = P.weight_offset(w)
    assert d.tolist() == [-127, 128, 0, 28]
    shifted = w - d[:, None]
    assert shifted.min() >= -128 and shifted.max() <= 127
    assert P.needs_offset(w) and not P.needs_offset(np.array([[-128, 127]]))
    with pytest.raises(ValueError, match="spans 256 > 255"):
        P.weight_offset(np.array([[-128, 128]]))


def test_compensation_needs_an_int8_variant():
    with pytest.raises(ValueError, match="no compensation"):
        build_qdense(16, 16, 16, Q.X86_AVX2_TARGET, variant="avx2_i16", compensate=True)


# --- bit exactness -----------------------------------------------------------------------------
@pytest.mark.parametrize("variant,bits_a,bits_w,ref", KERNELS, ids=IDS)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_accumulator_is_exact(M, N, K, variant, bits_a, bits_w, ref):
    a, w = _operands(M, N, K, variant, bits_a, bits_w)
    kernel = _build(M, N, K, variant, bits_a, bits_w, ref)
    out = kernel(kernel.prepare_activation(a), *kernel.weight_args(w))
    assert out.dtype == np.int32 and out.shape == (M, N)
    np.testing.assert_array_equal(out.astype(np.int64), P.reference(a, w))


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_u8s8_every_depth_is_exact(depth):
    a, w = _operands(37, 128, 256, "avx2_u8s8", 6, 6, seed=3)
    kernel = _build(37, 128, 256, "avx2_u8s8", 6, 6, False, depth=depth)
    assert kernel.tiles[2] == depth
    out = kernel(kernel.prepare_activation(a), *kernel.weight_args(w))
    np.testing.assert_array_equal(out.astype(np.int64), P.reference(a, w))


def test_int16_centered_activations_need_no_zero_point_correction():
    M, N, K, a_zp = 9, 24, 40, 131
    a, w = _operands(M, N, K, "avx2_i16", 8, 8, seed=4)
    kernel = _build(M, N, K, "avx2_i16", 8, 8, False)
    out = kernel(kernel.prepare_activation(a, a_zp), *kernel.weight_args(w))
    np.testing.assert_array_equal(out, (a.astype(np.int64) - a_zp) @ w.astype(np.int64).T)


def test_default_row_tiles_are_the_largest_two_sizes():
    """Rows per tile: the largest size or one less, whichever pads fewer rows; no smaller tiles (4-row int16 ones
    were slower on Swin-T's 196 / 784 / 3136 rows than the 2 padded rows they save)."""
    assert [Q.default_tiles(m, 384, "avx2_i16") for m in (197, 196, 784, 3136, 49)] == [(6, 2), (6, 2), (5, 2),
                                                                                        (6, 2), (5, 2)]
    assert Q.default_tiles(196, 384, "avx2_u8s8", 4) == (6, 1)  # not 4 rows, though 196 = 49 x 4
    assert [Q.default_tiles(m, 384, "vnni") for m in (197, 196, 1576)] == [(5, 3), (4, 3), (4, 3)]
    assert Q.default_tiles(3, 384, "avx2_i16") == (3, 2)  # fewer rows than a tile: one tile of M


def test_large_m_int16_kernels_run_column_blocks():
    """From `BLOCK_MIN_ROWS` rows, int16 kernels whose weights exceed `BLOCK_BYTES` run L2-sized blocks of column
    tiles outermost (serial), row tiles in parallel inside; fewer rows, int8 weights, compensated or row-gathering
    kernels keep rows outer.  The block divides the column tiles."""
    i16, u8s8 = Q.VARIANTS["avx2_i16"], Q.VARIANTS["avx2_u8s8"]
    # DeiT-S at batch 8: fc1, qkv, fc2 (16-column tiles of 12 / 12 / 48 KB)
    assert [Q.column_block(1576, n, k, i16, 2) for n, k in ((1536, 384), (1152, 384), (384, 1536))] == [16, 18, 4]
    assert Q.column_block(197, 1536, 384, i16, 2) is None  # batch 1
    assert Q.column_block(1576, 1536, 384, u8s8, 1) is None  # int8 weights
    assert Q.column_block(1576, 1536, 384, i16, 2, gather=True) is None
    assert Q.column_block(1576, 128, 384, i16, 2) is None  # 96 KB of weights: one block is all of them
    sch = Q.schedule_qdense(1030, 1024, 160, Q.X86_AVX2_TARGET, variant="avx2_i16", epilogue=True)[0]
    loops = [sch.get(lp) for lp in sch.get_loops(sch.get_sblock("out"))]
    assert [int(lp.extent) for lp in loops[:3]] == [2, 206, 32]  # 2 blocks x 206 row tiles (of 5) x 32 column tiles
    serial, parallel = tvm.tirx.ForKind.SERIAL, tvm.tirx.ForKind.PARALLEL
    assert [lp.kind for lp in loops[:3]] == [serial, parallel, serial]
    sch = Q.schedule_qdense(197, 1024, 160, Q.X86_AVX2_TARGET, variant="avx2_i16", epilogue=True)[0]
    assert sch.get(sch.get_loops(sch.get_sblock("out"))[0]).kind == parallel  # rows x tiles, fused


def test_column_blocks_are_exact_with_every_tail():
    """The blocks order (1031 rows: ragged; 2 blocks) gives the rows order's results bit for bit: the int32
    accumulator against the integer reference, fc1's GELU → codes tail (AVX2's centred int16 codes) and the
    residual add against the same kernels with rows outer."""
    from repq_tvm.kernels.epilogue import ZERO_POINT

    M, N, K = 1031, 1024, 160
    _target("avx2_i16", False)
    a, w = _operands(M, N, K, "avx2_i16", 8, 8, seed=5)
    kernel = _build(M, N, K, "avx2_i16", 8, 8, False)
    np.testing.assert_array_equal(kernel(kernel.prepare_activation(a), *kernel.weight_args(w)).astype(np.int64),
                                  P.reference(a, w))
    rng = np.random.default_rng(6)
    w_scale = np.full(N, 3.0 / (255 * 255 * K ** 0.5 / 3), np.float32)  # GELU's inputs a few units wide
    bias, res = rng.normal(0, 1, N).astype(np.float32), rng.normal(0, 1, (M, N)).astype(np.float32)
    tails = [{"gelu_codes": (0.02, 131, 255), "codes_operand": ("int16", ZERO_POINT)}, {"residual": True}]
    for tail in tails:
        outs = []
        for blocks in (True, False):  # blocks, then rows outer
            k = _build(M, N, K, "avx2_i16", 8, 8, False, epilogue=True, column_blocks=blocks, **tail)
            params = k.epilogue_params(w, w_scale, 1.0, 0, bias)
            outs.append(k(k.prepare_activation(a), *k.weight_args(w), *params, *([res] if "residual" in tail else [])))
        np.testing.assert_array_equal(outs[0], outs[1])
        assert len(np.unique(outs[0])) > 100


@pytest.mark.parametrize("variant,bits_a,bits_w,ref", [KERNELS[i] for i in (3, 6, 7)], ids=[IDS[i] for i in (3, 6, 7)])
@pytest.mark.parametrize("bits", [8, 4])
def test_column_codes_are_each_columns_quantizer_of_the_float_result(variant, bits_a, bits_w, ref, bits):
    """``column_codes``: a qkv projection (N = 3 thirds of 2 heads x 64) stores the uint8 codes of its float result
    under a quantizer per column, those of its q, k and v thirds: `reference.ops.quantize` (round half to even, then
    the b-bit clip) of the same kernel's float output, column by column."""
    from repq_tvm.kernels.epilogue import quantizer_args
    from repq_tvm.reference import ops

    M, N, K = 45, 3 * 128, 160
    a, w = _operands(M, N, K, variant, bits_a, bits_w, seed=7)
    rng = np.random.default_rng(8)
    w_scale = np.full(N, 3.0 / (255 * 255 * K ** 0.5 / 3), np.float32)  # results a few units wide
    bias = rng.normal(0, 1, N).astype(np.float32)
    thirds = [(0.031, 131), (0.027, 120), (0.05, 2 ** (bits - 1))]
    scales = np.repeat([s for s, _ in thirds], N // 3).astype(np.float32)
    zps = np.repeat([z for _, z in thirds], N // 3)
    rows = np.repeat(np.stack([quantizer_args(s, z) for s, z in thirds]).T, N // 3, axis=1)  # [3, N]
    floats = _build(M, N, K, variant, bits_a, bits_w, ref, epilogue=True)
    coded = _build(M, N, K, variant, bits_a, bits_w, ref, epilogue=True, column_codes=(rows, 2 ** bits - 1))
    params = floats.epilogue_params(w, w_scale, 1.0, 0, bias)
    y = floats(floats.prepare_activation(a), *floats.weight_args(w), *params)
    codes = coded(coded.prepare_activation(a), *coded.weight_args(w), *params)
    want = np.stack([ops.quantize(y[:, n], scales[n], zps[n], bits) for n in range(N)], axis=1)
    assert codes.dtype == np.uint8 and codes.shape == (M, N)
    np.testing.assert_array_equal(codes, want)
    assert len(np.unique(codes)) == 2 ** bits and len(np.unique(codes[:, : N // 3])) > 2 ** bits // 2
    with pytest.raises(ValueError, match="one tail per kernel"):
        Q.schedule_qdense(M, N, K, Q.host_target(1), variant=variant, bits_a=bits_a, bits_w=bits_w, epilogue=True,
                          ref=True, residual=True, column_codes=255)


EPILOGUE = [0, 2, 3, 4, 6, 7]


@pytest.mark.parametrize(
    "variant,bits_a,bits_w,ref", [KERNELS[i] for i in EPILOGUE], ids=[IDS[i] for i in EPILOGUE]
)
@pytest.mark.parametrize("M,N,K", [(197, 384, 384), (7, 200, 130)])
def test_fused_epilogue_matches_numpy(M, N, K, variant, bits_a, bits_w, ref):
    a, w = _operands(M, N, K, variant, bits_a, bits_w, seed=1)
    rng = np.random.default_rng(2)
    a_scale, a_zp = 0.0213, min(117, P.code_bounds(bits_a, bits_w)[0] // 2)
    w_scale = rng.uniform(1e-3, 2e-2, N).astype(np.float32)
    bias = rng.normal(0, 1, N).astype(np.float32)
    kernel = _build(M, N, K, variant, bits_a, bits_w, ref, epilogue=True)
    params = kernel.epilogue_params(w, w_scale, a_scale, a_zp, bias)
    out = kernel(kernel.prepare_activation(a, a_zp), *kernel.weight_args(w), *params)
    # float64 reference on the dequantized operands: (a - zp) * a_scale @ (w * w_scale).T + bias
    acc = (a.astype(np.float64) - a_zp) @ w.astype(np.float64).T
    ref_out = acc * (a_scale * w_scale.astype(np.float64)) + bias
    assert out.dtype == np.float32 and out.shape == (M, N)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5 * np.abs(ref_out).max())


# --- code generation ---------------------------------------------------------------------------
def _inner_loop(asm: str, instruction: str) -> str:
    """Body of the innermost asm loop that contains ``instruction``."""
    loops = re.findall(r"\n(\.LBB\w+):\n((?:(?!\.LBB).*\n)*?)\s+j\w+\s+\1\n", asm)
    return next(body for _, body in loops if instruction in body)


@pytest.mark.parametrize(
    "variant,bits,must,must_not",
    [
        ("avx2_u8s8", (6, 6), ("vpmaddubsw", "vpaddw", "vpmaddwd"), ("zmm", "vpdpbusd")),
        ("avx2_u8s8", (8, 6), ("vpmaddubsw", "vpmaddwd"), ("zmm", "vpaddw")),
        ("avx2_i16", (8, 8), ("vpmaddwd",), ("zmm", "vpmaddubsw")),
    ],
)
def test_avx2_assembly(variant, bits, must, must_not):
    kernel = build_qdense(197, 384, 384, Q.X86_AVX2_TARGET, bits_a=bits[0], bits_w=bits[1])
    assert kernel.variant.name == variant
    loop = _inner_loop(kernel.asm(), must[0])
    for instr in must:
        assert instr in loop, instr
    for instr in must_not:
        assert instr not in loop, instr
    assert "rsp" not in loop, "accumulators spilled to the stack: the default tile is too big"


@pytest.mark.parametrize("bits_w,compensate", [(4, False), (8, True)])
@pytest.mark.parametrize("epilogue", [False, True])
def test_vnni_assembly_uses_vpdpbusd(bits_w, compensate, epilogue):
    """W4 and W8 (compensated) both keep vpdpbusd on zmm, with the accumulators in registers."""
    kernel = build_qdense(197, 384, 384, Q.X86_VNNI_TARGET, bits_w=bits_w, epilogue=epilogue)
    assert kernel.schedule == "vnni" and kernel.compensate is compensate
    loop = _inner_loop(kernel.asm(), "vpdpbusd")
    per_step = kernel.tiles[0] * kernel.tiles[1]  # one per accumulator (LLVM may unroll k)
    assert "zmm" in loop and loop.count("vpdpbusd") % per_step == 0
    assert "rsp" not in loop, "accumulators spilled to the stack"


def test_vnni_prefetches_the_next_column_tiles_weights_within_them():
    """One prefetcht1 per vpdpbusd in the k loop (`qdense.weight_prefetch`), ``nbi`` weight blocks ahead (the next
    column tile), clamped to the last weight tile; kernels of more rows than `PREFETCH_MAX_ROWS` and the AVX2 kernels
    have none."""
    kernel = build_qdense(197, 384, 384, Q.X86_VNNI_TARGET, epilogue=True)
    loop = _inner_loop(kernel.asm(), "vpdpbusd")
    assert loop.count("prefetcht1") == loop.count("vpdpbusd") > 0
    sch, _, (_, nbi, _), _ = Q.schedule_qdense(197, 384, 384, Q.X86_VNNI_TARGET, epilogue=True)
    block = 384 * 16  # one packed weight block: K x 16 lanes, int8
    named = set(re.findall(r"repq_dot_16x4_vnni_pf(\d+)_(\d+)", str(sch.trace)))
    assert named == {(str(nbi * block), str(24 * block - 64))}
    for variant in ("avx2_u8s8", "avx2_i16"):
        avx2 = build_qdense(197, 384, 384, Q.X86_AVX2_TARGET, variant=variant, bits_a=6, bits_w=6, epilogue=True)
        assert "prefetch" not in avx2.asm()
    tall = build_qdense(Q.PREFETCH_MAX_ROWS + 1, 384, 384, Q.X86_VNNI_TARGET, epilogue=True)
    assert "prefetch" not in tall.asm() and "vpdpbusd" in tall.asm()


def test_vnni_activation_is_the_unsigned_operand():
    """AT&T ``vpdpbusd src3, src2, acc``: src2 (u8) must be the broadcast activation, src3 (s8) W.

    Without VNNI hardware this is what catches swapped operands (which would compute garbage).
    """
    asm = build_qdense(197, 384, 384, Q.X86_VNNI_TARGET).asm()
    broadcast = set(re.findall(r"vpbroadcastd\s+\S.*,\s*(%zmm\d+)\s*$", asm, re.M))
    src2 = re.findall(r"vpdpbusd\s+\S.*,\s*(%zmm\d+),\s*%zmm\d+\s*$", asm, re.M)
    assert broadcast and src2 and set(src2) <= broadcast


@pytest.mark.parametrize("bits_w", [6, 8])
def test_aarch64_fallback_compiles_to_an_object(tmp_path, bits_w):
    """Any host cross-builds the aarch64 kernel for NEON without dot product (W8: compensated): NEON
    widening multiply-adds, an aarch64 ELF object, and a refusal to run it here.  (The dot-product
    kernel: tests/test_kernel_arm.py.)"""
    kernel = build_qdense(197, 384, 384, Q.AARCH64_NEON_TARGET, bits_a=6, bits_w=bits_w, epilogue=True)
    assert kernel.schedule == "fallback" and kernel.compensate is (bits_w == 8)
    asm = kernel.asm()
    assert "smlal" in asm and "smlal2" in asm, "the NEON widening multiply-accumulate is missing"
    path = tmp_path / "qdense.o"
    kernel.executable.mod.write_to_file(str(path))
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    with pytest.raises(RuntimeError, match="cannot run"):
        kernel.function()


def test_unsupported_cpu_refuses_instead_of_crashing(monkeypatch):
    """On a CPU without AVX-512 (simulated here on every host) a VNNI kernel refuses to run instead of
    dying of SIGILL."""
    avx2_only = frozenset(f for f in HOST_FLAGS if not f.startswith(("avx512", "amx"))) | {"avx2", "fma"}
    monkeypatch.setattr(targets, "host_flags", lambda: avx2_only)
    kernel = build_qdense(16, 16, 4, Q.X86_VNNI_TARGET)
    with pytest.raises(RuntimeError, match="AVX-512.*this CPU lacks"):
        kernel.function()


def test_intrinsic_registration_is_idempotent():
    register_intrinsics()
    register_intrinsics()
    from tvm.s_tir import TensorIntrin

    from repq_tvm.kernels import intrinsics_x86 as I

    for name in (I.vnni_intrin(), I.i16_intrin(), *map(I.u8s8_intrin, I.U8S8_DEPTHS)):
        assert TensorIntrin.get(name) is not None and TensorIntrin.get(I.ref_name(name)) is not None
