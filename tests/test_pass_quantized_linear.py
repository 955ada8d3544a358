"""LowerQuantizedLinear on small canonical modules: integer results equal the NumPy integer reference."""

import numpy as np
import pytest
import tvm
from tvm import relax

from repq_tvm.frontends import canonical
from repq_tvm.kernels.qdense import host_target
from repq_tvm.passes.quantized_linear import LowerQuantizedLinear
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
