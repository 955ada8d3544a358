"""The fused vector attention (`kernels/attention_vector`): bit for bit the three kernels it replaces (q@kᵀ, the
fused softmax → log√2 weights, attn @ V), through its emulation on any CPU, natively for AVX2 (every CPU this project
runs on has it) and for AVX-512 VNNI where the CPU has it; its instructions in the assembly on any CPU."""

import functools

import numpy as np
import pytest
import tvm
from test_kernel_attention_amx import CASES, _build, _tensors, _unfused

from repq_tvm import targets
from repq_tvm.kernels import attention_amx as AM
from repq_tvm.kernels import attention_vector as A
from repq_tvm.kernels.attention_consts import attention_consts, log2_scale, with_quantizer
from repq_tvm.kernels.epilogue import ZERO_POINT
from repq_tvm.kernels.attn_v import attn_v_primfunc, padded_tokens
from repq_tvm.kernels.log_weights import log2_scale_operand, log_weights_primfunc
from repq_tvm.kernels.qbmm import qbmm_primfunc
from repq_tvm.reference import ops

PRESET = {"avx2_i16": "x86_64-avx2", "vnni": "x86_64-avx512-vnni", "amx": "x86_64-amx"}
HOST = targets.tvm_target("x86_64-avx2", 1)
HAS = {"avx2_i16": "avx2" in targets.host_flags(), "vnni": {"avx512f", "avx512_vnni"} <= targets.host_flags()}
# the AMX kernel's cases, plus rows and keys of fewer than a block (4 rows, 5 keys: one partial key block)
VECTOR_CASES = [*CASES, (3, 4, 5, 64, 8, True, 8), (1, 9, 17, 16, 8, True, 8)]
S_ATTN = 0.0073  # the log quantizer's scale of the cases (a run-time constant of the fused kernels)


def _spec(bt, m, n, d, bits, sqrt2, v_bits, variant):
    f = ops.attn_frac_bits(n, v_bits)
    return A.attention_spec(bt, m, n, d, bits=bits, sqrt2=sqrt2, f=f, groups=ops.attn_groups(bits, f, sqrt2),
                            v_bits=v_bits, variant=variant)


@functools.cache
def _case(bt, m, n, d, bits, sqrt2, v_bits):
    """Inputs and the three kernels' output of a case (shared by the variants and modes)."""
    rng = np.random.default_rng(bits + n)
    f = ops.attn_frac_bits(n, v_bits)
    q, k = rng.integers(0, 256, (bt, m, d)).astype(np.uint8), rng.integers(0, 256, (bt, n, d)).astype(np.uint8)
    v = rng.integers(0, 2 ** v_bits, (bt, n, d)).astype(np.uint8)
    qk_zp = rng.integers(0, 256, 2).astype(np.int32)
    v_zp = rng.integers(0, 2 ** v_bits, 1).astype(np.int32)
    qk_scale, v_scale = np.array([9e-4], np.float32), np.array([3e-6], np.float32)  # logits of spread ~±10
    inputs = (q, k, qk_zp, qk_scale, v, v_zp, v_scale)
    return inputs, _unfused(bt, m, n, d, S_ATTN, bits, sqrt2, f, ops.attn_groups(bits, f, sqrt2), v_bits, q, k, v,
                            qk_zp, qk_scale, v_zp, v_scale)


# AVX2 natively (every CPU here has it), VNNI through its emulation everywhere and natively where the CPU has it
@pytest.mark.parametrize("variant,mode", [("avx2_i16", "native"), ("vnni", "emulated"), ("vnni", "native")])
@pytest.mark.parametrize("bt,m,n,d,bits,sqrt2,v_bits", VECTOR_CASES)
def test_fused_vector_attention_equals_the_three_kernels(variant, mode, bt, m, n, d, bits, sqrt2, v_bits):
    if mode == "native" and not HAS[variant]:
        pytest.skip(f"this CPU cannot run {PRESET[variant]}: the kernel is checked through its emulation and its asm")
    if not A.fits(m, n, d, variant):
        pytest.skip(f"{variant} takes no D={d} (not whole vectors): the three kernels stay")
    inputs, expected = _case(bt, m, n, d, bits, sqrt2, v_bits)
    spec = _spec(bt, m, n, d, bits, sqrt2, v_bits, variant)
    target = targets.tvm_target(PRESET[variant], 1) if mode == "native" else HOST
    fused = _build(A.attention_vector_func(spec, emulate=mode == "emulated"), target)
    out = tvm.runtime.tensor(np.empty((bt, m, d), np.float32))
    fused(*_tensors(*inputs, attention_consts(log2_scale(S_ATTN))), out)
    assert np.array_equal(out.numpy(), expected)


@pytest.mark.parametrize("blocks,most", [(13, 4), (25, 2), (4, 4), (5, 4), (1, 4), (9, 2), (3, 4)])
def test_qk_tiles_take_every_key_block_once_in_as_few_tiles_as_allowed(blocks, most):
    wide, width, narrow = A.qk_tiles(blocks, most)
    assert wide * (width + 1) + narrow * width == blocks
    assert width + (wide > 0) <= most and wide + narrow == -(-blocks // most) and width >= 1


@pytest.mark.parametrize("variant,instructions", [("avx2_i16", ("vpmaddwd",)), ("vnni", ("vpdpbusd", "vpdpwssd"))])
def test_fused_vector_attention_asm_on_any_cpu(variant, instructions):
    """Built for the variant's preset on any host: both products on the variant's dot products, the logits' and
    attn @ V's accumulators in registers (no stack traffic in the dot-product loops)."""
    asm = tvm.compile(tvm.IRModule({"main": A.attention_vector_func(_spec(6, 197, 197, 64, 8, True, 8, variant))}),
                      target=targets.tvm_target(PRESET[variant], 1)).mod.inspect_source("asm")
    assert all(i in asm for i in instructions)
    loops = [block for block in asm.split("\n.LBB") if instructions[-1] in block and "jne" in block]
    assert loops and not any("(%rsp)" in line for block in loops for line in block.splitlines()
                             if instructions[-1] in line or "vpaddd" in line)


def test_variants_and_what_the_kernel_refuses():
    assert A.variant_for(targets.tvm_target("x86_64-avx512-vnni")) == "vnni"
    assert A.variant_for(targets.tvm_target("x86_64-avx2")) == "avx2_i16"
    assert A.variant_for(targets.tvm_target("aarch64-neon-dotprod")) is None
    assert A.fits(197, 197, 64, "vnni") and not A.fits(3, 197, 64, "vnni") and not A.fits(197, 197, 24, "vnni")
    assert A.fits(4, 1, 8, "avx2_i16")
    with pytest.raises(ValueError, match="the vnni attention needs M >= 4 and D % 16 == 0, got M=40, D=24"):
        A.attention_vector_func(_spec(1, 40, 45, 24, 8, True, 8, "vnni"))
    with pytest.raises(ValueError, match="variant must be one of"):
        A.attention_vector_func({**_spec(1, 40, 45, 64, 8, True, 8, "vnni"), "variant": "sse"})


def _qkv_head_codes(y, heads, t, d, quantizers, bits):
    """q, k, v codes [batch·H, T, D] of a qkv output y [batch·T, 3·H·D] under (scale, zero point) each: the unfused
    head split and `reference.ops.quantize` (round half to even)."""
    thirds = y.reshape(-1, t, 3, heads, d).transpose(2, 0, 3, 1, 4).reshape(3, -1, t, d)
    return [ops.quantize(thirds[i], s, z, bits).astype(np.uint8) for i, (s, z) in enumerate(quantizers)]


@pytest.mark.parametrize("variant,mode", [("avx2_i16", "native"), ("vnni", "emulated"), ("vnni", "native")])
@pytest.mark.parametrize("batch,heads,t,d,bits", [(2, 3, 45, 64, 8), (1, 4, 65, 32, 4)])
def test_fused_attention_quantizes_q_k_v_from_the_qkv_output(variant, mode, batch, heads, t, d, bits):
    """With ``qkv`` the kernel reads the qkv projection's float output [batch·T, 3·H·D] and quantizes each head's
    q, k and v itself: the same output as the kernel on the codes of `reference.ops.quantize` (the unfused
    quantizers, round half to even), taken in head layout; with ``"codes"`` in ``qkv`` it reads the qkv output's
    codes instead, with the same output."""
    if mode == "native" and not HAS[variant]:
        pytest.skip(f"this CPU cannot run {PRESET[variant]}: the kernel is checked through its emulation and its asm")
    if not A.fits(t, t, d, variant):
        pytest.skip(f"{variant} takes no D={d}")
    rng = np.random.default_rng(t)
    y = (rng.standard_normal((batch * t, 3 * heads * d)) * 2).astype(np.float32)
    quantizers = [(0.031, 131, 2 ** bits - 1), (0.027, 120, 2 ** bits - 1), (0.05, 2 ** (bits - 1), 2 ** bits - 1)]
    q, k, v = _qkv_head_codes(y, heads, t, d, [(s, z) for s, z, _ in quantizers], bits)
    qk_zp = np.array([quantizers[0][1], quantizers[1][1]], np.int32)
    v_zp, qk_scale, v_scale = np.array([quantizers[2][1]], np.int32), np.array([9e-4], np.float32), np.array([3e-6],
                                                                                                                np.float32)
    spec = _spec(batch * heads, t, t, d, bits, True, bits, variant)
    target = targets.tvm_target(PRESET[variant], 1) if mode == "native" else HOST
    plain = _build(A.attention_vector_func(spec, emulate=mode == "emulated"), target)
    fused = _build(A.attention_vector_func({**spec, "qkv": {"heads": heads, "tops": [t for *_, t in quantizers]}},
                                           emulate=mode == "emulated"), target)
    expected, out = (tvm.runtime.tensor(np.empty((batch * heads, t, d), np.float32)) for _ in range(2))
    plain(*_tensors(q, k, qk_zp, qk_scale, v, v_zp, v_scale, attention_consts(log2_scale(S_ATTN))), expected)
    consts = attention_consts(log2_scale(S_ATTN), {slot: (s, z) for slot, (s, z, _) in zip("qkv", quantizers)})
    fused(*_tensors(y, qk_zp, qk_scale, v_zp, v_scale, consts), out)
    assert np.array_equal(out.numpy(), expected.numpy())
    assert np.abs(expected.numpy()).max() > 0
    # with "codes": the qkv output's codes, each third under its quantizer (as the qkv kernel's column_codes store
    # them), read as they are: the same output, the consts' q, k and v slots unread
    third = np.arange(3 * heads * d) // (heads * d)
    y_codes = np.stack([ops.quantize(y[:, c], *quantizers[third[c]][:2], bits) for c in range(y.shape[1])], axis=1)
    spec_codes = {**spec, "qkv": {"heads": heads, "tops": [t for *_, t in quantizers], "codes": True}}
    assert AM.kernel_name(spec_codes).endswith("_qkv_codes")
    stored = _build(A.attention_vector_func(spec_codes, emulate=mode == "emulated"), target)
    out_codes = tvm.runtime.tensor(np.empty((batch * heads, t, d), np.float32))
    stored(*_tensors(y_codes.astype(np.uint8), qk_zp, qk_scale, v_zp, v_scale, attention_consts(log2_scale(S_ATTN))),
           out_codes)
    assert np.array_equal(out_codes.numpy(), expected.numpy())


def _token_codes(heads_out, heads, scale, zp, bits, operand):
    """`reference.ops.quantize` of float heads [B·H, T, D] in token order [B, T, H·D], as the output projection
    reads them (``operand``: int16 code − minus, `ZERO_POINT`: minus the zero point)."""
    bt, t, d = heads_out.shape
    tokens = heads_out.reshape(bt // heads, heads, t, d).transpose(0, 2, 1, 3).reshape(bt // heads, t, heads * d)
    codes = ops.quantize(tokens, scale, zp, bits).astype(np.int64)
    if not operand:
        return codes
    return codes - (zp if operand[1] == ZERO_POINT else operand[1])


# the fused kernels with ``out_codes``: the vector variants (AVX2 natively, VNNI emulated) and AMX (emulated)
OUT_CODES_KERNELS = [("avx2_i16", "native"), ("vnni", "emulated"), ("amx", "emulated")]


@pytest.mark.parametrize("variant,mode", OUT_CODES_KERNELS)
@pytest.mark.parametrize("heads,operand,bits", [(3, None, 8), (2, ("int16", 129), 8), (2, ("int16", ZERO_POINT), 8),
                                                (6, None, 4)])
def test_fused_attention_stores_the_output_projections_codes(variant, mode, heads, operand, bits):
    """With ``out_codes`` the kernel stores, in token order, the codes of the next quantizer of its float output
    (and the int16 operand an AVX2 projection reads): those of the kernel without it, quantized by the oracle."""
    bt, t, d = 6, 45, 64
    inputs, expected = _case(bt, t, t, d, 8, True, 8)
    spec = _spec(bt, t, t, d, 8, True, 8, "vnni" if variant == "amx" else variant)
    if variant == "amx":
        spec = {**spec, "variant": "amx"}
    scale = float(np.abs(expected).max()) / 2 ** (bits - 1) * 1.3  # codes from 0 to 2^b − 1, a few clipped
    top = 2 ** bits - 1
    spec = {**spec, "out_codes": {"heads": heads, "top": top, "operand": operand}}
    target = targets.tvm_target(PRESET[variant], 1) if mode == "native" else HOST
    fused = _build(A.attention_func(spec, emulate=mode == "emulated"), target)
    output = AM.Output(spec)
    out = tvm.runtime.tensor(np.empty(output.shape, output.dtype))
    fused(*_tensors(*inputs, attention_consts(log2_scale(S_ATTN), {"out": (scale, 2 ** (bits - 1))})), out)
    want = _token_codes(expected, heads, scale, 2 ** (bits - 1), bits, operand)
    assert out.dtype == (operand[0] if operand else "uint8") and out.shape == (bt // heads, t, heads * d)
    assert np.array_equal(out.numpy().astype(np.int64), want)
    assert len(np.unique(want)) > 2 ** bits // 4  # the codes spread over the range, not one value
    assert A.kernel_name(spec).endswith("_codes_out_codes")


@pytest.mark.parametrize("variant,mode", [("avx2_i16", "native"), ("vnni", "emulated")])
def test_one_kernel_serves_every_blocks_constants(variant, mode):
    """The softmax's log quantizer and the q, k, v and output quantizers are run-time constants (`attention_consts`):
    one compiled kernel (qkv in, proj's centred codes out, as AVX2 models run it), called with two blocks' constants,
    gives each block what the unfused kernels give with that block's constants (the log weights kernel with its
    log2(s), the oracle's quantizers), bit for bit."""
    batch, heads, t, d, bits = 2, 3, 45, 64, 8
    bt, top, rng = batch * heads, 2 ** bits - 1, np.random.default_rng(7)
    f = ops.attn_frac_bits(t, bits)
    spec = {**_spec(bt, t, t, d, bits, True, bits, variant), "qkv": {"heads": heads, "tops": [top] * 3},
            "out_codes": {"heads": heads, "top": top, "operand": ["int16", ZERO_POINT]}}
    target = targets.tvm_target(PRESET[variant], 1) if mode == "native" else HOST
    fused = _build(A.attention_vector_func(spec, emulate=mode == "emulated"), target)
    output = AM.Output(spec)
    # (softmax scale, q/k/v quantizers, output quantizer: its scale's share of the output's range, zero point)
    blocks = [(0.0073, [(0.031, 131), (0.027, 120), (0.05, 128)], (1.3, 127)),
              (0.0112, [(0.02, 125), (0.041, 133), (0.037, 122)], (0.9, 118))]
    seen = []
    for s_attn, qkv, (share, z_out) in blocks:
        y = (rng.standard_normal((batch * t, 3 * heads * d)) * 2).astype(np.float32)
        q, k, v = _qkv_head_codes(y, heads, t, d, qkv, bits)
        qk_zp, v_zp = np.array([qkv[0][1], qkv[1][1]], np.int32), np.array([qkv[2][1]], np.int32)
        qk_scale, v_scale = np.array([9e-4], np.float32), np.array([3e-6], np.float32)
        heads_out = _unfused(bt, t, t, d, s_attn, bits, True, f, ops.attn_groups(bits, f, True), bits, q, k, v, qk_zp,
                             qk_scale, v_zp, v_scale)
        s_out = float(np.abs(heads_out).max()) / 2 ** (bits - 1) * share  # codes over the range, a few clipped
        want = _token_codes(heads_out, heads, s_out, z_out, bits, ("int16", ZERO_POINT))
        consts = with_quantizer(attention_consts(log2_scale(s_attn), dict(zip("qkv", qkv))), "out", s_out, z_out)
        out = tvm.runtime.tensor(np.empty(output.shape, output.dtype))
        fused(*_tensors(y, qk_zp, qk_scale, v_zp, v_scale, consts), out)
        assert np.array_equal(out.numpy().astype(np.int64), want)
        assert len(np.unique(want)) > 32
        seen.append(out.numpy())
    assert not np.array_equal(*seen)


def test_attention_consts_refuse_what_they_cannot_hold():
    with pytest.raises(ValueError, match=r"no quantizer slot \['o'\] in a fused attention"):
        attention_consts(log2_scale(0.01), {"o": (0.1, 128)})
    with pytest.raises(ValueError, match=r"attention constants are float64 \[13\], got shape \(3,\)"):
        with_quantizer(np.zeros(3), "out", 0.1, 128)


def test_output_codes_refuse_a_head_count_that_does_not_divide_the_batch():
    spec = {**_spec(6, 45, 45, 64, 8, True, 8, "avx2_i16"), "out_codes": {"heads": 4, "top": 255}}
    with pytest.raises(ValueError, match="out_codes needs Bt = batch x heads, got Bt=6, heads=4"):
        A.attention_vector_func(spec)


@pytest.mark.parametrize("variant,mode", [("avx2_i16", "native"), ("vnni", "emulated")])
def test_fused_attention_adds_the_logit_terms(variant, mode):
    """With ``logit_terms`` (Swin: a relative-position bias per head, a mask per shifted window) the kernel adds
    them to q @ kᵀ's logits before the softmax, in the graph's order: the three kernels' output with the float32
    adds between q @ kᵀ and the softmax done in NumPy."""
    windows, heads, t, d, masks = 4, 3, 49, 32, 2
    bt, rng = windows * heads, np.random.default_rng(1)
    q, k, v = (rng.integers(0, 256, (bt, t, d)).astype(np.uint8) for _ in range(3))
    qk_zp, v_zp = np.array([120, 131], np.int32), np.array([127], np.int32)
    qk_scale, v_scale = np.array([9e-4], np.float32), np.array([3e-6], np.float32)
    bias = (rng.standard_normal((heads, t, t)) * 2).astype(np.float32)
    mask = np.where(rng.random((masks, t, t)) < 0.3, -100.0, 0.0).astype(np.float32)
    f = ops.attn_frac_bits(t, 8)
    groups = ops.attn_groups(8, f, True)
    logits = tvm.runtime.tensor(np.empty((bt, t, t), np.float32))
    _build(qbmm_primfunc(bt, t, t, d, HOST)[0], HOST)(*_tensors(q, k, qk_zp, qk_scale), logits)
    y = (logits.numpy().reshape(windows, heads, t, t) + bias).reshape(windows // masks, masks, heads, t, t)
    y = (y + mask[None, :, None]).reshape(bt, t, t)
    (w,) = _tensors(np.zeros((bt, groups, t, padded_tokens(t)), np.int16))
    _build(log_weights_primfunc((bt, t, t), 8, True, f, groups, HOST, softmax=True)[0], HOST)(
        *_tensors(y, log2_scale_operand(S_ATTN)), w)
    expected = tvm.runtime.tensor(np.empty((bt, t, d), np.float32))
    _build(attn_v_primfunc(bt, t, t, d, HOST, groups=groups, f=f)[0], HOST)(
        w, *_tensors(v, v_zp, v_scale), expected)

    spec = {**_spec(bt, t, t, d, 8, True, 8, variant), "logit_terms": [[1, heads], [heads, masks]]}
    assert A.logit_term_shape(heads, t, t) == (heads, t, 64)  # keys padded to whole vectors of 16
    tables = [np.pad(x, ((0, 0), (0, 0), (0, 64 - t))) for x in (bias, mask)]
    target = targets.tvm_target(PRESET[variant], 1) if mode == "native" else HOST
    fused = _build(A.attention_vector_func(spec, emulate=mode == "emulated"), target)
    out = tvm.runtime.tensor(np.empty((bt, t, d), np.float32))
    consts = attention_consts(log2_scale(S_ATTN))
    fused(*_tensors(q, k, qk_zp, qk_scale, v, v_zp, v_scale, *tables, consts), out)
    assert np.array_equal(out.numpy(), expected.numpy()) and np.abs(out.numpy()).max() > 0
    assert A.kernel_name(spec).endswith("_t2_codes")
    # without the mask's adds the output differs: the terms are read
    fused(*_tensors(q, k, qk_zp, qk_scale, v, v_zp, v_scale, tables[0], np.zeros_like(tables[1]), consts), out)
    assert not np.array_equal(out.numpy(), expected.numpy())
    with pytest.raises(ValueError, match="at most two logit terms"):
        A.attention_vector_func({**spec, "logit_terms": [[1, 1]] * 3})
