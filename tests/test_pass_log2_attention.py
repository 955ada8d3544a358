"""log2 shift attention: the kernel equals `reference.ops.log2_attn_v` bit for bit, and LowerLog2Attention
on a small canonical module agrees with the float fake-quant graph within the bound its integer arithmetic
allows."""

import numpy as np
import pytest
import tvm
from tvm import relax

from repq_tvm.frontends import canonical
from repq_tvm.kernels.shift_attention import (
    AARCH64_TARGET, X86_AVX2_TARGET, build_shift_attention, check_frac_bits, kernel_codes, schedule_shift_attention,
    shift_attention,
)
from repq_tvm.passes.log2_attention import LowerLog2Attention
from repq_tvm.reference import ops

TARGET = X86_AVX2_TARGET  # the x86_64-avx2 preset


def random_codes(rng, shape, bits, f, sqrt2, v_bits):
    """Codes over the whole range plus a dense band around the underflow edge (shift F + b_v), 20% dead."""
    top = 2 ** bits - 1
    edge = 2 * (f + v_bits) if sqrt2 else f + v_bits  # largest code whose shift is still alive
    band = rng.integers(max(0, edge - 20), edge + 4, shape)
    codes = np.where(rng.random(shape) < 0.5, rng.integers(0, top + 1, shape), np.minimum(band, top))
    dead = rng.random(shape) < 0.2
    return codes, dead


def reference_acc(codes, dead, v, z_v, f, sqrt2, v_bits):
    # plain log2: code c is shift c, no odd part — the log√2 reference with even code 2c
    return ops.log2_attn_v(codes if sqrt2 else 2 * codes, dead, v, z_v, f, v_bits)


# (Bt, M, N, D): ragged M, N, D (no multiple of the 8 lanes or the row tile); every code and V bit width
@pytest.mark.parametrize("bits,sqrt2,v_bits,shape", [
    (4, True, 4, (3, 13, 37, 20)), (6, True, 6, (2, 9, 11, 5)), (8, True, 8, (2, 7, 45, 19)),
    (8, True, 4, (1, 5, 65, 9)), (4, False, 8, (2, 9, 11, 5)), (6, False, 4, (3, 13, 37, 20)),
    (8, False, 6, (1, 11, 29, 13)),
])
def test_kernel_is_bit_exact(bits, sqrt2, v_bits, shape):
    bt, m, n, d = shape
    rng = np.random.default_rng(bits + 10 * sqrt2 + 100 * v_bits)
    f = ops.frac_bits(n, v_bits)
    codes, dead = random_codes(rng, (bt, m, n), bits, f, sqrt2, v_bits)
    v = rng.integers(0, 2 ** v_bits, (bt, n, d)).astype(np.uint8)
    v[..., 0, :] = 2 ** v_bits - 1  # extremes of v − z_v
    v[..., 1, :] = 0
    z_v = int(rng.integers(0, 2 ** v_bits))
    kernel = build_shift_attention(bt, m, n, d, TARGET, sqrt2=sqrt2, v_bits=v_bits, epilogue=False)
    assert kernel.f == f
    acc = reference_acc(codes, dead, v, z_v, f, sqrt2, v_bits)
    assert np.array_equal(kernel(kernel_codes(codes, dead), v, z_v), acc)


@pytest.mark.parametrize("n,v_bits", [(197, 8), (65, 4)])
def test_kernel_extreme_sums_and_float_epilogue(n, v_bits):
    """All codes 0 and |v − z_v| = 2^b − 1 over N tokens: S = N·(2^b − 1)·2^F near the int32 limit
    (197·255·2^15 ≈ 1.65e9; 65·15·2^21 ≈ 2.04e9 of 2.15e9) and the biased uint32 sums N·(2^(b+1) − 1)·2^F near
    2^32 (3.3e9; 4.23e9 of 4.29e9); the float output is float32(acc)·float32(scale), bit for bit."""
    bt, m, d = 1, 3, 8
    f = ops.frac_bits(n, v_bits)
    assert f == {197: 15, 65: 21}[n]
    top = 2 ** v_bits - 1
    assert n * (2 * top + 1) << f > 2 ** 32 * 0.75 and n * top << f > 2 ** 31 * 0.75  # really near the limits
    kernel = build_shift_attention(bt, m, n, d, TARGET, sqrt2=True, v_bits=v_bits)
    codes, dead = np.zeros((bt, m, n), np.int64), np.zeros((bt, m, n), bool)
    codes[0, 1, ::2] = 1  # a row of alternating √2 codes
    codes[0, 2, :] = 1
    scale = 0.3855 * 0.02 / 2 ** f
    for value, z_v in ((top, 0), (0, top)):
        v = np.full((bt, n, d), value, np.uint8)
        acc = reference_acc(codes, dead, v, z_v, f, True, v_bits)
        assert abs(int(acc[0, 0, 0])) == n * top << f
        out = kernel(kernel_codes(codes, dead), v, z_v, scale)
        assert np.array_equal(out, acc.astype(np.float32) * np.float32(scale))


@pytest.mark.parametrize("n,v_bits", [(1, 8), (2, 4), (65, 4), (65, 6), (197, 8), (3136, 8)])
def test_kernel_refuses_frac_bits_that_could_overflow(n, v_bits):
    """frac_bits(N, b) is accepted and is the largest F the kernel accepts."""
    f = ops.frac_bits(n, v_bits)
    check_frac_bits(n, f, v_bits)
    with pytest.raises(ValueError):
        check_frac_bits(n, f + 1, v_bits)
    with pytest.raises(ValueError):
        shift_attention(1, 2, n, 8, f=f + 1, v_bits=v_bits)
    with pytest.raises(ValueError):
        check_frac_bits(n, f, v_bits + 1)  # more V bits need fewer fractional bits


def attention_module(cases, extra_use=False):
    """One softmax(logits) → log quantizer → matmul(·, dequantize(clip(quantize(v)))) per case
    (logits shape, d, s_attn, bits, s_v, z_v, v_bits, sqrt2); the outputs in a tuple."""
    bb = relax.BlockBuilder()
    params, outs = [], []
    for i, (shape_p, d, *_) in enumerate(cases):
        *lead, m, n = shape_p
        params += [relax.Var(f"logits{i}", relax.TensorType(shape_p, "float32")),
                   relax.Var(f"v{i}", relax.TensorType((*lead, n, d), "float32"))]
    with bb.function("main", params):
        with bb.dataflow():
            for i, (shape_p, d, s_attn, bits, s_v, z_v, v_bits, sqrt2) in enumerate(cases):
                p = bb.emit(relax.op.nn.softmax(params[2 * i], axis=-1))
                a = bb.emit(canonical.log_fake_quant(p, (relax.TensorType(shape_p, "float32"),), s_attn, bits, sqrt2))
                vh = bb.emit(canonical.uniform_qdq(params[2 * i + 1], s_v, z_v, v_bits))
                outs.append(bb.emit(relax.op.matmul(a, vh, out_dtype="float32")))
                if extra_use:
                    outs.append(bb.emit(relax.op.sum(a, axis=[-1])))
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


def run(mod, *inputs):
    ex = tvm.compile(mod, target=tvm.target.Target(TARGET))
    res = relax.VirtualMachine(ex, tvm.cpu())["main"](*(tvm.runtime.tensor(x) for x in inputs))
    return [r.numpy() for r in res]


def _calls(mod):
    found = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(e) if isinstance(e, relax.Call) else None)
    return found


def _case(seed, lead, m, n, d, bits, sqrt2, v_bits):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((*lead, m, n)) * 3).astype(np.float32)
    v = rng.standard_normal((*lead, n, d)).astype(np.float32)
    s_attn, s_v = 0.3855, 0.8 / 2 ** v_bits  # 0.05 at 4 bits
    return (logits.shape, d, s_attn, bits, s_v, 2 ** (v_bits - 1), v_bits, sqrt2), (logits, v)


def _bound(case, logits, v):
    """|kernel − float graph| bound per output (see `test_lowered_matches_fake_quant_graph`) and the deep count."""
    shape_p, d, s_attn, bits, s_v, z_v, v_bits, sqrt2 = case
    n = shape_p[-1]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    a_hat = canonical.log_fake_quant_np(p, s_attn, bits, sqrt2)
    v_hat = (np.clip(np.round(v / s_v) + z_v, 0, 2 ** v_bits - 1) - z_v) * s_v
    f = ops.frac_bits(n, v_bits)
    codes, dead = ops.log_sqrt2_codes(p, s_attn, bits) if sqrt2 else _log2_codes(p, s_attn, bits)
    shift = (codes + 1) // 2 if sqrt2 else codes
    deep = ((shift > f) & ~dead).sum(-1, keepdims=True)  # per row: tokens whose shift drops bits
    unit = s_attn * s_v / 2 ** f
    # |√2_Q/2^Q − √2|·|S_odd| units, |S_odd| ≤ N·(2^b_v − 1)·2^F (float64 √2: + 1e-15 relative slack)
    const = (abs(ops.SQRT2_FIXED / 2 ** ops.SQRT2_Q - np.sqrt(2)) + 1e-15) * n * (2 ** v_bits - 1) * 2 ** f
    assert const < 0.05
    bound = (np.sqrt(2) * deep + 0.5 + const) * unit + (n + 4) * 2.0 ** -24 * (np.abs(a_hat) @ np.abs(v_hat))
    return bound, deep


@pytest.mark.parametrize("specs", [
    [(4, True, 4)],  # the fixture's quantizers: 4-bit log√2, 4-bit V
    [(8, True, 6), (4, False, 8)],  # 8-bit codes shift past F (floors drop bits); plain log2; 6- and 8-bit V
], ids=["log_sqrt2_4bit", "log_sqrt2_8bit+log2_4bit"])
def test_lowered_matches_fake_quant_graph(specs):
    """Bound: with unit = s_attn·s_v/2^F (F = frac_bits(N, b_v)), each token whose shift exceeds F drops < 1
    unit (√2 units when odd) by the floor, or < ½ (√2/2) unit when dropped past F + b_v; the √2 fixed-point
    multiply ≤ ½ unit by its rounding plus |√2_Q/2^Q − √2|·|S_odd| < 0.03 units; the float graph and the
    kernel's final float32 conversion and scale round at most (N + 4)·2^-24 relative to Σ|â||v̂|.  4-bit log√2
    codes never shift past F, so there only the √2 rounding and float rounding remain."""
    cases, inputs = zip(*(_case(bits, (2, 3), 17, 21, 12, bits, sqrt2, v_bits) for bits, sqrt2, v_bits in specs))
    mod = attention_module(cases)
    lower = LowerLog2Attention(TARGET)
    lowered = lower(mod)
    assert lower.rewritten == len(cases)
    names = {c.op.name for c in _calls(lowered) if isinstance(c.op, tvm.ir.Op)}
    assert "relax.matmul" not in names and "relax.call_pure_packed" not in names
    names = {gv.name_hint for gv in lowered.get_global_vars()}
    for _, _, v_bits in specs:  # the pass read b_v from the V clip (none at 8 bits) and picked F for it
        assert any(x.startswith("repq_shift_attn") and x.endswith(f"_v{v_bits}_f{ops.frac_bits(21, v_bits)}")
                   for x in names), names

    flat = [x for pair in inputs for x in pair]
    for case, (logits, v), ref, out in zip(cases, inputs, run(mod, *flat), run(lowered, *flat)):
        bound, deep = _bound(case, logits, v)
        err = np.abs(out - ref)
        assert np.all(err <= bound), (case, err.max(), float((err / bound).max()))
        assert np.abs(ref).max() > 0.1  # a meaningful comparison, not zeros
        if case[3] == 4 and case[-1]:
            assert deep.max() == 0  # the claim in the docstring
        if case[3] == 8:
            assert deep.max() > 0  # the floors were exercised


def _log2_codes(p, scale, bits):
    with np.errstate(divide="ignore"):
        raw = np.round(-np.log2(p / np.float32(scale)))
    dead = ~(raw <= 2 ** bits - 1)
    return np.clip(np.nan_to_num(raw, posinf=0), 0, 2 ** bits - 1).astype(np.int64), dead


def test_other_uses_of_the_log_quantizer_are_kept():
    mod = attention_module([((1, 2, 9, 9), 8, 0.5, 4, 0.05, 8, 4, True)], extra_use=True)
    lower = LowerLog2Attention(TARGET)
    ops_after = canonical.canonical_ops(lower(mod))
    assert lower.rewritten == 1
    assert ops_after["repq.log_sqrt2_fake_quant"] == 1 and ops_after["relax.matmul"] == 0


def test_float_matmuls_are_left_alone():
    """A plain float matmul, and a log-quantized attention times float (not dequantized) V."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 4, 8), "float32"))
    w = relax.Var("w", relax.TensorType((2, 8, 3), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, w))
            a = bb.emit(canonical.log_fake_quant(x, (x.ty,), 0.5, 4, True))
            z = bb.emit(relax.op.matmul(a, w))
            out = bb.emit_output(relax.Tuple([y, z]))
        bb.emit_func_output(out)
    mod = bb.get()
    lower = LowerLog2Attention(TARGET)
    tvm.ir.assert_structural_equal(lower(mod)["main"], mod["main"])
    assert lower.rewritten == 0


@pytest.mark.parametrize("sqrt2", [True, False])
def test_kernel_compiles_for_aarch64(sqrt2):
    sch, params = schedule_shift_attention(4, 65, 65, 32, AARCH64_TARGET, sqrt2=sqrt2)
    ex = tvm.compile(sch.mod, target=tvm.target.Target(AARCH64_TARGET))
    asm = ex.mod.inspect_source("asm")
    assert params["lanes"] == 4
    assert "ushl\tv" in asm  # NEON variable shifts (right shift = ushl by a negated count)
