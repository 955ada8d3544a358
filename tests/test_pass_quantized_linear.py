"""LowerQuantizedLinear on small canonical modules: integer results equal the NumPy integer reference."""

import numpy as np
import pytest
import tvm
from tvm import relax

from repq_tvm.frontends import canonical
from repq_tvm.kernels.qdense import host_target
from repq_tvm.passes.quantized_linear import LowerQuantizedLinear, qdense_call
from repq_tvm.reference import ops

TARGET = host_target()


def linear_module(x_shape, w_codes, s_w, z_w, s_a, z_a, bits, bias):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            xh = bb.emit(canonical.uniform_qdq(x, s_a, z_a, bits))
            wh = bb.emit(canonical.weight_dq(relax.const(w_codes.astype(np.uint8)), relax.const(s_w.astype(np.float32)),
                                             relax.const(z_w.astype(np.uint8))))
            y = bb.emit(relax.op.matmul(xh, relax.op.permute_dims(wh, [1, 0]), out_dtype="float32"))
            if bias is not None:
                y = bb.emit(relax.op.add(y, relax.const(bias.astype(np.float32))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def run(mod, x):
    ex = tvm.compile(mod, target=tvm.target.Target(TARGET))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def case(bits, n=24, k=40, tokens=(1, 13), seed=0, unit_scales=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*tokens, k)).astype(np.float32) * 3
    w_codes = rng.integers(0, 2 ** bits, (n, k))
    z_w = rng.integers(0, 2 ** bits, n)
    s_w = np.ones(n, np.float32) if unit_scales else rng.uniform(0.01, 0.1, n).astype(np.float32)
    s_a, z_a = (1.0, 2 ** (bits - 1)) if unit_scales else (0.05, int(rng.integers(0, 2 ** bits)))
    bias = None if unit_scales else rng.standard_normal(n).astype(np.float32)
    return x, w_codes, s_w, z_w, s_a, z_a, bias


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_integer_accumulator_is_exact(bits):
    """With unit scales and no bias the output is float(acc): it must equal the reference exactly."""
    x, w_codes, s_w, z_w, s_a, z_a, bias = case(bits, unit_scales=True)
    mod = linear_module(x.shape, w_codes, s_w, z_w, s_a, z_a, bits, bias)
    lowered = LowerQuantizedLinear(TARGET)(mod)
    assert any(gv.name_hint.startswith("repq_qdense") for gv in lowered.get_global_vars())
    q = ops.quantize(x, s_a, z_a, bits).reshape(-1, x.shape[-1])
    acc = ops.qlinear_acc(q, z_a, w_codes, z_w, bits).reshape(*x.shape[:-1], -1)
    assert np.array_equal(run(lowered, x), acc.astype(np.float32))


@pytest.mark.parametrize("bits", [4, 8])
def test_lowered_matches_fake_quant_graph(bits):
    x, w_codes, s_w, z_w, s_a, z_a, bias = case(bits, seed=1)
    mod = linear_module(x.shape, w_codes, s_w, z_w, s_a, z_a, bits, bias)
    ref = run(mod, x)  # the float fake-quant graph, legalized by TVM
    out = run(LowerQuantizedLinear(TARGET)(mod), x)
    assert np.allclose(out, ref, rtol=1e-5, atol=1e-5), np.abs(out - ref).max()
    # and the bias was fused into the kernel: no float add remains
    ops_left = {c.op.name for c in _calls(LowerQuantizedLinear(TARGET)(mod)) if isinstance(c.op, tvm.ir.Op)}
    assert "relax.add" not in ops_left and "relax.matmul" not in ops_left


def _calls(mod):
    found = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(e) if isinstance(e, relax.Call) else None)
    return found


def test_non_quantized_matmul_is_left_alone():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.matmul(x, relax.const(np.ones((8, 3), np.float32))))
        bb.emit_func_output(y)
    mod = bb.get()
    tvm.ir.assert_structural_equal(LowerQuantizedLinear(TARGET)(mod)["main"], mod["main"])


# --- Before/After: the rewritten graph, structurally ----------------------------------------------
S_A, Z_A = 0.05, 3


def _codes(bb, x, bits=4):
    """The canonical quantizer's codes clip(quantize(x)), as the rewrite leaves them (the dequantize goes)."""
    return bb.emit(canonical.uniform_qdq(x, S_A, Z_A, bits).args[0])


def _weights(n=24, k=40, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 16, (n, k)).astype(np.uint8), rng.uniform(0.01, 0.1, n).astype(np.float32),
            rng.integers(0, 16, n).astype(np.uint8), rng.standard_normal(n).astype(np.float32))


def _expected_linear(x_shape, w_codes, s_w, z_w, bias, extra_use=False):
    """What the pass must produce: the codes, one `qdense_call` (which flattens them to [M, K]), the result reshaped
    back."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    n = w_codes.shape[0]
    with bb.function("main", [x]):
        with bb.dataflow():
            q = _codes(bb, x)
            w = w_codes.astype(np.int32) - z_w.reshape(-1, 1).astype(np.int32)
            s_a = float(np.float32(S_A))  # the scale as the graph holds it
            out = qdense_call(bb, q, w, s_w, s_a, Z_A, 4, None if extra_use else bias, TARGET, {})
            out = relax.op.reshape(out, [*x_shape[:-1], n])
            if extra_use:  # the bias stays a float add on the kernel's result, which the other use reads too
                y = bb.emit(out)
                out = relax.Tuple([bb.emit(relax.op.add(y, relax.const(bias))), y])
            out = bb.emit_output(out)
        bb.emit_func_output(out)
    return bb.get()


def _before(x_shape, w_codes, s_w, z_w, bias, extra_use=False, weight=None, s_a=S_A):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    params = [x] if weight is None else [x, weight]
    with bb.function("main", params):
        with bb.dataflow():
            q = _codes(bb, x)
            xh = bb.emit(relax.op.dequantize(q, relax.const(s_a), relax.const(Z_A, "uint8"), axis=-1))
            codes = relax.const(w_codes) if weight is None else weight
            wh = bb.emit(canonical.weight_dq(codes, relax.const(s_w), relax.const(z_w)))
            y = bb.emit(relax.op.matmul(xh, relax.op.permute_dims(wh, [1, 0]), out_dtype="float32"))
            out = bb.emit(relax.op.add(y, relax.const(bias)))
            if extra_use:
                out = relax.Tuple([out, y])
            out = bb.emit_output(out)
        bb.emit_func_output(out)
    return bb.get()


def test_before_after_linear_with_bias():
    """matmul + bias add → codes reshaped, one qdense call with the bias in its epilogue, reshaped back;
    the dequantizes, the transpose, the matmul and the add are gone."""
    w_codes, s_w, z_w, bias = _weights()
    lower = LowerQuantizedLinear(TARGET)
    after = lower(_before((1, 13, 40), w_codes, s_w, z_w, bias))
    assert lower.rewritten == 1
    tvm.ir.assert_structural_equal(after, _expected_linear((1, 13, 40), w_codes, s_w, z_w, bias))


def test_before_after_bias_stays_when_the_matmul_has_another_use():
    w_codes, s_w, z_w, bias = _weights(seed=1)
    lower = LowerQuantizedLinear(TARGET)
    after = lower(_before((13, 40), w_codes, s_w, z_w, bias, extra_use=True))
    assert lower.rewritten == 1  # the kernel without its bias
    tvm.ir.assert_structural_equal(after, _expected_linear((13, 40), w_codes, s_w, z_w, bias, extra_use=True))


@pytest.mark.parametrize("case", ["weight_not_constant", "per_channel_activation_scale"])
def test_before_after_unmatched_linears_are_left_alone(case):
    w_codes, s_w, z_w, bias = _weights(seed=2)
    if case == "weight_not_constant":
        mod = _before((13, 40), w_codes, s_w, z_w, bias, weight=relax.Var("w", relax.TensorType((24, 40), "uint8")))
    else:
        mod = _before((13, 40), w_codes, s_w, z_w, bias, s_a=np.full(40, S_A, np.float32))
    lower = LowerQuantizedLinear(TARGET)
    tvm.ir.assert_structural_equal(lower(mod), mod)
    assert lower.rewritten == 0


def test_linear_outside_a_dataflow_block():
    """The rewrite's bindings land in the block being rewritten, a plain binding block too."""
    w_codes, s_w, z_w, bias = _weights(seed=3)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((13, 40), "float32"))
    with bb.function("main", [x]):
        xh = bb.emit(canonical.uniform_qdq(x, S_A, Z_A, 4))
        wh = bb.emit(canonical.weight_dq(relax.const(w_codes), relax.const(s_w), relax.const(z_w)))
        y = bb.emit(relax.op.matmul(xh, relax.op.permute_dims(wh, [1, 0]), out_dtype="float32"))
        bb.emit_func_output(bb.emit(relax.op.add(y, relax.const(bias))))
    mod = bb.get()
    lower = LowerQuantizedLinear(TARGET)
    lowered = lower(mod)
    assert lower.rewritten == 1 and not any(isinstance(b, relax.DataflowBlock) for b in lowered["main"].body.blocks)
    assert {c.op.name for c in _calls(lowered) if isinstance(c.op, tvm.ir.Op)} == {
        "relax.quantize", "relax.clip", "relax.reshape", "relax.call_tir"}
    x_np = np.random.default_rng(3).standard_normal((13, 40)).astype(np.float32)
    np.testing.assert_allclose(run(lowered, x_np), run(mod, x_np), rtol=1e-5, atol=1e-5)
