"""log√2 attention as an int16 dot product: the kernel equals `reference.ops.attn_v_acc` bit for bit on every
variant (VNNI for real where the CPU has it and through its plain-loop twin everywhere, AVX2, NEON's plain
loops built for aarch64), and LowerLog2Attention on a small canonical module agrees with the float fake-quant
graph within the bound its integer arithmetic allows."""

import numpy as np
import pytest
import tvm
from tvm import relax

from repq_tvm import targets
from repq_tvm.frontends import canonical
from repq_tvm.kernels.attn_v import attn_v, schedule_attn_v
from repq_tvm.kernels.qdense import AARCH64_NEON_TARGET, X86_AVX2_TARGET
from repq_tvm.passes.log2_attention import LowerLog2Attention, attn_v_call, log_weights
from repq_tvm.reference import ops
from repq_tvm.testing.attn_v import AttnV

TARGET = X86_AVX2_TARGET  # the x86_64-avx2 preset
VNNI = targets.tvm_target("x86_64-avx512-vnni")
VNNI_SKIP = targets.runnable_reason(VNNI)


def random_codes(rng, shape, bits, f, sqrt2):
    """Codes over the whole range plus a dense band around both group edges (shifts F and 2F + 1), 20% dead."""
    top = 2 ** bits - 1
    m = 2 if sqrt2 else 1
    edges = [m * f, m * (2 * f + 1)]
    band = rng.integers(0, 6, shape) - 3 + np.array(edges)[rng.integers(0, 2, shape)]
    codes = np.where(rng.random(shape) < 0.5, rng.integers(0, top + 1, shape), np.clip(band, 0, top))
    dead = rng.random(shape) < 0.2
    return codes, dead


def _operands(seed, bt, m, n, d, bits, sqrt2, v_bits):
    rng = np.random.default_rng(seed)
    f = ops.attn_frac_bits(n, v_bits)
    codes, dead = random_codes(rng, (bt, m, n), bits, f, sqrt2)
    v = rng.integers(0, 2 ** v_bits, (bt, n, d)).astype(np.uint8)
    v[..., 0, :] = 2 ** v_bits - 1  # extremes of v − z_v
    v[..., 1, :] = 0
    z_v = int(rng.integers(0, 2 ** v_bits))
    groups = ops.attn_groups(bits, f, sqrt2)
    return f, groups, ops.attn_weights(codes, dead, f, sqrt2, groups), v, z_v


# (Bt, M, N, D): ragged M, N, D (no multiple of the lanes or the row tile); every code and V bit width
SHAPES = [(4, True, 4, (3, 13, 37, 20)), (6, True, 6, (2, 9, 11, 5)), (8, True, 8, (2, 7, 45, 19)),
          (8, True, 4, (1, 5, 65, 9)), (4, False, 8, (2, 9, 11, 5)), (6, False, 4, (3, 13, 37, 20)),
          (8, False, 6, (1, 11, 29, 13))]


def _check(bits, sqrt2, v_bits, shape, target, **kw):
    bt, m, n, d = shape
    f, groups, w, v, z_v = _operands(bits + 10 * sqrt2 + 100 * v_bits, bt, m, n, d, bits, sqrt2, v_bits)
    kernel = AttnV(bt, m, n, d, target, groups=groups, f=f, v_bits=v_bits, epilogue=False, **kw)
    acc = ops.attn_v_acc(w, v, z_v, f, v_bits)
    assert np.array_equal(kernel(w, v, z_v), acc)
    return kernel


@pytest.mark.parametrize("bits,sqrt2,v_bits,shape", SHAPES)
def test_avx2_kernel_is_bit_exact(bits, sqrt2, v_bits, shape):
    assert _check(bits, sqrt2, v_bits, shape, TARGET).variant == "avx2_i16"


@pytest.mark.parametrize("bits,sqrt2,v_bits,shape", SHAPES[:4])
def test_vnni_schedule_is_bit_exact_through_its_portable_twin(bits, sqrt2, v_bits, shape):
    """The VNNI schedule (layout, tiles, epilogue) with vpdpwssd's plain-loop twin: runs on any x86 CPU."""
    assert _check(bits, sqrt2, v_bits, shape, TARGET, variant="vnni_i16", ref=True).variant == "vnni_i16"


@pytest.mark.skipif(VNNI_SKIP is not None, reason=str(VNNI_SKIP))
@pytest.mark.parametrize("bits,sqrt2,v_bits,shape", SHAPES)
def test_vnni_kernel_is_bit_exact(bits, sqrt2, v_bits, shape):
    kernel = _check(bits, sqrt2, v_bits, shape, VNNI)
    assert kernel.variant == "vnni_i16" and "vpdpwssd" in kernel.asm()


def test_vnni_kernel_asm_without_running_it():
    """Built on any host: the inner loop is vpdpwssd on zmm (checked even where the CPU cannot run it)."""
    sch, variant = schedule_attn_v(2, 9, 11, 32, VNNI, groups=2)
    asm = tvm.compile(sch.mod, target=VNNI).mod.inspect_source("asm")
    assert variant == "vnni_i16" and "vpdpwssd\t%zmm" in asm


@pytest.mark.parametrize("n,v_bits", [(197, 8), (65, 4), (3136, 8)])
def test_extreme_sums_and_float_epilogue(n, v_bits):
    """All codes 0 (weight 2^F), |v − z_v| = 2^b − 1 over N tokens: S = N·(2^b − 1)·2^F, near the int32
    limit for the F `attn_frac_bits` picks (with the code of the largest plane-1 weight in a row of its own);
    the float output is float32(acc)·float32(scale), bit for bit."""
    bt, m, d = 1, 4, 8
    f = ops.attn_frac_bits(n, v_bits)
    assert f == {197: 14, 65: 14, 3136: 10}[n]
    top = 2 ** v_bits - 1
    assert n * top * ops.attn_max_weight(f) < 2 ** 31 <= n * top * ops.attn_max_weight(f + 1) or f == 14
    kernel = AttnV(bt, m, n, d, VNNI if VNNI_SKIP is None else TARGET, groups=2, f=f, v_bits=v_bits)
    codes, dead = np.zeros((bt, m, n), np.int64), np.zeros((bt, m, n), bool)
    codes[0, 1, ::2] = 1  # a row of alternating √2 codes
    every = np.arange(4 * f + 3)
    low = ops.attn_weights(every[None], np.zeros((1, every.size), bool), f, True, 2)[1, 0]
    codes[0, 2, :] = np.argmax(low)  # the code of the largest plane-1 weight
    codes[0, 3, :] = 1
    w = ops.attn_weights(codes, dead, f, True, 2)
    assert w[:, 1].max() == low.max() <= ops.attn_max_weight(f) and w[:, 0].max() == 1 << f
    scale = 0.3855 * 0.02 / 2 ** (f + ops.ATTN_EXTRA_BITS)
    for value, z_v in ((top, 0), (0, top)):
        v = np.full((bt, n, d), value, np.uint8)
        acc = ops.attn_v_acc(w, v, z_v, f, v_bits)
        assert abs(int(acc[0, 0, 0])) == (n * top << f) << ops.ATTN_EXTRA_BITS
        out = kernel(w, v, z_v, scale)
        assert np.array_equal(out, acc.astype(np.float32) * np.float32(scale))


def test_kernel_refuses_f_that_could_overflow():
    f = ops.attn_frac_bits(3136, 8)
    attn_v(1, 2, 3136, 8, f=f)
    with pytest.raises(ValueError, match="could overflow int32"):
        attn_v(1, 2, 3136, 8, f=f + 1)
    with pytest.raises(ValueError, match="V bits"):
        attn_v(1, 2, 8, 8, v_bits=9)


def test_aarch64_kernel_compiles_to_neon_multiply_accumulates():
    sch, variant = schedule_attn_v(4, 65, 65, 32, AARCH64_NEON_TARGET, groups=1)
    asm = tvm.compile(sch.mod, target=AARCH64_NEON_TARGET).mod.inspect_source("asm")
    assert variant == "fallback" and ("smlal" in asm or "mla\tv" in asm)


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
    f = ops.attn_frac_bits(n, v_bits)
    codes, dead = ops.log_sqrt2_codes(p, s_attn, bits) if sqrt2 else _log2_codes(p, s_attn, bits)
    shift = (codes + 1) // 2 if sqrt2 else codes
    deep = ((shift > f) & ~dead).sum(-1, keepdims=True)  # per row: tokens in the rounded group 1 or dropped
    unit = s_attn * s_v / 2 ** (f + ops.ATTN_EXTRA_BITS)
    v_max = np.abs(v_hat).max()
    bound = (unit + deep * 2.0 ** -(2 * f + 1) * s_attn * v_max
             + (n + 4) * 2.0 ** -24 * (np.abs(a_hat) @ np.abs(v_hat)))
    return bound, deep


@pytest.mark.parametrize("specs", [
    [(4, True, 4)],  # the fixture's quantizers: 4-bit log√2, 4-bit V
    [(8, True, 6), (4, False, 8)],  # 8-bit codes shift past F (group 1); plain log2; 6- and 8-bit V
], ids=["log_sqrt2_4bit", "log_sqrt2_8bit+log2_4bit"])
def test_lowered_matches_fake_quant_graph(specs):
    """Bound: acc is exact in its unit s_attn·s_v/2^(F+G) (one unit of slack); an even code's weight with shift
    ≤ F is exact, an odd code's rounds once by at most 2^−(2F+2)·s_attn (within the float rounding below); an
    entry with shift past F rounds by at most 2^−(2F+1)·s_attn·|v̂| (or is dropped past 2F + 1, less than that);
    the float graph and the kernel's final float32 conversion and scale round at most (N + 4)·2^-24 relative to
    Σ|â||v̂|.  4-bit log√2 codes never shift past F."""
    cases, inputs = zip(*(_case(bits, (2, 3), 17, 21, 12, bits, sqrt2, v_bits) for bits, sqrt2, v_bits in specs))
    mod = attention_module(cases)
    lower = LowerLog2Attention(TARGET)
    lowered = lower(mod)
    assert lower.rewritten == len(cases)
    names = {c.op.name for c in _calls(lowered) if isinstance(c.op, tvm.ir.Op)}
    assert "relax.matmul" not in names and "relax.call_pure_packed" not in names
    names = {gv.name_hint for gv in lowered.get_global_vars()}
    for bits, sqrt2, v_bits in specs:  # the pass read b_v from the V clip (none at 8 bits) and picked F for it
        groups = ops.attn_groups(bits, ops.attn_frac_bits(21, v_bits), sqrt2)
        assert any(x.startswith("repq_attn_v_avx2_i16") and
                   x.endswith(f"_g{groups}_v{v_bits}_f{ops.attn_frac_bits(21, v_bits)}")
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
            assert deep.max() > 0  # group 1 was exercised


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


def _build(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)["main"]


def _weights_of_codes(codes, dead, f, sqrt2, groups, n):
    bt, m = codes.shape[:2]
    out = np.zeros((bt, groups, m, n + 1), np.int16)
    out[..., :n] = ops.attn_weights(codes, dead, f, sqrt2, groups)
    return out


def _log_weights_kernel(shape, bits, sqrt2, f, groups, fused, scale=None):
    """The built kernel (fused: ``run(x, log2s, w)``; from p: ``run(x, w)``, the scale in the code)."""
    from repq_tvm.kernels.log_weights import log_weights_primfunc

    func, name = log_weights_primfunc(shape, bits, sqrt2, f, groups, TARGET, softmax=fused, scale=scale)
    assert name.startswith("repq_log_weights_softmax_" if fused else "repq_log_weights_")
    return _build(func)


def _run_log_weights(kernel, data, planes_shape, s_attn=None):
    """Weights of ``data`` (with ``s_attn`` the fused kernel's run-time scale)."""
    from repq_tvm.kernels.log_weights import log2_scale_operand

    out = tvm.runtime.tensor(np.full(planes_shape, 7, np.int16))
    log2s = [] if s_attn is None else [tvm.runtime.tensor(log2_scale_operand(s_attn))]
    kernel(tvm.runtime.tensor(data), *log2s, out)
    return out.numpy()


@pytest.mark.parametrize("bits,sqrt2", [(4, True), (8, True), (8, False)])
def test_log_weights_kernel_matches_the_oracle(bits, sqrt2):
    """Weights from p equal `attn_weights(log codes of p)` bit for bit."""
    from tvm import te, topi

    bt, m, n, s_attn = 3, 7, 45, 0.3855
    f = ops.attn_frac_bits(n, 8)
    groups = ops.attn_groups(bits, f, sqrt2)
    logits = (np.random.default_rng(bits).standard_normal((bt, m, n)) * 4).astype(np.float32)
    x = te.placeholder((bt, m, n), "float32")
    softmax = tvm.compile(te.create_prim_func([x, topi.nn.fast_softmax(x, -1)]), target=TARGET)["main"]
    p = tvm.runtime.tensor(np.empty_like(logits))
    softmax(tvm.runtime.tensor(logits), p)
    p = p.numpy()
    codes, dead = ops.log_sqrt2_codes(p, s_attn, bits) if sqrt2 else _log2_codes(p, s_attn, bits)
    expect = _weights_of_codes(codes, dead, f, sqrt2, groups, n)
    alive = expect[..., :n] != 0
    assert alive.any(1).mean() > 0.1 and alive.any((0, 2, 3)).all()  # a real test: every plane has weights
    assert groups == (2 if sqrt2 or bits == 8 else 1)  # plane 1: odd log√2 codes, or shifts past F
    out = _run_log_weights(_log_weights_kernel((bt, m, n), bits, sqrt2, f, groups, False, s_attn), p, expect.shape)
    assert np.array_equal(out, expect), int((out != expect).sum())


@pytest.mark.parametrize("bits,sqrt2", [(4, True), (8, True), (8, False)])
def test_fused_softmax_codes_are_the_exact_softmax_codes(bits, sqrt2):
    """With the softmax fused the codes come from the logits in the log domain, round(m·log2(e)·(max − x) +
    m·(log2 Σ + log2 s)): the exact softmax's codes up to float32 rounding, so they equal the float64 oracle's
    wherever its value is not within 1e-4 of a rounding midpoint (a handful of the DeiT-sized rows' entries).
    One compiled kernel, called with two blocks' scales (log2 s is its run-time operand)."""
    bt, m, n = 2, 24, 197
    f = ops.attn_frac_bits(n, 8)
    groups = ops.attn_groups(bits, f, sqrt2)
    logits = (np.random.default_rng(bits).standard_normal((bt, m, n)) * 3).astype(np.float32)
    logits[0, 0] = -1e30  # a row of equal logits (p = 1/N) with absurd values: codes, no overflow
    logits[0, 1, 5] = 1e30  # one huge logit: p = 1 there (code 0), every other entry dead
    x = logits.astype(np.float64)
    xm = x.max(-1, keepdims=True)
    mult = 2 if sqrt2 else 1
    kernel, outs = _log_weights_kernel((bt, m, n), bits, sqrt2, f, groups, True), []
    for s_attn in (0.0037, 0.0215):
        raw = mult * ((xm - x) * np.log2(np.e) + np.log2(np.exp(x - xm).sum(-1, keepdims=True)) + np.log2(s_attn))
        top = 2 ** bits - 1
        near = np.abs(raw - np.floor(raw) - 0.5) < 1e-4
        codes = np.clip(np.round(raw), 0, top).astype(np.int32)
        expect = _weights_of_codes(codes, raw > top + 0.5, f, sqrt2, groups, n)
        out = _run_log_weights(kernel, logits, expect.shape, s_attn)
        differ = (out[..., :n] != expect[..., :n]).any(1)  # [bt, m, n]: an entry whose weights differ in any plane
        assert not (differ & ~near).any(), (s_attn, np.argwhere(differ & ~near)[:5])
        assert near.mean() < 1e-3 and (expect[..., :n] != 0).any(1).mean() > 0.1
        assert (out[..., n] == 0).all()  # the padding token
        assert (out[0, :, 1, :n][:, np.arange(n) != 5] == 0).all() and out[0, 0, 1, 5] == (1 << f)
        outs.append(out)
    assert not np.array_equal(*outs)  # the scale reached the codes


def test_pass_fuses_the_softmax_into_the_weights_kernel():
    mod = attention_module([((1, 2, 9, 9), 8, 0.5, 4, 0.05, 8, 4, True)])
    lowered = LowerLog2Attention(TARGET)(mod)
    names = {gv.name_hint for gv in lowered.get_global_vars()}
    assert any(x.startswith("repq_log_weights_softmax_sqrt2_2x9x9_b4_g2_f14") for x in names), names
    lowered = relax.transform.DeadCodeElimination()(lowered)
    assert "relax.nn.softmax" not in {c.op.name for c in _calls(lowered) if isinstance(c.op, tvm.ir.Op)}


def test_blocks_with_other_log_scales_share_one_weights_kernel():
    """Two attentions of one shape whose log quantizers differ in their scale: one fused-softmax weights kernel,
    each call with its own log2(s) (float64), each result within the bound of its own fake-quant graph."""
    from repq_tvm.kernels.log_weights import log2_scale_operand

    cases, inputs = [], []
    for seed, s_attn in ((1, 0.3855), (2, 0.0731)):
        case, data = _case(seed, (2, 3), 17, 21, 12, 4, True, 4)
        cases.append((*case[:2], s_attn, *case[3:]))
        inputs.append(data)
    mod = attention_module(cases)
    lowered = LowerLog2Attention(TARGET)(mod)
    kernels = [gv for gv in lowered.get_global_vars() if gv.name_hint.startswith("repq_log_weights_softmax_")]
    assert len(kernels) == 1, kernels
    calls = [c for c in _calls(lowered) if c.op.name == "relax.call_tir" and c.args[0].same_as(kernels[0])]
    log2s = [c.args[1].fields[1].value.numpy() for c in calls]
    assert [a.dtype for a in log2s] == [np.float64] * 2
    assert sorted(a[0] for a in log2s) == sorted(log2_scale_operand(c[2])[0] for c in cases)
    flat = [x for pair in inputs for x in pair]
    for case, (logits, v), ref, out in zip(cases, inputs, run(mod, *flat), run(lowered, *flat)):
        bound, _ = _bound(case, logits, v)
        assert np.all(np.abs(out - ref) <= bound), case
        assert np.abs(ref).max() > 0.1


# --- Before/After: the rewritten graph, structurally ----------------------------------------------
def test_before_after_attention_times_v():
    """softmax → log√2 quantizer → matmul with dequantized V becomes the weights kernel on the logits (the
    softmax fused) and one attn_v call on the V codes: softmax, quantizer, dequantize and matmul are gone."""
    s_attn, bits, s_v, z_v, v_bits = 0.5, 4, 0.05, 8, 4
    mod = attention_module([((4, 9, 9), 8, s_attn, bits, s_v, z_v, v_bits, True)])
    lower = LowerLog2Attention(TARGET)
    after = lower(mod)
    assert lower.rewritten == 1

    bb = relax.BlockBuilder()
    logits = relax.Var("logits0", relax.TensorType((4, 9, 9), "float32"))
    v = relax.Var("v0", relax.TensorType((4, 9, 8), "float32"))
    f = ops.attn_frac_bits(9, v_bits)
    scale = float(np.float32(np.float64(s_attn) * np.float64(np.float32(s_v)) / 2.0 ** (f + ops.ATTN_EXTRA_BITS)))
    with bb.function("main", [logits, v]):
        with bb.dataflow():
            v_codes = bb.emit(canonical.uniform_qdq(v, s_v, z_v, v_bits).args[0])
            w = log_weights(bb, logits, s_attn, bits, True, f, ops.attn_groups(bits, f, True), TARGET, softmax=True)
            o = bb.emit(attn_v_call(bb, w, v_codes, z_v, scale, f, TARGET, {}, v_bits))
            out = bb.emit_output(relax.Tuple([o]))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get())


@pytest.mark.parametrize("case", ["per_channel_v_scale", "constant_v_codes"])
def test_before_after_unmatched_attention_is_left_alone(case):
    bb = relax.BlockBuilder()
    logits = relax.Var("logits", relax.TensorType((4, 9, 9), "float32"))
    v = relax.Var("v", relax.TensorType((4, 9, 8), "float32"))
    with bb.function("main", [logits, v]):
        with bb.dataflow():
            p = bb.emit(relax.op.nn.softmax(logits, axis=-1))
            a = bb.emit(canonical.log_fake_quant(p, (p.ty,), 0.5, 4, True))
            if case == "per_channel_v_scale":
                codes = bb.emit(canonical.uniform_qdq(v, 0.05, 8, 4).args[0])
                scale = relax.const(np.full(8, 0.05, np.float32))
            else:
                codes, scale = relax.const(np.ones((4, 9, 8), np.uint8)), relax.const(0.05, "float32")
            vh = bb.emit(relax.op.dequantize(codes, scale, relax.const(8, "uint8"), axis=-1))
            out = bb.emit_output(relax.op.matmul(a, vh, out_dtype="float32"))
        bb.emit_func_output(out)
    mod = bb.get()
    lower = LowerLog2Attention(TARGET)
    tvm.ir.assert_structural_equal(lower(mod), mod)
    assert lower.rewritten == 0


def test_int64_to_float32_through_float64_rounds_as_the_cast():
    """`attn_v.to_float32`'s AVX2 form (float64 bits of 1.5·2^52 + acc) equals the plain cast on every acc the
    kernels make (|acc| < 2^49), ties and both signs included, and runs vectorized (no scalar vcvtsi2ss)."""
    from tvm import te

    from repq_tvm.kernels.attn_v import to_float32

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.integers(-2 ** 49, 2 ** 49, 4000), (rng.integers(-2 ** 24, 2 ** 24, 2000) << 25) + (1 << 24),
                        [0, 1, -1, 2 ** 49 - 1, -2 ** 49, (1 << 24) + 1, -(1 << 24) - 1]]).astype(np.int64)
    a = te.placeholder((x.size,), "int64", name="a")
    out = te.compute((x.size,), lambda i: to_float32(a[i], True), name="out")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, out]))
    sch.vectorize(sch.split(sch.get_loops(sch.get_sblock("out"))[0], [None, 8])[1])
    lib = tvm.compile(sch.mod, target=TARGET)
    got = tvm.runtime.tensor(np.empty(x.size, np.float32))
    lib.jit()["main"](tvm.runtime.tensor(x), got)
    assert np.array_equal(got.numpy(), x.astype(np.float32))
    assert "vcvtsi2ss" not in lib.mod.inspect_source("asm")
