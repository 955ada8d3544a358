"""AMX attn @ V (`kernels/attn_v_amx`): bit for bit `reference.ops.attn_v_acc` on every CPU through its emulation,
natively where AMX exists; the tile instruction in its assembly on any CPU; which shapes take it."""

import numpy as np
import pytest
import tvm
from test_pass_log2_attention import random_codes

from repq_tvm import targets
from repq_tvm.kernels import attn_v as av
from repq_tvm.kernels.attn_v_amx import attn_v_amx_func
from repq_tvm.reference import ops
from repq_tvm.testing.attn_v import AttnV

AMX = targets.tvm_target("x86_64-amx", 1)
HAS_AMX = {"amx_tile", "amx_int8"} <= targets.host_flags()
HOST = targets.tvm_target("x86_64-avx2", 1)
# (bits, sqrt2, v_bits, F or None for attn_frac_bits, (Bt, M, N, D)): ragged M and N (the last row block
# overlaps, the last token vector re-splits), 2 planes x 2 bands; 4-bit codes; log2 codes; N a whole
# vector; F = 7 (weights fit a byte: one band); DeiT-Small's heads
CASES = [(8, True, 8, None, (2, 33, 45, 32)), (4, True, 4, None, (1, 40, 70, 64)), (6, False, 6, None, (2, 32, 33, 32)),
         (8, True, 8, None, (1, 32, 32, 32)), (8, True, 8, 7, (2, 48, 50, 32)), (8, True, 8, None, (1, 197, 197, 64))]


def _operands(seed, bits, sqrt2, v_bits, f, shape):
    bt, m, n, d = shape
    rng = np.random.default_rng(seed)
    f = f or ops.attn_frac_bits(n, v_bits)
    codes, dead = random_codes(rng, (bt, m, n), bits, f, sqrt2)
    v = rng.integers(0, 2 ** v_bits, (bt, n, d)).astype(np.uint8)
    v[..., 0, :], v[..., 1, :] = 2 ** v_bits - 1, 0  # extremes of v − z_v
    groups = ops.attn_groups(bits, f, sqrt2)
    return f, groups, ops.attn_weights(codes, dead, f, sqrt2, groups), v, int(rng.integers(0, 2 ** v_bits))


@pytest.mark.parametrize("mode", ["emulated", "native"])
@pytest.mark.parametrize("bits,sqrt2,v_bits,f,shape", CASES)
def test_amx_attn_v_is_bit_exact(mode, bits, sqrt2, v_bits, f, shape):
    if mode == "native" and not HAS_AMX:
        pytest.skip("this CPU lacks amx_int8: the kernel is checked through its emulation and its asm")
    f, groups, w, v, z_v = _operands(bits + 7 * v_bits, bits, sqrt2, v_bits, f, shape)
    kernel = AttnV(*shape, AMX if mode == "native" else HOST, groups=groups, f=f, v_bits=v_bits, epilogue=False,
                   variant="amx", ref=mode == "emulated")
    assert kernel.variant == "amx"
    assert np.array_equal(kernel(w, v, z_v), ops.attn_v_acc(w, v, z_v, f, v_bits))


@pytest.mark.parametrize("mode", ["emulated", "native"])
def test_amx_attn_v_float_epilogue(mode):
    if mode == "native" and not HAS_AMX:
        pytest.skip("this CPU lacks amx_int8")
    shape = (2, 33, 45, 32)
    f, groups, w, v, z_v = _operands(3, 8, True, 8, None, shape)
    kernel = AttnV(*shape, AMX if mode == "native" else HOST, groups=groups, f=f, variant="amx",
                   ref=mode == "emulated")
    scale = 0.02 / 2 ** (f + ops.ATTN_EXTRA_BITS)
    expected = ops.attn_v_acc(w, v, z_v, f).astype(np.float32) * np.float32(scale)
    assert np.array_equal(kernel(w, v, z_v, scale), expected)


def test_amx_attn_v_asm_on_any_cpu():
    """Built for the AMX preset on any host: the products are tdpbuud (u8 x u8) on tiles loaded by tileloadd."""
    f = ops.attn_frac_bits(197, 8)
    func = attn_v_amx_func(6, 197, 197, 64, groups=ops.attn_groups(8, f, True), f=f)
    asm = tvm.compile(tvm.IRModule({"main": func}), target=AMX).mod.inspect_source("asm")
    assert "tdpbuud" in asm and "tileloadd" in asm and "tdpbusd" not in asm


def test_which_shapes_take_the_amx_kernel():
    assert av.variant_for(AMX, 197, 197, 64) == "amx"
    assert av.variant_for(AMX, 65, 65, 32) == "amx"
    assert av.variant_for(AMX, 31, 65, 32) == "vnni_i16"  # less than one 32-row block
    assert av.variant_for(AMX, 65, 65, 20) == "vnni_i16"  # D not whole 32-column blocks
    assert av.variant_for(AMX, 65, 16, 32) == "vnni_i16"  # fewer tokens than one vector
    assert av.variant_for(AMX) == "vnni_i16"  # no shape: the int16 kernel
    assert av.variant_for(targets.tvm_target("x86_64-avx512-vnni"), 197, 197, 64) == "vnni_i16"


def test_amx_attn_v_refuses_shapes_it_cannot_block():
    with pytest.raises(ValueError, match="amx attn@V needs M >= 32"):
        attn_v_amx_func(1, 16, 40, 32)
    with pytest.raises(ValueError, match="could overflow int32"):
        attn_v_amx_func(1, 32, 3136, 32, f=14)
