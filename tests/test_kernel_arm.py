"""The Arm dot-product qdense (`neon_sdot`): bit exactness, codegen, and what whole models get on aarch64.

- On any (x86) host the sdot schedule runs through its portable stand-in ("ref": the same tensorized
  schedule, [N/4, K/4, 4, 4] packing, s8 activations with the 8-bit shift, compensation and epilogue, with
  the plain-loop twin of the intrinsic), bit for bit against the NumPy reference (`packing.reference`,
  `reference.ops.qlinear_acc`) for 4/6/8-bit codes at their extremes, ragged shapes, every depth.
- The aarch64 build: `sdot` (indexed form) in the kernel's innermost loop, no `smlal` and no stack traffic
  there; the `aarch64-neon` preset (no dot product) keeps the widening-multiply fallback (`smlal`, no `sdot`).
- Whole model: `repq-tvm compile --target aarch64-neon-dotprod` of the calibrated ViT fixture has only sdot
  linears and q @ kᵀ and udot attn @ V (objdump of model.so; `test_kernel_attn_v_arm.py` has that kernel's
  tests); `--target aarch64-neon` has no dot product at all.
- Slow (`-m slow`, needs the arm64 sysroot of `make aarch64-sysroot`): the real sdot kernels run under
  qemu-aarch64-static, bit for bit against the reference.
- Attention logits q @ kᵀ (`kernels.qbmm`, variant `neon_sdot`): the same three levels, through the stand-in on
  any host (every code width 4..8 with extreme codes and zero points, `reference.ops.qmatmul_acc`), the
  aarch64 asm (indexed sdot in the hot loop; plain NEON keeps smlal), the fixture model's kernels, and (slow)
  the real instruction under qemu.
"""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import extreme_codes, require_cross_compiler
from repq_tvm import targets
from repq_tvm.kernels import packing as P
from repq_tvm.kernels import qbmm as QK
from repq_tvm.kernels import qdense as Q
from repq_tvm.kernels.intrinsics_arm import SDOT_DEPTHS, register_intrinsics, sdot_intrin
from repq_tvm.kernels.intrinsics_x86 import ref_name
from repq_tvm.reference import ops
from repq_tvm.testing.qbmm import QBmm
from repq_tvm.testing.qdense import build_qdense

OBJDUMP = "aarch64-linux-gnu-objdump"
# (M, N, K): ViT fixture shapes, DeiT-Small-like, and ragged ones (M below/not a multiple of a tile, N not a
# multiple of 16 or of the 4 x 4-lane block, odd numbers of k tiles)
SHAPES = [
    (65, 512, 128),  # the fixture's fc1: 5 x 4 tiles, depth 2
    (197, 384, 384),  # DeiT-Small's qkv/proj shape; 197 rows: a ragged last row tile
    (7, 200, 130),  # M below a tile; 50 lane blocks (2 per tile); 33 k tiles (depth 1)
    (33, 1000, 190),  # 1000 classes (250 blocks); K pads to 192
    (1, 10, 128),  # the head: one row, N pads to 12
]
# (bits_a, bits_w): activation shift 128 at A8, compensation at W8
BITS = [(4, 4), (6, 6), (8, 8), (8, 4), (4, 8)]


def _operands(M, N, K, bits_a, bits_w, seed=0):
    """Codes with extreme rows/columns: a = 0 / max; centred weights at +-max (8-bit: +-255, +-128/127)."""
    return extreme_codes(M, N, K, bits_a, bits_w, seed, zero_last_row=True)


def _ref_kernel(M, N, K, bits_a, bits_w, **kw):
    """The sdot schedule with the plain-loop intrinsic, compiled for this host."""
    return build_qdense(M, N, K, Q.host_target(1), variant="neon_sdot", bits_a=bits_a, bits_w=bits_w,
                        ref=True, **kw)


# --- operands, variant choice, tiles ------------------------------------------------------------
def test_activation_shift_and_s8_operand():
    assert P.activation_shift(8, "int8") == 128 and P.activation_shift(7, "int8") == 0
    assert P.activation_shift(4, "int8") == 0 and P.activation_shift(8, "uint8") == 0
    a = np.array([[0, 127, 128, 255, 9]], np.uint8)
    assert P.shift_activation(a, 128).tolist() == [[-128, -1, 0, 127, -119, 0, 0, 0]]
    assert P.shift_activation(a[:, :2], 0, 4).dtype == np.int8
    with pytest.raises(ValueError, match="outside int8"):
        P.shift_activation(a, 0)  # 8-bit codes unshifted would wrap


def test_shift_is_folded_into_the_zero_point_constant():
    w = np.array([[3, -5, 7], [-255, 255, 0]])
    zp_wsum, _, _ = P.epilogue_params(w, np.ones(2), 1.0, a_zp=100, a_shift=128)
    assert zp_wsum.tolist() == [(100 - 128) * 5, 0]
    with pytest.raises(ValueError, match="shift"):
        P.epilogue_params(w, np.ones(2), 1.0, a_zp=0, a_shift=256)


@pytest.mark.parametrize("bits", [(4, 4), (6, 6), (8, 8), (8, 4)])
def test_choose_variant_on_arm(bits):
    assert Q.choose_variant(Q.AARCH64_TARGET, *bits).name == "neon_sdot"
    assert Q.choose_variant(Q.AARCH64_NEON_TARGET, *bits).name == "fallback"
    assert targets.host_name(["fp", "asimd", "asimddp"], "aarch64") == "aarch64-neon-dotprod"
    assert targets.host_name(["fp", "asimd"], "aarch64") == "aarch64-neon"


def test_sdot_depth_and_tiles():
    v = Q.VARIANTS["neon_sdot"]
    assert (v.lanes, v.kpack, v.a_dtype, v.w_dtype, v.feature) == (4, 4, "int8", "int8", "dotprod")
    assert v.max_depth(4, 4, 384) == 2 and v.max_depth(8, 8, 130) == 1 and v.max_depth(4, 4, 8) == 2
    assert Q.default_tiles(65, 512, v, 2) == (5, 4)  # 20 accumulators, 65 = 13 x 5 rows
    assert Q.default_tiles(197, 1536, v, 2) == (5, 4)
    assert Q.default_tiles(1, 10, v, 2) == (1, 3)  # N = 10 pads to 3 blocks of 4
    assert Q.default_tiles(7, 200, v, 1) == (7, 2)


def test_intrinsics_are_registered_with_their_twins():
    register_intrinsics()
    register_intrinsics()
    from tvm.s_tir import TensorIntrin

    for d in SDOT_DEPTHS:
        assert TensorIntrin.get(sdot_intrin(d)) is not None and TensorIntrin.get(ref_name(sdot_intrin(d))) is not None


# --- bit exactness through the portable stand-in ------------------------------------------------
@pytest.mark.parametrize("bits_a,bits_w", BITS, ids=[f"a{a}w{w}" for a, w in BITS])
@pytest.mark.parametrize("M,N,K", SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES])
def test_accumulator_is_exact(M, N, K, bits_a, bits_w):
    a, w = _operands(M, N, K, bits_a, bits_w)
    kernel = _ref_kernel(M, N, K, bits_a, bits_w)
    assert kernel.variant.name == "neon_sdot" and kernel.compensate is (bits_w == 8)
    A = kernel.prepare_activation(a)
    shift = kernel.variant.a_shift(bits_a)
    assert A.dtype == np.int8 and np.array_equal(A[:, :K].astype(np.int16), a.astype(np.int16) - shift)
    out = kernel(A, *kernel.weight_args(w))
    assert out.dtype == np.int32 and out.shape == (M, N)
    np.testing.assert_array_equal(out.astype(np.int64), P.reference(A, w))  # Σ (a − shift)·w
    np.testing.assert_array_equal(out + shift * w.astype(np.int64).sum(1), P.reference(a, w))


@pytest.mark.parametrize("depth", SDOT_DEPTHS)
@pytest.mark.parametrize("bits_a,bits_w", [(8, 8), (6, 6)])
def test_every_depth_is_exact(depth, bits_a, bits_w):
    a, w = _operands(23, 48, 160, bits_a, bits_w, seed=3)
    kernel = _ref_kernel(23, 48, 160, bits_a, bits_w, depth=depth)
    assert kernel.tiles[2] == depth
    out = kernel(kernel.prepare_activation(a), *kernel.weight_args(w))
    shift = kernel.variant.a_shift(bits_a)
    np.testing.assert_array_equal(out + shift * w.astype(np.int64).sum(1), P.reference(a, w))


def _codes(rng, M, N, K, bits_a, bits_w):
    """Activation codes and weight codes with per-channel zero points, extremes included (ops' inputs)."""
    a_max, w_max = 2**bits_a - 1, 2**bits_w - 1
    a = rng.integers(0, a_max + 1, (M, K)).astype(np.uint8)
    a[0] = a_max
    w = rng.integers(0, w_max + 1, (N, K)).astype(np.uint8)
    z_w = rng.integers(0, w_max + 1, N)
    w[0], z_w[0] = 0, w_max  # centred -max ...
    w[1], z_w[1] = w_max, 0  # ... and +max (8-bit: +-255, compensated)
    return a, w, z_w


@pytest.mark.parametrize("bits_a,bits_w", BITS, ids=[f"a{a}w{w}" for a, w in BITS])
@pytest.mark.parametrize("M,N,K", [(65, 512, 128), (7, 200, 130), (1, 10, 128)], ids=["fc1", "ragged", "head"])
def test_fused_epilogue_is_bit_exact(M, N, K, bits_a, bits_w):
    """float32 out = float(acc)·scale[n] + bias[n] with acc the reference's exact int32 Σ (a − z_a)(w − z_w)
    (`ops.qlinear_acc`): every output equals that product-and-sum in float32, rounded once (FMA) or twice."""
    rng = np.random.default_rng(5)
    a, w_codes, z_w = _codes(rng, M, N, K, bits_a, bits_w)
    z_a = int(rng.integers(0, 2**bits_a))
    w = w_codes.astype(np.int32) - z_w[:, None].astype(np.int32)
    a_scale, w_scale = 0.0213, rng.uniform(1e-3, 2e-2, N).astype(np.float32)
    bias = rng.normal(0, 1, N).astype(np.float32)
    kernel = _ref_kernel(M, N, K, bits_a, bits_w, epilogue=True)
    zp_wsum, scale, b = kernel.epilogue_params(w, w_scale, a_scale, z_a, bias)
    out = kernel(kernel.prepare_activation(a, z_a), *kernel.weight_args(w), zp_wsum, scale, b)
    acc = ops.qlinear_acc(a, z_a, w_codes, z_w, bits_w)
    two_roundings = acc.astype(np.float32) * scale + b
    fused = (acc.astype(np.float64) * scale.astype(np.float64) + b.astype(np.float64)).astype(np.float32)
    assert out.dtype == np.float32 and out.shape == (M, N)
    assert ((out == two_roundings) | (out == fused)).all()


# --- aarch64 code generation --------------------------------------------------------------------
def _inner_loops(asm: str) -> list[str]:
    """Bodies of the innermost aarch64 asm loops (a label, then a backward branch to it, no label between)."""
    branch = r"(?:b\.\w+|cbn?z\s+\w+,|tbn?z\s+\w+,\s*#\d+,)"
    return [body for _, body in re.findall(rf"\n(\.LBB\w+):[^\n]*\n((?:(?!\.LBB).*\n)*?)\s+{branch}\s*\1\n", asm)]


def _sdot_loop(asm: str) -> str:
    """The innermost loop with the most sdot (the k loop; W8's row sums may use sdot too)."""
    return max(_inner_loops(asm), key=lambda body: body.count("sdot"))


@pytest.mark.parametrize("bits_a,bits_w,epilogue", [(4, 4, False), (4, 4, True), (8, 8, True), (8, 4, True)])
def test_aarch64_kernel_loop_is_sdot(bits_a, bits_w, epilogue):
    """The k loop of the aarch64 kernel: one indexed sdot per accumulator and tile, nothing widening, no spills."""
    kernel = build_qdense(197, 1536, 384, Q.AARCH64_TARGET, bits_a=bits_a, bits_w=bits_w, epilogue=epilogue)
    assert kernel.schedule == "neon_sdot" and kernel.compensate is (bits_w == 8)
    rows, blocks, depth = kernel.tiles
    loop = _sdot_loop(kernel.asm())
    assert loop.count("sdot") % (rows * blocks * depth) == 0, loop  # LLVM may unroll k
    assert re.search(r"sdot\s+v\d+\.4s, v\d+\.16b, v\d+\.4b\[[0-3]\]", loop), "not the indexed form"
    for widening in ("smlal", "smull", "sxtl", "saddw"):
        assert widening not in loop, widening
    assert "sp" not in re.findall(r"\[(\w+)", loop), "registers spilled to the stack in the k loop"
    with pytest.raises(RuntimeError, match="cannot run"):
        kernel.function()


def test_neon_preset_keeps_the_widening_fallback():
    kernel = build_qdense(197, 384, 384, Q.AARCH64_NEON_TARGET, bits_a=4, bits_w=4, epilogue=True)
    asm = kernel.asm()
    assert kernel.schedule == "fallback"
    assert "smlal" in asm and "sdot" not in asm and "udot" not in asm


# --- whole model --------------------------------------------------------------------------------
def _functions(so: str) -> dict[str, str]:
    """name -> disassembly of every function in an aarch64 library."""
    if shutil.which(OBJDUMP) is None:
        pytest.fail(f"{OBJDUMP} is not installed: run `make aarch64-tools` (Debian binutils-aarch64-linux-gnu)")
    asm = subprocess.run([OBJDUMP, "-d", "--no-show-raw-insn", so], capture_output=True, text=True, check=True).stdout
    parts = re.split(r"\n(?=[0-9a-f]+ <)", asm)
    return {m.group(1): part for part in parts if (m := re.match(r"[0-9a-f]+ <([^>]+)>:", part))}


def _objdump_loops(body: str) -> list[str]:
    """Innermost loops of one objdump'ed function: instructions from a backward branch's target to it."""
    lines = [m for m in re.finditer(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$", body, re.M)]
    addr = {int(m.group(1), 16): i for i, m in enumerate(lines)}
    loops = []
    for i, m in enumerate(lines):
        op, args = m.group(2), m.group(3)
        target = re.search(r"\b([0-9a-f]+) <", args)
        if (op.startswith("b.") or op in ("cbz", "cbnz", "tbz", "tbnz")) and target:
            start = addr.get(int(target.group(1), 16))
            if start is not None and start < i:
                inner = lines[start:i]
                if not any(x.group(2).startswith("b.") or x.group(2) in ("cbz", "cbnz", "tbz", "tbnz") for x in inner):
                    loops.append("\n".join(f"{x.group(2)} {x.group(3)}" for x in inner))
    return loops


def _compile(repq: str, target: str, out: str) -> dict[str, str]:
    from repq_tvm.cli import main

    require_cross_compiler(target)
    assert main(["compile", repq, "--target", target, "-o", out, "--quiet"]) == 0
    return _functions(os.path.join(out, "model.so"))


def test_whole_model_linears_use_sdot(vit_aarch64_build):
    funcs = _functions(os.path.join(vit_aarch64_build[1], "model.so"))
    dense = {name: body for name, body in funcs.items() if name.startswith("repq_qdense")}
    # qkv, proj, fc1, fc2 (4 shapes), the head and the 8-bit patch embedding
    assert len(dense) >= 6 and all(name.startswith("repq_qdense_neon_sdot_") for name in dense), sorted(dense)
    assert any("_a8w" in name for name in dense), "the 8-bit patch embedding is not an sdot kernel"
    qk = {name: body for name, body in funcs.items() if name.startswith("repq_qbmm")}
    assert qk and all(name.startswith("repq_qbmm_neon_sdot_") for name in qk), sorted(qk)  # q @ kT too
    for name, body in qk.items():  # the fixture's head dim 32: the tile loop (d unrolled) holds the sdot
        hot = max(_objdump_loops(body), key=lambda loop: loop.count("sdot"))
        assert hot.count("sdot") >= 32 and "smlal" not in hot, (name, hot)
        assert not re.search(r"^st\S*\s.*\[sp", hot, re.M), f"{name}: registers spilled in the hot loop"
    attn_v = {name: body for name, body in funcs.items() if name.startswith("repq_attn_v")}
    assert attn_v and all(name.startswith("repq_attn_v_neon_udot_") for name in attn_v), sorted(attn_v)  # attn @ V
    for name, body in attn_v.items():  # both weight bands' token loops: indexed udot, no spills
        hot = max(_objdump_loops(body), key=lambda loop: loop.count("udot"))
        assert hot.count("udot") >= 40 and "smlal" not in hot and "[sp" not in hot, (name, hot)
    for name, body in dense.items():
        assert len(re.findall(r"\tsdot\t", body)) >= 16, name
        assert not re.search(r"\t(smlal2?|smull2?)\tv", body), name  # (a scalar smull may index)
        m, _, k = map(int, re.search(r"_(\d+)x(\d+)x(\d+)_a", name).groups())
        if m == 1 or k <= 64:  # LLVM unrolls these short k loops completely: no k loop to check
            continue
        k_loop = max(_objdump_loops(body), key=lambda loop: loop.count("sdot"))
        assert k_loop.count("sdot") >= 16 and "smlal" not in k_loop, (name, k_loop)
        assert "[sp" not in k_loop, f"{name}: registers spilled in the k loop"


def test_whole_model_on_plain_neon_has_no_sdot(vit_host_build, tmp_path):
    funcs = _compile(vit_host_build[0], "aarch64-neon", str(tmp_path / "art-neon"))
    dense = {name: body for name, body in funcs.items() if name.startswith("repq_qdense")}
    assert dense and all(name.startswith("repq_qdense_fallback_") for name in dense), sorted(dense)
    qk = [name for name in funcs if name.startswith("repq_qbmm")]
    assert qk and all(name.startswith("repq_qbmm_fallback_") for name in qk), qk
    assert not any(re.search(r"\t[su]dot\t", body) for body in funcs.values())
    assert all(re.search(r"\tsmlal2?\t", body) for body in dense.values())


def test_graph_rewrite_through_the_stand_in_matches_the_host_build(vit_w8_build, tmp_path, monkeypatch):
    """W8/A8 ViT fixture with every linear rewritten for sdot (s8 activations q − 128 with the fold in the
    zero-point constant, [N/4, K/4, 4, 4] packing, compensation) but built for this host through the
    stand-in: logits bit-identical to the host's own build."""
    from repq_tvm import api, data, models
    from repq_tvm.deploy.runtime import Runner
    from repq_tvm.evaluate import load_batch, make_transform

    repq, host_art = vit_w8_build  # the shared W8/A8 build for this host
    schedule, built = Q.schedule_qdense, []

    def sdot_stand_in(*args, **kw):
        built.append(args[:3])
        return schedule(*args, **{**kw, "variant": "neon_sdot", "ref": True})

    monkeypatch.setattr(Q, "choose_variant", lambda target, bits_a=8, bits_w=8, shape=None: Q.VARIANTS["neon_sdot"])
    monkeypatch.setattr(Q, "schedule_qdense", sdot_stand_in)
    api.compile_artifact(repq, str(tmp_path / "sdot"), target="host")
    assert len(built) >= 6  # one kernel per linear shape and the patch embedding
    host, sdot = Runner(host_art), Runner(str(tmp_path / "sdot"))
    source = data.open_images(models.fixture_file(models.FIXTURE_EVAL_DATA))
    x, _ = load_batch(source, np.arange(0, 1000, 125), make_transform(host.manifest["preprocessing"]))
    np.testing.assert_array_equal(sdot.predict(x.numpy()), host.predict(x.numpy()))


# --- q @ kT on sdot (kernels.qbmm) -------------------------------------------------------------
# (Bt, M, N, D, layout): DeiT-Small's heads and the ViT fixture's (head dim 32: the "cols" tile order), the
# brief's 3 x 65 x 65 x 64, Swin-like windows (head dim 16), and ragged ones (M, N off the tiles, D off 4 / 8)
QK_SHAPES = [
    (6, 197, 197, 64, "nd"), (6, 197, 197, 64, "dn"), (4, 65, 65, 32, "nd"), (4, 65, 65, 32, "dn"),
    (3, 65, 65, 64, "nd"), (3, 65, 65, 64, "dn"), (8, 64, 64, 16, "nd"), (3, 13, 11, 7, "nd"), (4, 9, 17, 5, "dn"),
    (2, 1, 3, 1, "nd"),
]


def _qk_codes(Bt, M, N, D, bits, seed=0):
    """q [Bt, M, D] and k [Bt, N, D] codes of ``bits`` with extreme rows (q: max, and 0 in the last row, as
    `extreme_codes` makes them; k: 0 and max), and zero-point pairs that make every |(q − z_q)(k − z_k)| up
    to (2^bits − 1)^2 appear: each extreme against its opposite, both at one end, and a random pair."""
    rng = np.random.default_rng(seed + bits)
    top = 2**bits - 1
    q = np.stack([extreme_codes(M, max(N, 4), D, bits, bits, seed + i, zero_last_row=True)[0] for i in range(Bt)])
    k = rng.integers(0, top + 1, (Bt, N, D), dtype=np.uint8)
    k[:, 0] = 0
    if N > 1:
        k[:, 1] = top
    zps = [(0, top), (top, 0), (top, top), (0, 0), tuple(int(z) for z in rng.integers(0, top + 1, 2))]
    return q, k, zps


def _qk_expected(q, k, z_q, z_k, scale):
    return ops.qmatmul_acc(q, z_q, k.transpose(0, 2, 1), z_k).astype(np.float32) * np.float32(scale)


def test_qk_variant_choice():
    from repq_tvm.kernels.qdense import X86_AVX2_TARGET, X86_VNNI_TARGET

    assert QK.variant_for(Q.AARCH64_TARGET) == "neon_sdot"
    assert QK.variant_for(Q.AARCH64_NEON_TARGET) == "fallback"
    assert QK.variant_for(X86_VNNI_TARGET) == "vnni" and QK.variant_for(X86_AVX2_TARGET) == "avx2_i16"
    assert QK.variant_for({"kind": "llvm", "mtriple": "x86_64-linux-gnu"}) == "fallback"
    with pytest.raises(ValueError, match="dotprod"):  # not for a target without the instruction ...
        QK.schedule_qbmm(2, 5, 5, 8, Q.AARCH64_NEON_TARGET, variant="neon_sdot")
    QK.schedule_qbmm(2, 5, 5, 8, Q.host_target(1), variant="neon_sdot", ref=True)  # ... unless as its twin


def test_qk_sdot_tiles_fit_the_registers():
    """Tile order by head dim; tiles from `SDOT_TILES`, capped by the shape; every one of them <= 30 of the
    32 q registers counting accumulators + k' registers (2 per block and step) + q' registers (1 per row)."""
    assert QK.sdot_order(64) == "rows" and QK.sdot_order(32) == QK.sdot_order(16) == "cols"
    assert QK.default_tiles(197, "neon_sdot", 197, 64) == (6, 3)  # 198 x 204 padded outputs
    assert QK.default_tiles(65, "neon_sdot", 65, 64) == (6, 3)
    assert QK.default_tiles(65, "neon_sdot", 65, 32) == (5, 2)
    assert QK.default_tiles(1, "neon_sdot", 3, 64) == (1, 1)
    assert QK.default_tiles(197, "avx2_i16") == (6, 2)  # the existing variants' signature is unchanged
    for order, tiles in QK.SDOT_TILES.items():
        for rows, blocks in tiles:
            assert rows * blocks + 2 * blocks + rows <= 33, (order, rows, blocks)  # 5 x 4: 33, q' reused


@pytest.mark.parametrize("Bt,M,N,D,layout", QK_SHAPES, ids=[f"{b}x{m}x{n}x{d}{l}" for b, m, n, d, l in QK_SHAPES])
def test_qk_sdot_is_exact(Bt, M, N, D, layout):
    """The sdot schedule's stand-in (q − 128, packed k − 128, zero-point terms as the accumulators' start
    value, plain-loop sdot twin) against the integer reference, bit for bit, for 4..8-bit codes."""
    kern = QBmm(Bt, M, N, D, Q.host_target(1), b_layout=layout, variant="neon_sdot", ref=True)
    assert kern.variant == "neon_sdot"
    for bits in (4, 5, 6, 7, 8):
        q, k, zps = _qk_codes(Bt, M, N, D, bits)
        kk = k if layout == "nd" else np.ascontiguousarray(k.transpose(0, 2, 1))
        for z_q, z_k in zps:
            out = kern(q, kk, z_q, z_k, 0.37)
            np.testing.assert_array_equal(out, _qk_expected(q, k, z_q, z_k, 0.37), err_msg=f"{bits} bits {z_q} {z_k}")


@pytest.mark.parametrize("order", ["rows", "cols"])
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_qk_sdot_orders_and_depths_are_exact(order, depth):
    """Both tile orders at every intrinsic depth (D = 40: 10 d tiles, padded to 12 / 16 at depth 4 / 8)."""
    Bt, M, N, D = 2, 23, 30, 40
    sch = QK.schedule_qbmm_sdot(Bt, M, N, D, tiles=(5, 3), depth=depth, order=order, ref=True)
    import tvm

    fn = tvm.compile(sch.mod, target=Q.host_target(1)).jit()["main"]
    q, k, zps = _qk_codes(Bt, M, N, D, 8, seed=7)
    for z_q, z_k in zps[:3]:
        args = [tvm.runtime.tensor(x) for x in (q, k, np.array([z_q, z_k], np.int32), np.array([1.0], np.float32),
                                                 np.empty((Bt, M, N), np.float32))]
        fn(*args)
        np.testing.assert_array_equal(args[-1].numpy(), _qk_expected(q, k, z_q, z_k, 1.0))


def _qk_asm_loops(kern) -> tuple[str, list[str]]:
    asm = kern.executable.mod.inspect_source("asm")
    return asm, _inner_loops(asm)


@pytest.mark.parametrize("shape", [(6, 197, 197, 64), (3, 65, 65, 64), (4, 65, 65, 32)], ids=["deit", "d64", "vit"])
def test_aarch64_qk_hot_loop_is_sdot(shape):
    """The aarch64-neon-dotprod build of q @ kT: the innermost loop with the most sdot has only indexed sdot
    as arithmetic on the accumulators (rows x blocks x depth of them per d step, or per tile when LLVM unrolls
    the d loop), nothing widening and no stores to the stack; it refuses to run on this host."""
    kern = QBmm(*shape, Q.AARCH64_TARGET)
    assert kern.variant == "neon_sdot"
    asm, loops = _qk_asm_loops(kern)
    hot = max(loops, key=lambda body: body.count("sdot"))
    rows, blocks = QK.default_tiles(shape[1], "neon_sdot", shape[2], shape[3])
    assert hot.count("sdot") % (rows * blocks * QK.SDOT_DEPTH) == 0 and hot.count("sdot") >= 30, hot
    assert re.search(r"sdot\s+v\d+\.4s, v\d+\.16b, v\d+\.4b\[[0-3]\]", hot), "not the indexed form"
    for widening in ("smlal", "smull", "sxtl", "saddw"):
        assert widening not in hot, widening
    assert not re.search(r"\tst[rp1]\w*\s[^\n]*\[sp", hot), "registers spilled to the stack in the hot loop"
    if shape[3] > QK.SDOT_SHORT_D:  # a real d loop: sdot and loads only, not even stack reloads
        assert "sp" not in re.findall(r"\[(\w+)", hot) and "scvtf" not in hot, hot
    with pytest.raises(RuntimeError, match="cannot run"):
        kern.function()


def test_aarch64_neon_qk_keeps_the_widening_fallback():
    for shape in ((6, 197, 197, 64), (4, 65, 65, 32)):
        kern = QBmm(*shape, Q.AARCH64_NEON_TARGET)
        asm = kern.executable.mod.inspect_source("asm")
        assert kern.variant == "fallback"
        assert "smlal" in asm and "sdot" not in asm and "udot" not in asm


def test_qk_graph_rewrite_through_the_stand_in_matches_the_host_build(vit_host_build, tmp_path, monkeypatch):
    """The ViT fixture (W4/A4) with every q @ kT lowered to the sdot schedule's stand-in, built for this host:
    logits bit-identical to the host's own build (its qbmm kernels: vpdpbusd / vpmaddwd)."""
    from repq_tvm import api, data, models
    from repq_tvm.deploy.runtime import Runner
    from repq_tvm.evaluate import load_batch, make_transform

    cal, host_art = vit_host_build
    schedule, built = QK.schedule_qbmm, []

    def sdot_stand_in(*args, **kw):
        built.append(args[:4])
        return schedule(*args, **{**kw, "variant": "neon_sdot", "ref": True})

    monkeypatch.setattr(QK, "schedule_qbmm", sdot_stand_in)
    api.compile_artifact(cal, str(tmp_path / "sdot"), target="host")
    assert built and all(shape[1:4] == (65, 65, 32) for shape in built), built
    host, sdot = Runner(host_art), Runner(str(tmp_path / "sdot"))
    source = data.open_images(models.fixture_file(models.FIXTURE_EVAL_DATA))
    x, _ = load_batch(source, np.arange(0, 1000, 125), make_transform(host.manifest["preprocessing"]))
    np.testing.assert_array_equal(sdot.predict(x.numpy()), host.predict(x.numpy()))


# --- the real instruction, emulated -------------------------------------------------------------
_QEMU_CALL = """
import sys, numpy as np, tvm
for so, npz, out in zip(*[iter(sys.argv[1:])] * 3):
    data = np.load(npz)
    args = [tvm.runtime.tensor(data[f"arg{i}"]) for i in range(len(data.files))]
    tvm.runtime.load_module(so)["main"](*args)
    np.save(out, args[-1].numpy())
"""


def _run_under_qemu(tmp_path, calls) -> list[np.ndarray]:
    """Run aarch64 kernels for real (qemu-aarch64-static with the arm64 sysroot's Python and TVM): each call
    is (executable, NumPy arguments, the last one the output); returns the outputs."""
    import tvm

    from repq_tvm.deploy import qemu
    from repq_tvm.errors import ReqError

    sysroot = os.path.abspath(qemu.default_sysroot())
    try:
        qemu.check_sysroot(sysroot)
    except ReqError as exc:  # its message says how to build one
        pytest.fail(str(exc))
    if shutil.which("qemu-aarch64-static") is None:
        pytest.fail("qemu-aarch64-static is not installed: run `make aarch64-tools`")
    fcompile = tvm.support.cc.cross_compiler(targets.load("aarch64-neon-dotprod")["cross_compiler"])
    argv, libraries = [], {}
    for i, (executable, args) in enumerate(calls):
        npz, out = (str(tmp_path / f"k{i}.{ext}") for ext in ("npz", "npy"))
        if id(executable) not in libraries:  # one library per kernel, however many calls
            libraries[id(executable)] = str(tmp_path / f"lib{len(libraries)}.so")
            executable.export_library(libraries[id(executable)], fcompile=fcompile)
        np.savez(npz, **{f"arg{j}": x for j, x in enumerate(args)})
        argv += [libraries[id(executable)], npz, out]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LD_", "QEMU_"))}
    env.update(PYTHONPATH=os.path.join(sysroot, qemu.WHEELS_SUBDIR), PYTHONNOUSERSITE="1")
    proc = subprocess.run(["qemu-aarch64-static", "-L", sysroot, os.path.join(sysroot, "usr", "bin", "python3"),
                           "-c", _QEMU_CALL, *argv], env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [np.load(argv[3 * i + 2]) for i in range(len(calls))]


@pytest.mark.slow
def test_sdot_kernels_under_qemu_are_exact(tmp_path):
    """The aarch64 kernels themselves (real sdot, emulated by qemu-aarch64-static) against the reference."""
    cases = [((65, 512, 128), 4, 4, {}), ((197, 384, 384), 8, 8, {}), ((7, 200, 130), 6, 6, {}),
             ((33, 1000, 190), 8, 4, {}), ((23, 48, 160), 8, 8, {"depth": 4})]
    calls, expected = [], []
    for i, ((M, N, K), bits_a, bits_w, kw) in enumerate(cases):
        kernel = build_qdense(M, N, K, Q.AARCH64_TARGET, bits_a=bits_a, bits_w=bits_w, **kw)
        a, w = _operands(M, N, K, bits_a, bits_w, seed=i)
        calls.append((kernel.executable, [kernel.prepare_activation(a), *kernel.weight_args(w),
                                          np.zeros((M, N), np.int32)]))
        expected.append(P.reference(a, w) - kernel.variant.a_shift(bits_a) * w.astype(np.int64).sum(1))
    for i, (got, want) in enumerate(zip(_run_under_qemu(tmp_path, calls), expected)):
        np.testing.assert_array_equal(got.astype(np.int64), want, err_msg=str(cases[i]))


@pytest.mark.slow
def test_sdot_qk_kernels_under_qemu_are_exact(tmp_path):
    """q @ kT on the real sdot (both tile orders, both layouts, ragged shapes), 8- and 4-bit extreme codes and
    zero points, bit for bit against the integer reference."""
    cases = [(6, 197, 197, 64, "nd", 8), (4, 65, 65, 32, "nd", 4), (3, 65, 65, 64, "dn", 8),
             (4, 65, 65, 32, "dn", 8), (3, 13, 11, 7, "nd", 6)]
    calls, expected = [], []
    for Bt, M, N, D, layout, bits in cases:
        kern = QBmm(Bt, M, N, D, Q.AARCH64_TARGET, b_layout=layout)
        assert kern.variant == "neon_sdot"
        q, k, zps = _qk_codes(Bt, M, N, D, bits)
        kk = k if layout == "nd" else np.ascontiguousarray(k.transpose(0, 2, 1))
        for z_q, z_k in zps[:3]:
            calls.append((kern.executable, [x.numpy() for x in kern.args(q, kk, z_q, z_k, 0.37)]))
            expected.append(((Bt, M, N, D, layout, bits, z_q, z_k), _qk_expected(q, k, z_q, z_k, 0.37)))
    for got, (case, want) in zip(_run_under_qemu(tmp_path, calls), expected):
        np.testing.assert_array_equal(got, want, err_msg=str(case))
