"""The float side: fast GELU / softmax legalization and the default schedules of the float kernels."""

import numpy as np
import torch
import tvm
from tvm import relax

from repq_tvm.frontends import canonical
from repq_tvm.kernels.qdense import host_target
from repq_tvm.passes.pipeline import fuse_and_schedule, lower_pipeline
from repq_tvm.passes.float_schedules import unscheduled

TARGET = tvm.target.Target(host_target())


def block_module(shape):
    """LayerNorm → quantize, GELU → quantize, softmax, a residual add: the float ops of a ViT block."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    gamma = relax.const(np.linspace(0.5, 2, shape[-1]).astype(np.float32))
    beta = relax.const(np.linspace(-1, 1, shape[-1]).astype(np.float32))
    with bb.function("main", [x]):
        with bb.dataflow():
            ln = bb.emit(relax.op.nn.layer_norm(x, gamma, beta, axes=[-1]))
            a = bb.emit(canonical.uniform_qdq(ln, 0.05, 7, 4))
            g = bb.emit(canonical.uniform_qdq(relax.op.nn.gelu(x), 0.03, 3, 8))
            s = bb.emit(relax.op.nn.softmax(x, axis=-1))
            out = bb.emit_output(relax.Tuple([relax.op.add(a, x), g, s]))
        bb.emit_func_output(out)
    return bb.get()


def run(mod, x, scheduled: bool):
    if scheduled:
        mod = fuse_and_schedule(mod, TARGET)
        ex = tvm.compile(mod, target=TARGET, relax_pipeline=lower_pipeline(TARGET))
    else:
        ex = tvm.compile(mod, target=TARGET)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x))
    return [t.numpy() for t in (out if isinstance(out, tvm.ir.Array) else [out])], mod


def test_every_float_kernel_gets_a_schedule_and_the_same_values():
    x = np.random.default_rng(0).standard_normal((1, 50, 96)).astype(np.float32) * 2
    (res_a, gelu_q, soft), mod = run(block_module(x.shape), x, scheduled=True)
    assert unscheduled(mod) == []
    ref_a, ref_g, ref_s = run(block_module(x.shape), x, scheduled=False)[0]
    # fast erf / exp agree to a few float32 ulps; a quantizer can still move one code step at a midpoint
    np.testing.assert_allclose(soft, ref_s, rtol=1e-5, atol=1e-7)
    for got, ref, step in ((res_a, ref_a, 0.05), (gelu_q, ref_g, 0.03)):
        diff = np.abs(got - ref)
        assert diff.max() <= step * 1.001 and (diff > 1e-6).mean() < 0.002


def test_fast_gelu_matches_pytorch():
    x = np.linspace(-8, 8, 4001, dtype=np.float32).reshape(1, 1, -1)
    bb = relax.BlockBuilder()
    v = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [v]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.gelu(v))
        bb.emit_func_output(out)
    (got,), mod = run(bb.get(), x, scheduled=True)
    ref = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
