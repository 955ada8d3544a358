"""The fused AMX attention (`kernels/attention_amx`): bit for bit the three kernels it replaces (q@kᵀ, the fused
softmax → log√2 weights, attn @ V), through its emulation on any CPU and natively where AMX exists; its
instructions in the assembly on any CPU; its byte table against the oracle's weights."""

import numpy as np
import pytest
import tvm

from repq_tvm import targets
from repq_tvm.kernels import attention_amx as A
from repq_tvm.kernels.attention_consts import attention_consts, log2_scale
from repq_tvm.kernels.attn_v import attn_v_primfunc, padded_tokens
from repq_tvm.kernels.log_weights import log2_scale_operand, log_weights_primfunc
from repq_tvm.kernels.qbmm import qbmm_primfunc
from repq_tvm.reference import ops

AMX = targets.tvm_target("x86_64-amx", 1)
HAS_AMX = {"amx_tile", "amx_int8"} <= targets.host_flags()
HOST = targets.tvm_target("x86_64-avx2", 1)
# (Bt, M, N, D, code bits, log√2, V bits): ragged rows and keys (a 16-row half block last, the last key block
# overlapping), 4-bit codes (one weight group), log2 codes, DeiT-Small's heads, a ragged full last row block
# (M % 32 = 18)
CASES = [(1, 40, 45, 64, 8, True, 8), (2, 33, 70, 64, 4, True, 4), (2, 65, 65, 64, 6, False, 6),
         (6, 197, 197, 64, 8, True, 8), (2, 50, 64, 64, 8, True, 8)]


def _build(func, target):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=target).jit()["main"]


def _tensors(*arrays):
    return [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]


def _unfused(bt, m, n, d, s_attn, bits, sqrt2, f, groups, v_bits, q, k, v, qk_zp, qk_scale, v_zp, v_scale):
    """The three kernels the fused one replaces, compiled for this host (exact integer kernels: the variant does
    not change their results), run one after the other."""
    logits, out = _tensors(np.empty((bt, m, n), np.float32), np.empty((bt, m, d), np.float32))
    (w,) = _tensors(np.zeros((bt, groups, m, padded_tokens(n)), np.int16))
    _build(qbmm_primfunc(bt, m, n, d, HOST)[0], HOST)(*_tensors(q, k, qk_zp, qk_scale), logits)
    _build(log_weights_primfunc((bt, m, n), bits, sqrt2, f, groups, HOST, softmax=True)[0], HOST)(
        logits, *_tensors(log2_scale_operand(s_attn)), w)
    av = attn_v_primfunc(bt, m, n, d, HOST, groups=groups, f=f, v_bits=v_bits)[0]
    _build(av, HOST)(w, *_tensors(v, v_zp, v_scale), out)
    return out.numpy()


@pytest.mark.parametrize("mode", ["emulated", "native"])
@pytest.mark.parametrize("bt,m,n,d,bits,sqrt2,v_bits", CASES)
def test_fused_attention_equals_the_three_kernels(mode, bt, m, n, d, bits, sqrt2, v_bits):
    if mode == "native" and not HAS_AMX:
        pytest.skip("this CPU lacks amx_int8: the kernel is checked through its emulation and its asm")
    rng = np.random.default_rng(bits + n)
    f = ops.attn_frac_bits(n, v_bits)
    groups = ops.attn_groups(bits, f, sqrt2)
    q, k = rng.integers(0, 256, (bt, m, d)).astype(np.uint8), rng.integers(0, 256, (bt, n, d)).astype(np.uint8)
    v = rng.integers(0, 2 ** v_bits, (bt, n, d)).astype(np.uint8)
    qk_zp = rng.integers(0, 256, 2).astype(np.int32)
    v_zp = rng.integers(0, 2 ** v_bits, 1).astype(np.int32)
    qk_scale, v_scale = np.array([9e-4], np.float32), np.array([3e-6], np.float32)  # logits of spread ~±10
    s_attn = 0.0073
    spec = A.attention_spec(bt, m, n, d, bits=bits, sqrt2=sqrt2, f=f, groups=groups, v_bits=v_bits)
    fused = _build(A.attention_amx_func(spec, emulate=mode == "emulated"), AMX if mode == "native" else HOST)
    out = tvm.runtime.tensor(np.empty((bt, m, d), np.float32))
    fused(*_tensors(q, k, qk_zp, qk_scale, v, v_zp, v_scale, attention_consts(log2_scale(s_attn))), out)
    expected = _unfused(bt, m, n, d, s_attn, bits, sqrt2, f, groups, v_bits, q, k, v, qk_zp, qk_scale, v_zp, v_scale)
    assert np.array_equal(out.numpy(), expected)


def test_fused_attention_asm_on_any_cpu():
    """Built for the AMX preset on any host: q@kᵀ on tdpbusd, attn @ V on tdpbuud, the bands by vpermb."""
    f = ops.attn_frac_bits(197, 8)
    spec = A.attention_spec(6, 197, 197, 64, bits=8, sqrt2=True, f=f, groups=ops.attn_groups(8, f, True), v_bits=8)
    asm = tvm.compile(tvm.IRModule({"main": A.attention_amx_func(spec)}), target=AMX).mod.inspect_source("asm")
    assert all(i in asm for i in ("tdpbusd", "tdpbuud", "tileloadd", "vpermb"))


def test_fused_attention_refuses_what_it_cannot_block():
    spec = A.attention_spec(1, 40, 45, 32, bits=8, sqrt2=True, f=14, groups=2, v_bits=8)
    with pytest.raises(ValueError, match="amx attention needs M >= 32, N >= 32 and D % 64 == 0"):
        A.attention_amx_func(spec)
    assert A.fits(197, 197, 64) and not A.fits(31, 197, 64) and not A.fits(65, 65, 32)


def test_codes_past_the_byte_table_have_no_weight():
    """The table holds codes −1 .. 62: every F the attention uses leaves the codes past it without weight."""
    for f in range(1, ops.ATTN_MAX_F + 1):
        for sqrt2 in (True, False):
            A.check_table(f, sqrt2, 2)
