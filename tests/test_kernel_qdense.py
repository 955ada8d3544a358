"""qdense kernel: exact int32 accumulators, float epilogue, VNNI codegen, aarch64 cross-build.

The VNNI kernel can only run on a CPU with AVX512-VNNI.  Elsewhere the same tensorized schedule
is run with a plain-loop body of the same intrinsic description ("ref"), so tiling, padding and
the fused epilogue are still checked bit for bit; VNNI itself is then checked by its assembly.
"""

import re

import numpy as np
import pytest

from repq_tvm.kernels import vnni as V

SHAPES = [
    (65, 384, 128),
    (197, 384, 384),
    (7, 200, 130),  # N % 16 and K % 4 both need padding, M smaller than a tile
    (33, 1000, 190),  # 1000 classes: N pads to 1008
]
SCHEDULES = ["vnni", "ref", "fallback"]


def _target(schedule):
    if schedule == "vnni":
        if not V.host_has_vnni():
            pytest.skip("this CPU has no AVX512-VNNI (the kernel would die of SIGILL)")
        return V.X86_VNNI_TARGET
    return V.host_target()


def _operands(M, N, K, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (M, K), dtype=np.uint8)
    w = rng.integers(-128, 128, (N, K), dtype=np.int8)
    w[0, :] = -128  # extremes: vpdpbusd must not saturate (pmaddubsw would)
    a[0, :] = 255
    return a, w


def test_pack_weight_roundtrip_and_zero_padding():
    _, w = _operands(3, 20, 7)
    packed = V.pack_weight(w)
    assert packed.shape == (2, 2, 16, 4) and packed.dtype == np.int8
    assert np.array_equal(V.unpack_weight(packed, 20, 7), w)
    full = V.unpack_weight(packed)
    assert full.shape == (32, 8) and not full[20:].any() and not full[:, 7:].any()
    assert packed[1, 0, 2, 3] == w[18, 3]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_accumulator_is_exact(M, N, K, schedule):
    a, w = _operands(M, N, K)
    kernel = V.build_qdense(M, N, K, _target(schedule), schedule=schedule)
    out = kernel(V.pad_activation(a), V.pack_weight(w))
    assert out.dtype == np.int32 and out.shape == (M, N)
    np.testing.assert_array_equal(out.astype(np.int64), V.reference(a, w))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("M,N,K", [(197, 384, 384), (7, 200, 130)])
def test_fused_epilogue_matches_numpy(M, N, K, schedule):
    a, w = _operands(M, N, K, seed=1)
    rng = np.random.default_rng(2)
    a_scale, a_zp = 0.0213, 117
    w_scale = rng.uniform(1e-3, 2e-2, N).astype(np.float32)
    bias = rng.normal(0, 1, N).astype(np.float32)
    kernel = V.build_qdense(M, N, K, _target(schedule), epilogue=True, schedule=schedule)
    params = V.epilogue_params(w, w_scale, a_scale, a_zp, bias)
    out = kernel(V.pad_activation(a), V.pack_weight(w), *params)
    # float64 reference on the dequantized operands: (a - zp) * a_scale @ (w * w_scale).T + bias
    acc = (a.astype(np.float64) - a_zp) @ w.astype(np.float64).T
    ref = acc * (a_scale * w_scale.astype(np.float64)) + bias
    assert out.dtype == np.float32 and out.shape == (M, N)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_vnni_assembly_uses_vpdpbusd():
    for epilogue in (False, True):
        asm = V.build_qdense(197, 384, 384, V.X86_VNNI_TARGET, epilogue=epilogue).asm()
        assert "vpdpbusd" in asm and "zmm" in asm
    assert V.build_qdense(197, 384, 384, V.X86_VNNI_TARGET).schedule == "vnni"


def test_vnni_activation_is_the_unsigned_operand():
    """AT&T ``vpdpbusd src3, src2, acc``: src2 (u8) must be the broadcast activation, src3 (s8) W.

    Without VNNI hardware this is what catches swapped operands (which would compute garbage).
    """
    asm = V.build_qdense(197, 384, 384, V.X86_VNNI_TARGET).asm()
    broadcast = set(re.findall(r"vpbroadcastd\s+\S.*,\s*(%zmm\d+)\s*$", asm, re.M))
    src2 = re.findall(r"vpdpbusd\s+\S.*,\s*(%zmm\d+),\s*%zmm\d+\s*$", asm, re.M)
    assert broadcast and src2 and set(src2) <= broadcast


def test_aarch64_fallback_compiles_to_an_object(tmp_path):
    kernel = V.build_qdense(197, 384, 384, V.AARCH64_TARGET, epilogue=True)
    assert kernel.schedule == "fallback"
    path = tmp_path / "qdense.o"
    kernel.executable.mod.write_to_file(str(path))
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    with pytest.raises(RuntimeError, match="cannot run"):
        kernel.function()


def test_unsupported_cpu_refuses_instead_of_crashing():
    if V.host_has_vnni():
        pytest.skip("this CPU runs VNNI")
    kernel = V.build_qdense(16, 16, 4, V.X86_VNNI_TARGET)
    with pytest.raises(RuntimeError, match="AVX-512"):
        kernel.function()


def test_intrinsic_registration_is_idempotent():
    V.register_intrinsics()
    V.register_intrinsics()
    assert V.TensorIntrin.get(V.VNNI_INTRIN) is not None
    assert V.TensorIntrin.get(V.REF_INTRIN) is not None
