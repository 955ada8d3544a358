"""LowerPatchEmbed: a quantized stride = kernel conv becomes the integer dense kernel on patch rows."""

import numpy as np
import pytest
import tvm
from tvm import relax

from repq_tvm.frontends import canonical
from repq_tvm.kernels.qdense import host_target
from repq_tvm.passes.patch_embed import LowerPatchEmbed
from repq_tvm.passes.quantized_linear import qdense_call
from repq_tvm.reference import ops

TARGET = host_target()


def conv_module(x_shape, w_codes, s_w, z_w, s_a, z_a, bits, bias, stride, padding=0):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            xh = bb.emit(canonical.uniform_qdq(x, s_a, z_a, bits))
            wh = bb.emit(canonical.weight_dq(relax.const(w_codes.astype(np.uint8)), relax.const(s_w.astype(np.float32)),
                                             relax.const(z_w.astype(np.uint8))))
            y = bb.emit(relax.op.nn.conv2d(xh, wh, strides=stride, padding=padding, out_dtype="float32"))
            if bias is not None:
                y = bb.emit(relax.op.add(y, relax.const(bias.reshape(1, -1, 1, 1).astype(np.float32))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def run(mod, x):
    ex = tvm.compile(mod, target=tvm.target.Target(TARGET))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def case(bits, n=20, c=3, p=4, hw=(8, 12), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, c, *hw)).astype(np.float32)
    w_codes = rng.integers(0, 2 ** bits, (n, c, p, p))
    z_w = rng.integers(0, 2 ** bits, n)
    return x, w_codes, np.ones(n, np.float32), z_w


@pytest.mark.parametrize("bits", [4, 8])
def test_patch_embedding_accumulator_is_exact(bits):
    """Unit scales, no bias: the output is float(acc) of the patch rows, equal to the reference exactly."""
    x, w_codes, s_w, z_w = case(bits)
    mod = conv_module(x.shape, w_codes, s_w, z_w, 1.0, 128, 8, None, 4)
    lowered = LowerPatchEmbed(TARGET)
    out = run(lowered(mod), x)
    assert lowered.rewritten == 1
    q = ops.quantize(x, 1.0, 128, 8)  # [B, C, H, W]
    b, c, h, w = q.shape
    rows = q.reshape(b, c, h // 4, 4, w // 4, 4).transpose(0, 2, 4, 1, 3, 5).reshape(-1, c * 16)
    acc = ops.qlinear_acc(rows, 128, w_codes.reshape(len(w_codes), -1), z_w, bits)
    expect = acc.reshape(b, h // 4, w // 4, -1).transpose(0, 3, 1, 2)
    assert np.array_equal(out, expect.astype(np.float32))


def test_matches_the_float_conv_with_scales_and_bias():
    rng = np.random.default_rng(3)
    x, w_codes, _, z_w = case(4, seed=3)
    s_w = rng.uniform(0.01, 0.1, len(w_codes)).astype(np.float32)
    bias = rng.standard_normal(len(w_codes)).astype(np.float32)
    mod = conv_module(x.shape, w_codes, s_w, z_w, 0.02, 131, 8, bias, 4)
    lowered = LowerPatchEmbed(TARGET)(mod)
    assert "relax.nn.conv2d" not in canonical.canonical_ops(lowered) and "relax.add" not in canonical.canonical_ops(lowered)
    np.testing.assert_allclose(run(lowered, x), run(mod, x), rtol=1e-5, atol=1e-5)


def test_overlapping_or_padded_convs_are_left_alone():
    x, w_codes, s_w, z_w = case(8)
    for stride, padding in ((2, 0), (4, 1)):
        lowered = LowerPatchEmbed(TARGET)
        lowered(conv_module(x.shape, w_codes, s_w, z_w, 0.02, 128, 8, None, stride, padding))
        assert lowered.rewritten == 0


# --- Before/After: the rewritten graph, structurally ----------------------------------------------
S_A, Z_A = 0.02, 131


def _before(x_shape, w_codes, s_w, z_w, bias, weight=None, s_a=S_A):
    """uint8 codes of x → dequantize → conv2d with the dequantized weight (stride = kernel) → + bias."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    p = w_codes.shape[-1]
    with bb.function("main", [x] if weight is None else [x, weight]):
        with bb.dataflow():
            q = bb.emit(canonical.uniform_qdq(x, S_A, Z_A, 8).args[0])
            xh = bb.emit(relax.op.dequantize(q, relax.const(s_a), relax.const(Z_A, "uint8"), axis=1 if np.ndim(s_a) else -1))
            codes = relax.const(w_codes.astype(np.uint8)) if weight is None else weight
            wh = bb.emit(canonical.weight_dq(codes, relax.const(s_w), relax.const(z_w.astype(np.uint8))))
            y = bb.emit(relax.op.nn.conv2d(xh, wh, strides=p, out_dtype="float32"))
            out = bb.emit_output(relax.op.add(y, relax.const(bias.reshape(1, -1, 1, 1))))
        bb.emit_func_output(out)
    return bb.get()


def test_before_after_patch_embedding():
    """conv + bias → codes rearranged into patch rows, one qdense call with the bias, result back in NCHW."""
    x, w_codes, _, z_w = case(8)
    rng = np.random.default_rng(4)
    s_w = rng.uniform(0.01, 0.1, len(w_codes)).astype(np.float32)
    bias = rng.standard_normal(len(w_codes)).astype(np.float32)
    lower = LowerPatchEmbed(TARGET)
    after = lower(_before(x.shape, w_codes, s_w, z_w, bias))
    assert lower.rewritten == 1

    bb, op = relax.BlockBuilder(), relax.op
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    (b, c, h, w), n, p = x.shape, len(w_codes), w_codes.shape[-1]
    with bb.function("main", [xv]):
        with bb.dataflow():
            q = bb.emit(canonical.uniform_qdq(xv, S_A, Z_A, 8).args[0])
            patches = op.permute_dims(op.reshape(q, [b, c, h // p, p, w // p, p]), [0, 2, 4, 1, 3, 5])
            rows = bb.emit(op.reshape(patches, [b * (h // p) * (w // p), c * p * p]))
            weight = w_codes.reshape(n, -1).astype(np.int32) - z_w.reshape(-1, 1).astype(np.int32)
            y = qdense_call(bb, rows, weight, s_w, float(np.float32(S_A)), Z_A, 8, bias, TARGET, {})
            out = bb.emit_output(op.permute_dims(op.reshape(y, [b, h // p, w // p, n]), [0, 3, 1, 2]))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get())


@pytest.mark.parametrize("case_", ["weight_not_constant", "per_channel_activation_scale"])
def test_before_after_unmatched_convs_are_left_alone(case_):
    x, w_codes, s_w, z_w = case(8)
    bias = np.zeros(len(w_codes), np.float32)
    if case_ == "weight_not_constant":
        mod = _before(x.shape, w_codes, s_w, z_w, bias, weight=relax.Var("w", relax.TensorType(w_codes.shape, "uint8")))
    else:
        mod = _before(x.shape, w_codes, s_w, z_w, bias, s_a=np.full(x.shape[1], S_A, np.float32))
    lower = LowerPatchEmbed(TARGET)
    tvm.ir.assert_structural_equal(lower(mod), mod)
    assert lower.rewritten == 0
