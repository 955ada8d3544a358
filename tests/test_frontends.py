"""Both import routes (torch.export, ONNX) reach the same canonical Relax form, and every route computes the
PyTorch fake-quant model: ONNX Runtime on the exported file, and TVM on the imported module.

Tolerance. Outputs are compared per image. A quantizer input that lies within about one float32 ulp of a
rounding midpoint can round either way under a different (equally valid) float summation order: TVM and
ONNX Runtime accumulate matmuls and LayerNorm differently from PyTorch, and so does PyTorch in float64
(with these fixtures, fp32 vs fp64 PyTorch already differs by 0.08 on one Swin image out of 8). One such
flip moves one activation by a whole quantization step, which moves the logits of that image by ~0.01-0.1.
So: most images must agree to float32 precision (1e-5: no code flipped), and every image within 0.25.
"""

import collections

import numpy as np
import onnx
import pytest
import torch
import tvm
from tvm import relax

from repq_tvm.errors import ReqError
from repq_tvm.frontends import canonical_ops, export_onnx, export_relax, import_onnx, lower_log_quant
from repq_tvm.frontends.canonical import LOG_OPS, log_fake_quant, log_fake_quant_np
from repq_tvm.frontends.normalize import normalize
from repq_tvm.frontends.quant_ops import as_custom_ops
from repq_tvm.quant.calibrate import calibrate
from repq_tvm.quant.config import QuantConfig, method_config
from repq_tvm.quant.layers import QuantLinear
from repq_tvm.quant.quantizers import LogQuantizer
from repq_tvm.quant.wrap import quantizers

from conftest import small_model

ARCHS = ["vit_cifar10", "swin_cifar10"]
SHAPE = (4, 3, 32, 32)
TARGET = {"kind": "llvm"}


def _calibrated(name, cfg=None, blocks=None):
    model = small_model(name)
    if blocks is not None:  # a shallower ViT, for a faster build
        model.blocks = model.blocks[:blocks]
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return calibrate(model, images, cfg or method_config("repq-vit", 4, 4), progress=False)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """name → (model, torch-route module, onnx path, onnx-route module), built once per architecture."""
    cache = {}

    def get(name):
        if name not in cache:
            model = _calibrated(name)
            path = export_onnx(model, SHAPE, str(tmp_path_factory.mktemp("onnx") / f"{name}.onnx"))
            cache[name] = (model, export_relax(model, SHAPE), path, import_onnx(path))
        return cache[name]

    return get


def _inputs():
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(3))


def assert_matches_fake_quant(got, ref):
    per_image = np.abs(np.asarray(got) - np.asarray(ref)).reshape(len(ref), -1).max(axis=1)
    assert (per_image < 1e-5).mean() >= 0.5, per_image
    assert per_image.max() < 0.25, per_image


def _expected_quant_ops(model):
    """Canonical op counts implied by the model's quantizers."""
    qs = quantizers(model)
    acts = [q for n, q in qs.items() if not n.endswith("weight_quantizer") and not isinstance(q, LogQuantizer)]
    return {"relax.quantize": len(acts), "relax.clip": sum(q.bits < 8 for q in acts),
            "relax.dequantize": len(qs) - sum(isinstance(q, LogQuantizer) for q in qs.values()),
            LOG_OPS[True]: sum(isinstance(q, LogQuantizer) for q in qs.values())}


def _signature(mod):
    """Multiset of (op, attributes, result type) over the bindings of main: the form up to binding order."""
    sig = collections.Counter()
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op):
                sig[(b.value.op.name, str(b.value.attrs), str(b.var.ty))] += 1
    return sig


@pytest.mark.parametrize("name", ARCHS)
def test_both_frontends_give_the_same_canonical_ops(imported, name):
    model, mod_torch, _, mod_onnx = imported(name)
    ops = canonical_ops(mod_torch)
    assert ops == canonical_ops(mod_onnx)
    assert _signature(mod_torch) == _signature(mod_onnx)
    assert {k: ops[k] for k in _expected_quant_ops(model)} == _expected_quant_ops(model)
    # nothing left over from either frontend: no fused attention, no TIR calls, no unfolded log pattern
    assert not {"relax.nn.attention", "relax.call_tir", "relax.log", "relax.round", "relax.where"} & set(ops)
    linears = sum(isinstance(m, QuantLinear) for m in model.modules())
    assert ops["relax.matmul"] == linears + 2 * ops[LOG_OPS[True]]  # every Linear, and both attention matmuls


def _quant_calls(mod):
    calls = []
    relax.analysis.post_order_visit(mod["main"].body, lambda e: calls.append(e) if isinstance(e, relax.Call)
                                    and isinstance(e.op, tvm.ir.Op) and e.op.name in
                                    ("relax.quantize", "relax.dequantize", "relax.call_pure_packed") else None)
    return calls


def test_canonical_form_details(imported):
    """dtypes, axes and constant kinds of the quantizer ops, identical in both routes."""
    _, mod_torch, _, mod_onnx = imported("vit_cifar10")
    for mod in (mod_torch, mod_onnx):
        for call in _quant_calls(mod):
            if call.op.name == "relax.call_pure_packed":
                assert call.args[0].global_symbol == LOG_OPS[True]
                assert isinstance(call.args[2], tvm.ir.GenericConst) and isinstance(call.args[3], tvm.tirx.IntImm)
                continue
            data, scale, zp = call.args
            assert str(zp.ty.dtype.dtype) == "uint8" and str(scale.ty.dtype.dtype) == "float32"
            if isinstance(data, tvm.ir.GenericConst):  # weight: per-channel codes
                assert call.attrs.axis == 0 and str(data.ty.dtype.dtype) == "uint8"
                assert scale.value.numpy().shape == (data.value.numpy().shape[0],)
            else:
                assert call.attrs.axis == -1 and scale.value.numpy().shape == ()
    scales = lambda mod: sorted(float(c.args[1].value.numpy().ravel()[0]) for c in _quant_calls(mod)  # noqa: E731
                                if c.op.name == "relax.quantize")
    assert scales(mod_torch) == scales(mod_onnx)


@pytest.mark.parametrize("name", ARCHS)
def test_onnx_runtime_matches_pytorch(imported, name):
    import onnxruntime as ort

    model, _, path, _ = imported(name)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    x = _inputs()
    got = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        assert_matches_fake_quant(got, model(x).numpy())


def _build_and_run(mod, x):
    ex = tvm.compile(mod, target=tvm.target.Target(TARGET))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy())).numpy()


def test_tvm_build_of_the_onnx_route_matches_pytorch(imported):
    """Full Swin (the harder graph: windows, shifts, masks, patch merging) through ONNX, built and run."""
    model, _, _, mod_onnx = imported("swin_cifar10")
    x = _inputs()
    with torch.no_grad():
        assert_matches_fake_quant(_build_and_run(mod_onnx, x), model(x).numpy())


def test_tvm_build_of_the_torch_route_matches_pytorch():
    """ViT through torch.export, cut to 1 block (every op kind is still there): LLVM codegen time grows with
    depth (~15 s for all 6 blocks on this machine), and both routes give the same form for the full models."""
    model = _calibrated("vit_cifar10", blocks=1)
    x = _inputs()
    with torch.no_grad():
        assert_matches_fake_quant(_build_and_run(export_relax(model, SHAPE), x), model(x).numpy())


def _log_module(scale, bits, shape=(2, 3, 17)):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(log_fake_quant(x, x.ty, scale, bits))
        bb.emit_func_output(out)
    return bb.get()


def test_log_op_packed_and_lowered_match_the_quantizer():
    """The registered packed function equals LogQuantizer exactly; the lowered Relax ops agree except where a
    code sits on a rounding midpoint (ln-based log2); lowering and `normalize` are inverse."""
    q = LogQuantizer(4, sqrt2=True)
    x = torch.softmax(torch.randn(2, 3, 17, generator=torch.Generator().manual_seed(0)) * 4, dim=-1)
    x[0, 0, :3] = 0.0
    q.calibrating = True
    ref = q(x).detach().numpy()
    assert np.array_equal(log_fake_quant_np(x.numpy(), q.scale.item(), 4, True), ref)
    mod = _log_module(q.scale.item(), 4)
    lowered = lower_log_quant(mod)
    assert LOG_OPS[True] not in canonical_ops(lowered) and canonical_ops(normalize(lowered)) == canonical_ops(mod)
    target = tvm.target.Target(TARGET)
    for m, exact in ((mod, True), (lowered, False)):
        got = relax.VirtualMachine(tvm.compile(m, target=target), tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
        got = got.numpy()
        assert np.array_equal(got, ref) if exact else np.mean(np.isclose(got, ref, rtol=1e-5, atol=0)) > 0.95


def test_custom_ops_context_is_the_same_function_and_restores_the_model():
    model = _calibrated("swin_cifar10")
    keys, x = set(model.state_dict()), _inputs()
    with torch.no_grad():
        ref = model(x)
        with as_custom_ops(model):
            assert torch.equal(model(x), ref)
        assert torch.equal(model(x), ref)
    assert set(model.state_dict()) == keys
    assert all("forward" not in q.__dict__ for q in quantizers(model).values())


def test_channel_wise_activations_are_refused():
    model = _calibrated("swin_cifar10", QuantConfig(w_bits=4, a_bits=4, post_ln="channel"))
    with pytest.raises(ReqError, match="channel-wise"):
        with as_custom_ops(model):
            pass
    assert all("forward" not in q.__dict__ for q in quantizers(model).values())


class _Bessel(torch.nn.Module):
    def forward(self, x):
        return torch.special.bessel_j0(x) + x


def test_unsupported_torch_op_is_named():
    with pytest.raises(ReqError, match=r"unsupported op in the graph: \['special_bessel_j0.default'\]"):
        export_relax(_Bessel(), [1, 3, 8, 8])


def test_unsupported_onnx_op_is_named(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("NoSuchOp", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(ReqError, match="unsupported op in the graph: .*NoSuchOp"):
        import_onnx(str(path))
