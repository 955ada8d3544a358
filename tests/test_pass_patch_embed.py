"""LowerPatchEmbed: a quantized stride = kernel conv becomes the integer dense kernel on patch rows."""

import numpy as np
import pytest
import tvm
from tvm import relax

from repq_tvm.frontends import canonical
from repq_tvm.kernels.qdense import host_target
from repq_tvm.passes.patch_embed import LowerPatchEmbed
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
