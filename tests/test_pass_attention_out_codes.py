"""`passes/attention_out_codes`: a fused attention whose heads go back to token order and into a quantizer becomes
the attention kernel storing those codes (as the next linear reads them), Before/After with
`assert_structural_equal`; left alone where the float output has another reader or the heads move otherwise."""

import numpy as np
import pytest
import tvm
from tvm import relax

from repq_tvm import targets
from repq_tvm.kernels import attention_vector as A
from repq_tvm.kernels.attention_consts import attention_consts, log2_scale, with_quantizer
from repq_tvm.kernels.epilogue import ZERO_POINT
from repq_tvm.passes.attention_out_codes import FuseAttentionOutputCodes
from repq_tvm.reference import ops

AVX2 = targets.tvm_target("x86_64-avx2")
B, H, T, D = 2, 3, 45, 64
F = ops.attn_frac_bits(T, 8)
SPEC = A.attention_spec(B * H, T, T, D, bits=8, sqrt2=True, f=F, groups=ops.attn_groups(8, F, True), v_bits=8,
                        variant="avx2_i16")
CONSTS = attention_consts(log2_scale(0.0073))
S, Z = 0.0213, 131


def _kernel(spec):
    name = A.kernel_name(spec)
    return A.attention_func(spec).with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True) \
        .with_attr("op_pattern", 8), name


def _params():
    return [relax.const(np.array([3, 130], np.int32)), relax.const(np.array([9e-4], np.float32)),
            relax.const(np.array([7], np.int32)), relax.const(np.array([3e-6], np.float32))]


def _inputs():
    return [relax.Var(name, relax.TensorType((B * H, T, D), "uint8")) for name in ("q", "k", "v")]


def _args(q, k, v, consts=CONSTS):
    qk_zp, qk_scale, v_zp, v_scale = _params()
    return relax.Tuple([q, k, qk_zp, qk_scale, v, v_zp, v_scale, relax.const(consts, "float64")])


def _before(axes=(0, 2, 1, 3), extra_reader=False, minus=None, quantizers=((S, Z),)) -> tvm.IRModule:
    """One attention per quantizer (blocks), its heads to tokens, quantized, centred as AVX2's proj reads them
    (minus the zero point, unless ``minus``)."""
    bb = relax.BlockBuilder()
    q, k, v = _inputs()
    kernel, name = _kernel(SPEC)
    gv = bb.add_func(kernel, name)
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            outs = []
            for s, z in quantizers:
                o = bb.emit(relax.call_tir(gv, _args(q, k, v), relax.TensorType((B * H, T, D), "float32")))
                heads = bb.emit(relax.op.reshape(o, [B, H, T, D]))
                tokens = bb.emit(relax.op.permute_dims(heads, list(axes)))
                rows = bb.emit(relax.op.reshape(tokens, [B, T, H * D]))
                codes = bb.emit(relax.op.quantize(rows, relax.const(s, "float32"), relax.const(z, "int32"), -1,
                                                  "uint8"))
                wide = bb.emit(relax.op.astype(codes, "int16"))
                centred = bb.emit(relax.op.subtract(wide, relax.const(z if minus is None else minus, "int16")))
                outs.append(bb.emit(relax.op.reshape(centred, [B * T, H * D])))
            if extra_reader:
                outs.append(rows)
            out = bb.emit_output(relax.Tuple(outs) if len(outs) > 1 else outs[0])
        bb.emit_func_output(out)
    return bb.get()


def _after(minus=Z) -> tvm.IRModule:
    operand = ["int16", ZERO_POINT if minus == Z else minus]  # the quantizer's own zero point: read at run time
    spec = {**SPEC, "out_codes": {"heads": H, "top": 255, "operand": operand}}
    bb = relax.BlockBuilder()
    q, k, v = _inputs()
    kernel, name = _kernel(spec)
    gv = bb.add_func(kernel, name)
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            centred = bb.emit(relax.call_tir(gv, _args(q, k, v, with_quantizer(CONSTS, "out", S, Z)),
                                             relax.TensorType((B, T, H * D), "int16")))
            out = bb.emit_output(relax.op.reshape(centred, [B * T, H * D]))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("minus", [Z, 128])
def test_before_after_attention_stores_the_projections_operand(minus):
    fuse = FuseAttentionOutputCodes(AVX2)
    tvm.ir.assert_structural_equal(fuse(_before(minus=minus)), _after(minus))
    assert fuse.rewritten == 1


def test_blocks_with_other_quantizers_share_one_kernel():
    """Two blocks whose output projections quantize with other scales and zero points: one kernel storing the
    centred codes, each call with its quantizer in its ``consts``."""
    quantizers = ((S, Z), (0.0177, 124))
    fuse = FuseAttentionOutputCodes(AVX2)
    after = fuse(_before(quantizers=quantizers))
    assert fuse.rewritten == 2
    kernels = [gv.name_hint for gv, f in after.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernels == [A.kernel_name({**SPEC, "out_codes": {"heads": H}})] and kernels[0].endswith("_out_codes")
    calls = [b.value for b in after["main"].body.blocks[0].bindings if isinstance(b.value, relax.Call)
             and isinstance(b.value.args[0], tvm.ir.GlobalVar)]
    assert [c.args[1].fields[-1].value.numpy().tolist() for c in calls] == [
        with_quantizer(CONSTS, "out", s, z).tolist() for s, z in quantizers]


@pytest.mark.parametrize("case", ["extra reader", "other permutation"])
def test_left_alone(case):
    before = _before(extra_reader=True) if case == "extra reader" else _before(axes=(0, 2, 1, 3)[::-1])
    fuse = FuseAttentionOutputCodes(AVX2)
    tvm.ir.assert_structural_equal(fuse(before), before)
    assert fuse.rewritten == 0

