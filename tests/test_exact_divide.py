"""Division by a constant quantizer scale without the divider (`kernels.epilogue.divide`, the quantize
legalization of `passes.fast_math`): bit for bit IEEE float32 division, checked against numpy's on values spread
over the quantizers' range and on quotients next to every rounding midpoint."""

import numpy as np
import pytest
import tvm
from tvm import relax, te
from tvm.script import relax as R

from repq_tvm import targets
from repq_tvm.kernels import epilogue
from repq_tvm.passes.fast_math import legalize_passes

HOST = targets.tvm_target("host", 1)
SCALES = [0.0173, 0.1, 3.0, 1e-3, 0.0457, 7.77e-5, 0.333333, 0.5, 2.0 ** -7, 0.011764706]


def _values(scale: float, n: int, seed: int) -> np.ndarray:
    """Quotients of a few units to a few hundred, half of them within a few ulps of k + 1/2 (where a wrong last
    bit would change the rounded code)."""
    rng = np.random.default_rng(seed)
    spread = rng.standard_normal(n // 2) * 80 * scale
    near_half = (np.round(rng.uniform(-300, 300, n - n // 2)) + 0.5) * scale
    x = np.concatenate([spread, near_half]).astype(np.float32)
    ulps = rng.integers(-3, 4, x.size).astype(np.int32)
    return (x.view(np.int32) + ulps).view(np.float32)


@pytest.mark.parametrize("scale", SCALES)
def test_divide_is_the_ieee_quotient(scale):
    n = 1 << 20
    x = te.placeholder((n,), "float32")
    func = te.create_prim_func([x, te.compute((n,), lambda i: epilogue.divide(x[i], scale))])
    f = tvm.compile(func, target=HOST)
    xs = _values(scale, n, seed=int(scale * 1e6) % 1000)
    out = tvm.runtime.tensor(np.zeros(n, np.float32))
    f(tvm.runtime.tensor(xs), out)
    np.testing.assert_array_equal(out.numpy(), xs / np.float32(scale))


def test_reciprocal_is_the_nearest_float32():
    for scale in SCALES:
        r = np.float32(epilogue.reciprocal_f32(scale))
        exact = 1 / np.float64(np.float32(scale))
        neighbours = [np.nextafter(r, np.float32(-np.inf)), np.nextafter(r, np.float32(np.inf))]
        assert all(abs(np.float64(r) - exact) <= abs(np.float64(c) - exact) for c in neighbours)
    with pytest.raises(ValueError, match="no reciprocal of scale 0"):
        epilogue.reciprocal_f32(0.0)


@tvm.script.ir_module
class _Quantize:
    @R.function
    def main(x: R.Tensor((4, 1000), "float32")):
        with R.dataflow():
            y = R.quantize(x, R.const(0.0173, "float32"), R.const(7, "int8"), axis=-1, out_dtype="uint8")
            R.output(y)
        return y


def test_quantize_legalization_divides_exactly_without_the_divider():
    mod = tvm.transform.Sequential(legalize_passes())(_Quantize)
    script = mod.script()
    assert "T.fma" in script and " / " not in script.split("def quantize", 1)[1]
    vm = relax.VirtualMachine(tvm.compile(mod, target=HOST), tvm.cpu())
    x = _values(0.0173, 4000, seed=3).reshape(4, 1000)
    out = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_array_equal(out, np.clip(np.round(x / np.float32(0.0173)) + 7, 0, 255).astype(np.uint8))


def _layer_norm_codes(quantizers) -> tvm.IRModule:
    """x → LayerNorm → quantize → int16 → minus the zero point (an AVX2 linear's centred codes), once per
    quantizer: the per-block chain of a ViT."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((65, 128), "float32"))
    rng = np.random.default_rng(4)
    with bb.function("main", [x]):
        with bb.dataflow():
            outs = []
            for s, z in quantizers:
                gamma, beta = (relax.const(rng.standard_normal(128).astype(np.float32)) for _ in range(2))
                y = bb.emit(relax.op.nn.layer_norm(x, gamma, beta, [1]))
                q = bb.emit(relax.op.quantize(y, relax.const(s, "float32"), relax.const(z, "int8"), -1, "uint8"))
                wide = bb.emit(relax.op.astype(q, "int16"))
                outs.append(bb.emit(relax.op.subtract(wide, relax.const(z, "int16"))))
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


def test_layer_norm_codes_of_every_block_are_one_kernel():
    """The quantizer's scale and zero point and the centring's zero point are run-time operands
    (`fast_math`): two blocks' LayerNorm → codes chains with other quantizers fuse into one kernel, called with
    each block's operands, and give bit for bit the codes of TVM's own legalization (the constants in the code,
    the divider)."""
    quantizers = [(0.0173, 7), (0.0411, 120)]
    mod = _layer_norm_codes(quantizers)
    with HOST:
        fused = tvm.transform.Sequential(legalize_passes())(mod)
    kernels = [gv.name_hint for gv, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) == 1 and kernels[0].startswith("fused_layer_norm_quantize"), kernels
    x = np.random.default_rng(5).standard_normal((65, 128)).astype(np.float32) * 3
    got = relax.VirtualMachine(tvm.compile(fused, target=HOST), tvm.cpu())["main"](tvm.runtime.tensor(x))
    # the reference: TVM's own legalization and fusion
    with HOST:
        plain = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                          relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    want = relax.VirtualMachine(tvm.compile(plain, target=HOST), tvm.cpu())["main"](tvm.runtime.tensor(x))
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.numpy(), w.numpy())
        assert len(np.unique(g.numpy())) > 20
    assert not np.array_equal(got[0].numpy(), got[1].numpy())
