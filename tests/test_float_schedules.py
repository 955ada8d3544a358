"""The float side: fast GELU / softmax legalization and the default schedules of the float kernels."""

import re

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from repq_tvm.frontends import canonical
from repq_tvm.kernels.qdense import host_target
from repq_tvm.passes.pipeline import fuse_and_schedule, lower_pipeline
from repq_tvm.passes import float_schedules
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


# Error bound of the fast GELU, x·(½ + ½·E) with E = fast_erf(x·fl(1/√2)) (passes/fast_math.py), against the
# exact GELU of the same float32 inputs (PyTorch's definition, in float64). u = 2^-24, float32's unit roundoff.
# fast_erf is Eigen's rational approximation z·P(z²)/Q(z²) on z clamped to [-4, 4]: P has 7 float32
# coefficients, Q 5, both evaluated by Horner.
# - approximation: |R(z) − erf(z)| ≤ 6.9e-8 = 1.16u for every real z (exact arithmetic on the float32
#   coefficients, measured in float64 on 4M points of [0, 4]; past the clamp |R(4) − erf(z)| ≤ 6.5e-8);
# - the argument: x·fl(1/√2) is off by ≤ 2u relative, and |z·erf'(z)| ≤ 2/√(2eπ) = 0.48: ≤ 0.97u;
# - float32 evaluation: t = z² (1 rounding); Horner's 6 steps for P and 4 for Q, each a multiply and an add,
#   2 roundings, or 1 where LLVM fuses them into an FMA: ≤ 12u·cond(P) + 8u·cond(Q) with cond(P) ≤ 1.1 and
#   cond(Q) = 1 on t ∈ [0, 16] (Σ|c_i|tⁱ / |P(t)|; Q's coefficients share a sign); t's rounding moves P and Q
#   by ≤ |tP'/P|·u, |tQ'/Q|·u ≤ 3.1u each; z·P and /Q round once each: ≤ 29.4u relative, |R| ≤ 1 + 5e-8;
# so |E − erf(x/√2)| ≤ 32u, and ½ + ½E and the final multiply by x round once each (2u·|GELU|):
#     |fast_gelu(x) − GELU(x)| ≤ ½|x|·32u + 2u·|GELU(x)|.
# The bound holds for any FMA contraction and any vector width (every lane evaluates the same scalar formula;
# AMX does no float elementwise math), so it is the same on AVX2, AVX-512 and AMX machines; it assumes no
# reassociation or approximate reciprocals (TVM's CPU codegen enables no fast-math flags: the division is a
# vdivps). Measured: the worst element reaches 0.17 of it, with or without FMA. Error in E is absolute, so
# for x ≪ 0, where GELU is tiny (½ + ½E cancels), it is large relative to GELU: an rtol cannot express it.
GELU_ERF_ERROR = 32 * 2.0 ** -24


def test_fast_gelu_matches_pytorch():
    x = np.linspace(-8, 8, 4001, dtype=np.float32).reshape(1, 1, -1)
    bb = relax.BlockBuilder()
    v = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [v]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.gelu(v))
        bb.emit_func_output(out)
    (got,), mod = run(bb.get(), x, scheduled=True)
    ref = torch.nn.functional.gelu(torch.from_numpy(x).double()).numpy()  # exact to float64 rounding
    bound = 0.5 * np.abs(x) * GELU_ERF_ERROR + 2 * 2.0 ** -24 * np.abs(ref)
    ratio = np.abs(got.astype(np.float64) - ref) / np.maximum(bound, 1e-30)  # x = 0: both exactly 0
    assert ratio.max() <= 1, f"error {ratio.max():.2f}x the bound at x = {x.ravel()[ratio.argmax()]}"


def test_layer_norm_sums_are_vector_partials_and_match_numpy():
    """Both row sums (the mean's and the variance's) run as vectors of partial sums (rfactor); the LayerNorm
    still matches a float64 NumPy one to float32 rounding."""
    target = host_target()
    for channels in (96, 384, 768):
        rng = np.random.default_rng(channels)
        gamma, beta = rng.standard_normal(channels).astype(np.float32), rng.standard_normal(channels).astype(np.float32)
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((1, 49, channels), "float32"))
        with bb.function("main", [x]):
            with bb.dataflow():
                out = bb.emit_output(bb.emit(relax.op.nn.layer_norm(x, relax.const(gamma), relax.const(beta), axes=[-1])))
            bb.emit_func_output(out)
        mod = fuse_and_schedule(bb.get(), target)
        source = "\n".join(f.script() for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
        assert "x_sum_rf" in source and "x_var_sum_rf" in source and "T.vectorized" in source
        data = (rng.standard_normal((1, 49, channels)) * 3 + 1).astype(np.float32)
        ex = tvm.compile(mod, target=target, relax_pipeline=lower_pipeline(target))
        got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(data)).numpy()
        x64 = data.astype(np.float64)
        ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5) * gamma + beta
        assert np.abs(got - ref).max() < 1e-5 * (1 + np.abs(ref).max())


@pytest.mark.parametrize("shape", [(1, 197, 384), (2, 50, 96), (1, 7, 64)])
def test_layer_norm_rows_interleaved_give_the_same_codes(monkeypatch, shape):
    """`float_schedules.row_stages` runs 4 rows per task with their sums interleaved: the same sums in the same
    order per row as one row per task, so the same codes bit for bit (rows past a ragged end are not stored; a
    task never spans two images; 7 rows are too few to split and keep one row per task)."""
    rng = np.random.default_rng(len(shape))
    gamma, beta = rng.standard_normal(shape[-1]).astype(np.float32), rng.standard_normal(shape[-1]).astype(np.float32)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            ln = bb.emit(relax.op.nn.layer_norm(x, relax.const(gamma), relax.const(beta), axes=[-1]))
            out = bb.emit_output(bb.emit(canonical.uniform_qdq(ln, 0.02, 128, 8)))
        bb.emit_func_output(out)
    data = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    outs, sources = [], []
    for rows in (1, float_schedules.ROWS):
        monkeypatch.setattr(float_schedules, "ROWS", rows)
        (got,), mod = run(bb.get(), data, scheduled=True)
        outs.append(got)
        sources.append("\n".join(f.script() for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)))
    np.testing.assert_array_equal(outs[0], outs[1])
    interleaved = f"T.unroll(T.int64({float_schedules.ROWS}))"
    assert interleaved not in sources[0]
    assert (interleaved in sources[1]) == (shape[-2] >= 2 * float_schedules.ROWS)


def transpose_module(perm, shape=(80, 3, 32)):
    """x → permute_dims(perm) → quantize: an elementwise kernel that reads in one layout and writes another."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            t = bb.emit(relax.op.permute_dims(x, perm))
            out = bb.emit_output(relax.op.quantize(t, relax.const(0.05, "float32"), relax.const(128, "uint8"), axis=-1,
                                                   out_dtype="uint8"))
        bb.emit_func_output(out)
    return bb.get()


def _loop_vars(mod) -> tuple[list[str], str]:
    """The loop variables of the one float kernel of ``mod``, outermost first, and its TVMScript."""
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    text = func.script()
    return re.findall(r"for (\w+) in T\.", text), text


def test_transposing_kernels_run_in_the_order_they_read():
    """[T, H, D] → [H, T, D] (the q/k/v head transpose): the loops go tokens, heads, then the contiguous D (kept
    innermost and vectorized), so a thread reads whole rows, the rows its own core wrote when the producer splits
    its rows the same way; the values are the unscheduled module's."""
    x = np.random.default_rng(1).standard_normal((80, 3, 32)).astype(np.float32) * 4
    (got,), mod = run(transpose_module([1, 0, 2]), x, scheduled=True)
    (ref,), _ = run(transpose_module([1, 0, 2]), x, scheduled=False)
    np.testing.assert_array_equal(got, ref)
    names, text = _loop_vars(mod)
    # one parallel loop over (tokens, heads, D / lanes) fused in that order, then the vector of D
    assert len(names) == 2 and "T.parallel" in text and "T.vectorized" in text, text
    assert names[0].startswith("ax1_ax0_ax2"), names  # ax0 = heads, ax1 = tokens of the [H, T, D] output
    # a transpose that moves the contiguous axis keeps the output's order (the vector loop stays innermost)
    (got,), mod = run(transpose_module([2, 1, 0]), x, scheduled=True)
    np.testing.assert_array_equal(got, run(transpose_module([2, 1, 0]), x, scheduled=False)[0][0])
    names, _ = _loop_vars(mod)
    assert names[0].startswith("ax0_ax1"), names
