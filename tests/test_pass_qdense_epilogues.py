"""qdense epilogue tails (GELU → codes, residual add): the same values as the unfused ops, kernel by kernel and pass-wise."""

import numpy as np
import pytest
import tvm
from tvm import relax, te

from repq_tvm import targets
from repq_tvm.frontends import canonical
from repq_tvm.kernels import epilogue
from repq_tvm.kernels import qdense as Q
from repq_tvm.passes.fast_math import gelu
from repq_tvm.passes.gelu_codes_epilogue import FuseGeluCodesEpilogue
from repq_tvm.passes.quantized_linear import LowerQuantizedLinear
from repq_tvm.relax_util import scheduled_kernel
from repq_tvm.testing.qdense import build_qdense
from test_pass_quantized_linear import case, run

HOST = Q.host_target(1)
FLAGS = targets.host_flags()


def _compile_te(fn, n: int, out_dtype: str):
    x = te.placeholder((n,), "float32", name="x")
    return tvm.compile(te.create_prim_func([x, fn(x)]), target=HOST), out_dtype


def _apply(compiled, values: np.ndarray) -> np.ndarray:
    fn, dtype = compiled
    out = tvm.runtime.tensor(np.zeros(values.size, dtype))
    fn(tvm.runtime.tensor(values.astype(np.float32).ravel()), out)
    return out.numpy()


def test_scalar_gelu_and_codes_are_the_unfused_ops_bit_for_bit():
    """`epilogue.gelu` is `fast_math.gelu` (topi's erf) and `epilogue.codes` TVM's quantize legalization + clip."""
    v = np.concatenate([np.random.default_rng(0).normal(0, 3, 1 << 15), [0, -0.0, 4.5, -4.5, 1e-30, 60, -60]])
    n = v.size
    scalar = _compile_te(lambda x: te.compute((n,), lambda i: epilogue.gelu(x[i])), n, "float32")
    tensor = _compile_te(gelu, n, "float32")
    assert np.array_equal(_apply(scalar, v).view(np.int32), _apply(tensor, v).view(np.int32))
    s, z = np.float32(0.0123), 19
    for top in (255, 15):
        codes = _compile_te(lambda x: te.compute((n,), lambda i: epilogue.codes(epilogue.gelu(x[i]), float(s), z, top)),
                            n, "uint8")
        g = _apply(tensor, v)
        expected = np.clip(np.clip(np.round(g / s) + np.float32(z), 0, 255), 0, top).astype(np.uint8)
        assert np.array_equal(_apply(codes, v), expected)


def test_scalar_fast_exp_is_topi_fast_exp_bit_for_bit():
    """`epilogue.fast_exp` (the fused softmax's exp, `kernels.log_weights`) is `topi.fast_exp` bit for bit."""
    from tvm import topi

    v = np.concatenate([np.random.default_rng(0).normal(0, 30, 1 << 14), [0, -0.0, 88.5, -88.5, -1e30, 1e-30]])
    n = v.size
    scalar = _compile_te(lambda x: te.compute((n,), lambda i: epilogue.fast_exp(x[i])), n, "float32")
    tensor = _compile_te(topi.math.fast_exp, n, "float32")
    assert np.array_equal(_apply(scalar, v).view(np.int32), _apply(tensor, v).view(np.int32))


def test_fast_exp_of_nonpositive_x_is_fast_exp_bit_for_bit():
    """`epilogue.fast_exp_nonpositive` (the fused softmaxes' exp of x − max) is `epilogue.fast_exp` on every x ≤ 0:
    one float32 in 2^10 of all the negative ones, both zeros, −inf and the ends of the clamp."""
    patterns = np.arange(0x80000000, 0xFF800001, 1 << 10, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0, -0.0, -np.inf, -88.3762626647949, -88.37626, -88.37627, -87.0, -1e-45, -1e-38], np.float32)
    v = np.concatenate([patterns.view(np.float32), edges])
    assert np.all(v <= 0) and v.size > 2_000_000
    n = v.size
    short = _compile_te(lambda x: te.compute((n,), lambda i: epilogue.fast_exp_nonpositive(x[i])), n, "float32")
    full = _compile_te(lambda x: te.compute((n,), lambda i: epilogue.fast_exp(x[i])), n, "float32")
    got, expected = _apply(short, v), _apply(full, v)
    assert np.array_equal(got.view(np.int32), expected.view(np.int32))
    assert got.min() == 0 and got.max() == 1  # the whole range: underflow to 0 up to exp(0)


def _kernels():
    out = [("vnni", True), ("amx", True)]  # portable stand-ins: any CPU
    if "avx2" in FLAGS:
        out.append(("avx2_i16", False))
    if "avx512_vnni" in FLAGS:
        out.append(("vnni", False))
    if {"amx_tile", "amx_int8"} <= FLAGS:
        out.append(("amx", False))
    return out


@pytest.mark.parametrize("variant,ref", _kernels(), ids=lambda p: str(p))
def test_fused_kernel_stores_the_codes_of_the_unfused_output(variant, ref):
    M, N, K, codes = 65, 96, 128, (0.0173, 23, 255)
    target = targets.tvm_target("x86_64-amx", 1) if variant == "amx" and not ref else HOST
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (M, K), dtype=np.uint8)
    w = (rng.integers(0, 256, (N, K)) - rng.integers(0, 256, (N, 1))).astype(np.int16)
    w_scale = rng.uniform(1e-4, 1e-3, N).astype(np.float32)
    bias = rng.normal(0, 1, N).astype(np.float32)
    outs = []
    for fused in (None, codes):
        kernel = build_qdense(M, N, K, target, variant=variant, epilogue=True, ref=ref, gelu_codes=fused)
        params = kernel.epilogue_params(w, w_scale, 0.02, 120, bias)
        outs.append(kernel(kernel.prepare_activation(a, 120), *kernel.weight_args(w), *params))
    assert outs[1].dtype == np.uint8 and len(np.unique(outs[1])) > 20
    tail = _compile_te(lambda x: te.compute((M * N,), lambda i: epilogue.codes(epilogue.gelu(x[i]), *codes)), M * N,
                       "uint8")
    np.testing.assert_array_equal(outs[1].ravel(), _apply(tail, outs[0]))


@pytest.mark.parametrize("variant,ref", [k for k in _kernels() if k[0] != "amx"], ids=lambda p: str(p))
@pytest.mark.parametrize("operand", [("int16", 23), ("int16", "z"), ("int8", 128), ("int8", 0)],
                         ids=lambda p: f"{p[0]}-{p[1]}")
def test_fused_kernel_stores_the_codes_as_the_next_kernels_operand(variant, ref, operand):
    """``codes_operand``: the codes as fc2 reads them (AVX2 int16 ``q − z``, sdot's int8 ``q − 128`` or ``q``), the
    uint8 kernel's codes cast as `quantized_linear`'s ops cast them ("z": minus the run-time quantizer's zero point)."""
    M, N, K, codes = 37, 48, 64, (0.0173, 23, 255 if operand != ("int8", 0) else 127)
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (M, K), dtype=np.uint8)
    w = (rng.integers(0, 256, (N, K)) - rng.integers(0, 256, (N, 1))).astype(np.int16)
    outs = []
    for form in (None, operand):
        kernel = build_qdense(M, N, K, HOST, variant=variant, epilogue=True, ref=ref, gelu_codes=codes,
                              codes_operand=form)
        params = kernel.epilogue_params(w, np.full(N, 5e-4, np.float32), 0.02, 120, np.zeros(N, np.float32))
        outs.append(kernel(kernel.prepare_activation(a, 120), *kernel.weight_args(w), *params))
    dtype, minus = operand[0], codes[1] if operand[1] == "z" else operand[1]
    assert outs[1].dtype == np.dtype(dtype) and len(np.unique(outs[0])) > 20
    np.testing.assert_array_equal(outs[1], (outs[0].astype(np.int16) - minus).astype(dtype))


def test_codes_operand_needs_the_codes_and_a_kernel_operand_type():
    # explicit variants: the host's "auto" is amx on a Sapphire Rapids, which takes no codes_operand at all
    with pytest.raises(ValueError, match="codes_operand is the form of the gelu_codes: it needs gelu_codes"):
        Q.schedule_qdense(65, 96, 128, HOST, variant="vnni", epilogue=True, codes_operand=("int16", 3))
    with pytest.raises(ValueError, match="codes_operand stores int16 or int8 codes, not float32"):
        Q.schedule_qdense(65, 96, 128, HOST, variant="vnni", epilogue=True, gelu_codes=255,
                          codes_operand=("float32", 3))
    with pytest.raises(ValueError, match="the amx qdense stores uint8 codes only .*: no codes_operand"):
        Q.schedule_qdense(64, 96, 128, targets.tvm_target("x86_64-amx", 1), variant="amx", epilogue=True,
                          gelu_codes=255, codes_operand=("int16", 3))


def test_gelu_codes_of_a_kernel_is_its_top_code():
    """The quantizer is an operand of the kernel, not part of it: a (scale, zero point, top) tuple is refused."""
    with pytest.raises(TypeError, match=r"gelu_codes is the top code 2\^b - 1 \(the quantizer is the kernel's quant "
                                        r"operand\), got \(0.1, 3, 255\)"):
        Q.schedule_qdense(65, 96, 128, HOST, epilogue=True, gelu_codes=(0.1, 3, 255))


@pytest.mark.parametrize("variant,ref", [("vnni", True), ("amx", True)] + [("avx2_i16", False)] * ("avx2" in FLAGS),
                         ids=lambda p: str(p))
def test_one_kernel_stores_the_codes_of_any_quantizer_it_is_given(variant, ref):
    """The run-time quantizer operand (`epilogue.quantizer_args`): one compiled kernel, called with three
    quantizers, stores for each the codes of GELU under the constant quantizer (`epilogue.codes`) bit for bit."""
    M, N, K = 40, 64, 128
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (M, K), dtype=np.uint8)
    w = (rng.integers(0, 256, (N, K)) - rng.integers(0, 256, (N, 1))).astype(np.int16)
    plain = build_qdense(M, N, K, HOST, variant=variant, epilogue=True, ref=ref)
    kernel = build_qdense(M, N, K, HOST, variant=variant, epilogue=True, ref=ref, gelu_codes=(0.0173, 23, 255))
    operands = lambda k: (k.prepare_activation(a, 120), *k.weight_args(w),  # noqa: E731
                          *k.epilogue_params(w, np.full(N, 4e-4, np.float32), 0.02, 120, np.zeros(N, np.float32)))
    y = plain(*operands(plain))
    for codes in [(0.0173, 23, 255), (0.0411, 0, 255), (0.29, 3, 15)]:
        kernel.gelu_codes = codes  # what the harness passes as the kernel's quant operand
        got = kernel(*operands(kernel))
        tail = _compile_te(lambda x: te.compute((M * N,), lambda i: epilogue.codes(epilogue.gelu(x[i]), *codes)),
                           M * N, "uint8")
        assert len(np.unique(got)) > 8
        np.testing.assert_array_equal(got.ravel(), _apply(tail, y))


def linear_then(bits: int, tail):
    """x → codes → linear (+ bias) → ``tail(bb, x, y)``, the module's output; returns (module, x's values)."""
    x, w_codes, s_w, z_w, s_a, z_a, bias = case(bits, n=64, k=64, tokens=(1, 40))
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            xh = bb.emit(canonical.uniform_qdq(xv, s_a, z_a, bits))
            wh = bb.emit(canonical.weight_dq(relax.const(w_codes.astype(np.uint8)), relax.const(s_w),
                                             relax.const(z_w.astype(np.uint8))))
            y = bb.emit(relax.op.matmul(xh, relax.op.permute_dims(wh, [1, 0]), out_dtype="float32"))
            y = bb.emit(relax.op.add(y, relax.const(bias)))
            out = bb.emit_output(tail(bb, xv, y))
        bb.emit_func_output(out)
    return bb.get(), x


def gelu_module(bits: int, double_use: bool = False):
    """x → codes → linear → GELU → the next layer's quantizer (dequantized: the module's float output)."""

    def tail(bb, _x, y):
        g = bb.emit(relax.op.nn.gelu(y))
        out = bb.emit(canonical.uniform_qdq(g, 0.021, 17, bits))
        return bb.emit(relax.op.add(out, g)) if double_use else out

    return linear_then(bits, tail)


def _ops(mod) -> list[str]:
    return [b.value.op.name for b in mod["main"].body.blocks[0].bindings if isinstance(b.value, relax.Call)]


@pytest.mark.parametrize("bits", [4, 8])
def test_pass_before_after(bits):
    mod, x = gelu_module(bits)
    before = LowerQuantizedLinear(HOST)(mod)
    fuse = FuseGeluCodesEpilogue(HOST)
    after = fuse(before)
    assert fuse.rewritten == 1
    assert "relax.nn.gelu" in _ops(before) and "relax.nn.gelu" not in _ops(after)
    assert "relax.quantize" not in _ops(after)[-3:]  # the GELU's quantizer went into the kernel
    (gv,) = [gv for gv in after.get_global_vars() if gv.name_hint.endswith("_gelu0")]
    old = next(gv for gv in before.get_global_vars() if gv.name_hint.startswith("repq_qdense"))
    spec = __import__("json").loads(str(before[old].attrs["repq.kernel"]))
    sch, _, _, _ = Q.schedule_qdense(spec["M"], spec["N"], spec["K"], HOST, bits_a=bits, bits_w=spec["bits_w"],
                                     variant=spec["variant"], epilogue=True, compensate=spec["compensate"],
                                     gelu_codes=2 ** bits - 1)
    tvm.ir.assert_structural_equal(after[gv], scheduled_kernel(sch, gv.name_hint))
    (call,) = _calls_of(after, gv)  # the quantizer: the call's last operand
    np.testing.assert_array_equal(call.args[1].fields[-1].value.numpy(), epilogue.quantizer_args(0.021, 17))
    assert old not in after.get_global_vars()  # the float-output kernel is gone
    np.testing.assert_array_equal(run(after, x), run(before, x))


def _calls_of(mod, gv) -> list:
    return [b.value for b in mod["main"].body.blocks[0].bindings
            if isinstance(b.value, relax.Call) and b.value.args and b.value.args[0].same_as(gv)]


def test_blocks_that_differ_in_their_quantizer_share_one_kernel():
    """Two fc1 → GELU → codes with the same shapes and other quantizers (two blocks of a ViT): one fused kernel,
    called with each block's quantizer; the same output as the unfused module."""

    def tail(bb, x, y):
        _, w2, s_w2, z_w2, s_a, z_a, b2 = case(8, n=64, k=64, seed=9)  # a second linear of fc1's shape
        xh = bb.emit(canonical.uniform_qdq(x, s_a, z_a, 8))
        wh = bb.emit(canonical.weight_dq(relax.const(w2.astype(np.uint8)), relax.const(s_w2),
                                         relax.const(z_w2.astype(np.uint8))))
        y2 = bb.emit(relax.op.add(bb.emit(relax.op.matmul(xh, relax.op.permute_dims(wh, [1, 0]), out_dtype="float32")),
                                  relax.const(b2)))
        first = bb.emit(canonical.uniform_qdq(bb.emit(relax.op.nn.gelu(y)), 0.021, 17, 8))
        second = bb.emit(canonical.uniform_qdq(bb.emit(relax.op.nn.gelu(y2)), 0.034, 9, 8))
        return bb.emit(relax.op.add(first, second))

    mod, x = linear_then(8, tail)
    before = LowerQuantizedLinear(HOST)(mod)
    fuse = FuseGeluCodesEpilogue(HOST)
    after = fuse(before)
    assert fuse.rewritten == 2
    (gv,) = [gv for gv in after.get_global_vars() if "_gelu" in gv.name_hint]
    quants = [c.args[1].fields[-1].value.numpy() for c in _calls_of(after, gv)]
    np.testing.assert_array_equal(np.stack(quants), np.stack([epilogue.quantizer_args(0.021, 17),
                                                              epilogue.quantizer_args(0.034, 9)]))
    np.testing.assert_array_equal(run(after, x), run(before, x))


def test_pass_leaves_a_gelu_with_another_reader():
    mod, _ = gelu_module(8, double_use=True)
    before = LowerQuantizedLinear(HOST)(mod)
    fuse = FuseGeluCodesEpilogue(HOST)
    after = fuse(before)
    assert fuse.rewritten == 0
    tvm.ir.assert_structural_equal(after, before)


def mlp_module(bits: int):
    """x → codes → fc1 → GELU → fc2's codes → fc2 (+ bias): a ViT MLP."""
    _, w2, s_w2, z_w2, _, _, b2 = case(bits, n=48, k=64, seed=5)

    def tail(bb, _x, y):
        g = bb.emit(relax.op.nn.gelu(y))
        gq = bb.emit(canonical.uniform_qdq(g, 0.021, 17, bits))
        wh = bb.emit(canonical.weight_dq(relax.const(w2.astype(np.uint8)), relax.const(s_w2),
                                         relax.const(z_w2.astype(np.uint8))))
        out = bb.emit(relax.op.matmul(gq, relax.op.permute_dims(wh, [1, 0]), out_dtype="float32"))
        return bb.emit(relax.op.add(out, relax.const(b2)))

    return linear_then(bits, tail)


@pytest.mark.parametrize("bits,preset,operand", [(8, "x86_64-avx2", ("int16", 17)),
                                                 (8, "aarch64-neon-dotprod", ("int8", 128)),
                                                 (4, "aarch64-neon-dotprod", ("int8", 0))])
def test_pass_stores_fc2s_operand(bits, preset, operand):
    """Where fc2 reads int16 (AVX2, 8-bit codes) or int8 (sdot) activations, fc1 stores them: the casts after the
    codes go with the GELU and the quantizer; the same logits (run where the target runs: AVX2 on every x86 CPU
    here; the aarch64 module is checked for its structure)."""
    target = targets.tvm_target(preset, 1)
    mod, x = mlp_module(bits)
    before = LowerQuantizedLinear(target)(mod)
    fuse = FuseGeluCodesEpilogue(target)
    after = fuse(before)
    assert fuse.rewritten == 1
    casts = ("relax.astype", "relax.subtract")
    assert sum(op in casts for op in _ops(after)) * 2 == sum(op in casts for op in _ops(before)) > 0  # fc1's input's
    (gv,) = [gv for gv in after.get_global_vars() if gv.name_hint.endswith("_gelu0")]
    spec = __import__("json").loads(str(after[gv].attrs["repq.kernel"]))
    operand = ("int16", "z") if operand == ("int16", 17) else operand  # centred codes: the run-time zero point
    assert spec["codes_operand"] == list(operand) and spec["gelu_codes"] == {"top": 2 ** bits - 1}
    sch, _, _, _ = Q.schedule_qdense(spec["M"], spec["N"], spec["K"], target, bits_a=bits, bits_w=spec["bits_w"],
                                     variant=spec["variant"], epilogue=True, compensate=spec["compensate"],
                                     gelu_codes=2 ** bits - 1, codes_operand=operand)
    tvm.ir.assert_structural_equal(after[gv], scheduled_kernel(sch, gv.name_hint))
    if preset.startswith("x86"):
        def run_on(m):
            vm = relax.VirtualMachine(tvm.compile(m, target=target), tvm.cpu())
            return vm["main"](tvm.runtime.tensor(x)).numpy()

        np.testing.assert_array_equal(run_on(after), run_on(before))


# --- the residual add (`passes.residual_epilogue`) ------------------------------------------------------
@pytest.mark.parametrize("variant,ref", _kernels(), ids=lambda p: str(p))
def test_residual_kernel_adds_the_input_to_the_unfused_output(variant, ref):
    M, N, K = 65, 96, 128
    target = targets.tvm_target("x86_64-amx", 1) if variant == "amx" and not ref else HOST
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (M, K), dtype=np.uint8)
    w = (rng.integers(0, 256, (N, K)) - rng.integers(0, 256, (N, 1))).astype(np.int16)
    res = rng.normal(0, 3, (M, N)).astype(np.float32)
    outs = []
    for residual in (False, True):
        kernel = build_qdense(M, N, K, target, variant=variant, epilogue=True, ref=ref, residual=residual)
        params = kernel.epilogue_params(w, np.full(N, 5e-4, np.float32), 0.02, 120,
                                        np.linspace(-1, 1, N, dtype=np.float32))
        outs.append(kernel(kernel.prepare_activation(a, 120), *kernel.weight_args(w), *params,
                           *([res] if residual else [])))
    np.testing.assert_array_equal(outs[1], res + outs[0])


def residual_module(bits: int, swapped: bool = False):
    """x → codes → linear (+ bias) → x + linear (a residual connection) → output."""
    return linear_then(bits, lambda bb, x, y: bb.emit(relax.op.add(y, x) if swapped else relax.op.add(x, y)))


@pytest.mark.parametrize("swapped", [False, True])
def test_residual_pass_before_after(swapped):
    from repq_tvm.passes.residual_epilogue import FuseResidualEpilogue

    mod, x = residual_module(8, swapped)
    before = LowerQuantizedLinear(HOST)(mod)
    fuse = FuseResidualEpilogue(HOST)
    after = fuse(before)
    assert fuse.rewritten == 1 and "relax.add" not in _ops(after) and "relax.add" in _ops(before)
    (gv,) = [gv for gv in after.get_global_vars() if gv.name_hint.endswith("_res0")]
    old = next(gv for gv in before.get_global_vars() if gv.name_hint.startswith("repq_qdense"))
    spec = __import__("json").loads(str(before[old].attrs["repq.kernel"]))
    sch, _, _, _ = Q.schedule_qdense(spec["M"], spec["N"], spec["K"], HOST, bits_a=8, bits_w=spec["bits_w"],
                                     variant=spec["variant"], epilogue=True, compensate=spec["compensate"],
                                     residual=True)
    tvm.ir.assert_structural_equal(after[gv], scheduled_kernel(sch, gv.name_hint))
    assert old not in after.get_global_vars()
    np.testing.assert_array_equal(run(after, x), run(before, x))


def test_one_tail_per_kernel():
    with pytest.raises(ValueError, match="one tail per kernel: gelu_codes, residual, qkv_codes or column_codes"):
        Q.schedule_qdense(65, 96, 128, HOST, epilogue=True, residual=True, gelu_codes=255)
    with pytest.raises(ValueError, match="gelu_codes, residual, qkv_codes and column_codes need the float epilogue"):
        Q.schedule_qdense(65, 96, 128, HOST, residual=True)
    with pytest.raises(ValueError, match="gelu_codes, residual, qkv_codes and column_codes need the float epilogue"):
        Q.schedule_qdense(65, 96, 128, HOST, column_codes=255)
    with pytest.raises(ValueError, match=r"stores a qkv projection's codes in head layout \(qkv_codes\), no column_codes"):
        Q.schedule_qdense(64, 192, 128, targets.tvm_target("x86_64-amx"), epilogue=True, variant="amx",
                          column_codes=255)
    with pytest.raises(TypeError, match=r"qkv_codes is \{'tokens', 'heads', 'tops'\} \(the quantizers are the kernel's "
                                        r"quant operand\), got keys \['codes', 'heads', 'tokens'\]"):
        Q.schedule_qdense(64, 192, 128, targets.tvm_target("x86_64-amx"), epilogue=True, variant="amx",
                          qkv_codes={"tokens": 32, "heads": 2, "codes": [(0.1, 128, 255)] * 3})


# --- the q/k/v codes (`passes.qkv_codes_epilogue`, AMX kernels) ------------------------------------------
def test_qkv_pass_on_the_vit_fixture(vit_host_build, tmp_path, monkeypatch):
    """Built for x86_64-amx (on any CPU) with and without the pass: every block's qkv stores its q/k/v codes
    (no split or quantize kernels left); on an AMX CPU the logits are the same bit for bit."""
    import json
    import subprocess

    from repq_tvm import api
    from repq_tvm.passes import pipeline

    cal = vit_host_build[0]
    api.compile_artifact(cal, str(tmp_path / "fused"), target="x86_64-amx", progress=False)
    stats = json.load(open(tmp_path / "fused" / "manifest.json"))["compile"]
    assert stats["fused_qkv_codes"] == 6  # one per block
    symbols = subprocess.run(["nm", "-D", str(tmp_path / "fused" / "model.so")], capture_output=True, text=True,
                             check=True).stdout
    # one kernel for the six blocks (their quantizers are its operand), no split left
    assert symbols.count("_qkv0") >= 1 and "_qkv1" not in symbols and "strided_slice" not in symbols
    monkeypatch.setattr(pipeline, "INTEGER_PASSES", [p for p in pipeline.INTEGER_PASSES if p[0] != "qkv-codes-epilogue"])
    api.compile_artifact(cal, str(tmp_path / "plain"), target="x86_64-amx", progress=False)
    plain_symbols = subprocess.run(["nm", "-D", str(tmp_path / "plain" / "model.so")], capture_output=True,
                                   text=True, check=True).stdout
    assert "strided_slice" in plain_symbols
    if {"amx_tile", "amx_int8"} <= FLAGS:
        from repq_tvm.deploy.runtime import Runner

        fused, plain = Runner(str(tmp_path / "fused")), Runner(str(tmp_path / "plain"))
        x = np.random.default_rng(0).standard_normal((4, *fused.input_shape[1:])).astype(np.float32)
        np.testing.assert_array_equal(np.concatenate([fused(x[i:i + 1]) for i in range(4)]),
                                      np.concatenate([plain(x[i:i + 1]) for i in range(4)]))


def _before_amx_qkv(batch: int, squeeze_axis=(0,), clip_top: int | None = 15) -> tvm.IRModule:
    """An AMX qkv projection (`quantized_linear.qdense_call`) whose output is split into heads and quantized
    three times, as the model has it; ``squeeze_axis`` the split's squeeze, ``clip_top`` k's clip (4-bit codes)."""
    from repq_tvm.passes.quantized_linear import qdense_call

    amx = targets.tvm_target("x86_64-amx")
    T, H, D, K = 33, 2, 32, 64  # the AMX kernel takes M = B·T ≥ 32 rows
    rng = np.random.default_rng(3)
    w = rng.integers(-100, 100, (3 * H * D, K)).astype(np.int64)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch, T, K), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = qdense_call(bb, x, w, np.full(3 * H * D, 1e-3, np.float32), 0.02, 9, 8, None, amx, {})
            p = bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(bb.emit(relax.op.reshape(
                y, [batch, T, 3 * H * D])), [batch, T, 3, H, D])), [2, 0, 3, 1, 4]))
            codes = []
            for i, (s, z) in enumerate([(0.03, 3), (0.02, 1), (0.05, 7)]):
                third = bb.emit(relax.op.squeeze(bb.emit(relax.op.strided_slice(p, [0], [i], [i + 1])),
                                                 list(squeeze_axis) if squeeze_axis is not None else None))
                c = bb.emit(relax.op.quantize(third, relax.const(s, "float32"), relax.const(z, "int8"), -1, "uint8"))
                codes.append(bb.emit(relax.op.clip(c, 0, clip_top)) if i == 1 and clip_top is not None else c)
            out = bb.emit_output(relax.Tuple(codes))
        bb.emit_func_output(out)
    return bb.get()


def test_qkv_pass_stores_the_three_codes_of_one_amx_projection():
    """One kernel call with three [B, H, T, D] outputs bound to the codes' variables: no split, squeeze or
    quantize left, the codes' tops (k's clip to 4 bits included) in the kernel's spec, the quantizers its call's
    ``quant`` operand."""
    import json

    from repq_tvm.passes.qkv_codes_epilogue import FuseQKVCodesEpilogue

    fuse = FuseQKVCodesEpilogue(targets.tvm_target("x86_64-amx"))
    out = fuse(_before_amx_qkv(2))
    assert fuse.rewritten == 1
    ops = [str(b.value.op.name) for b in out["main"].body.blocks[0].bindings if isinstance(b.value, relax.Call)]
    assert not {"relax.strided_slice", "relax.squeeze", "relax.quantize", "relax.clip"} & set(ops)
    (kernel,) = [f for _, f in out.functions_items() if isinstance(f, tvm.tirx.PrimFunc)
                 and json.loads(str(f.attrs["repq.kernel"])).get("qkv_codes")]
    qkv = json.loads(str(kernel.attrs["repq.kernel"]))["qkv_codes"]
    assert qkv == {"tokens": 33, "heads": 2, "tops": [255, 15, 255]}
    bound = {b.var: b.value for b in out["main"].body.blocks[0].bindings}
    (call,) = [v for v in bound.values() if isinstance(v, relax.Call) and isinstance(v.args[0], tvm.ir.GlobalVar)
               and "_qkv" in v.args[0].name_hint]
    np.testing.assert_array_equal(call.args[1].fields[-1].value.numpy(),
                                  [epilogue.quantizer_args(s, z) for s, z in [(0.03, 3), (0.02, 1), (0.05, 7)]])
    items = [bound[x] for x in bound[out["main"].body.body].fields]  # q, k, v: the kernel's outputs 0, 1, 2
    assert [i.index for i in items] == [0, 1, 2] and all(i.tuple_value.same_as(items[0].tuple_value) for i in items)
    assert [int(d) for d in items[0].tuple_value.ty.fields[0].shape] == [2, 2, 33, 32]


def test_qkv_pass_leaves_a_squeeze_of_other_axes_alone():
    """At batch 1 a squeeze of every unit axis also drops the batch: its codes are [H, T, D], not the kernel's
    [B, H, T, D], so the split stays."""
    from repq_tvm.passes.qkv_codes_epilogue import FuseQKVCodesEpilogue

    before = _before_amx_qkv(1, squeeze_axis=None)
    fuse = FuseQKVCodesEpilogue(targets.tvm_target("x86_64-amx"))
    tvm.ir.assert_structural_equal(fuse(before), before)
    assert fuse.rewritten == 0
