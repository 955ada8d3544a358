"""`passes/attention_out_codes`: a fused attention whose heads go back to token order and into a quantizer becomes
the attention kernel storing those codes (as the next linear reads them), Before/After with
`assert_structural_equal`; left alone where the float output has another reader or the heads move otherwise."""

import numpy as np
import pytest
import tvm
from tvm import relax

from repq_tvm import targets
from repq_tvm.kernels import attention_vector as A
from repq_tvm.passes.attention_out_codes import FuseAttentionOutputCodes
from repq_tvm.reference import ops

AVX2 = targets.tvm_target("x86_64-avx2")
B, H, T, D = 2, 3, 45, 64
F = ops.attn_frac_bits(T, 8)
SPEC = A.attention_spec(B * H, T, T, D, scale=0.0073, bits=8, sqrt2=True, f=F, groups=ops.attn_groups(8, F, True),
                        v_bits=8, variant="avx2_i16")
S, Z, MINUS = 0.0213, 131, 131


def _kernel(spec):
    name = A.kernel_name(spec)
    return A.attention_func(spec).with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True) \
        .with_attr("op_pattern", 8), name


def _params():
    return [relax.const(np.array([3, 130], np.int32)), relax.const(np.array([9e-4], np.float32)),
            relax.const(np.array([7], np.int32)), relax.const(np.array([3e-6], np.float32))]


def _inputs():
    return [relax.Var(name, relax.TensorType((B * H, T, D), "uint8")) for name in ("q", "k", "v")]


def _args(q, k, v):
    qk_zp, qk_scale, v_zp, v_scale = _params()
    return relax.Tuple([q, k, qk_zp, qk_scale, v, v_zp, v_scale])


def _before(axes=(0, 2, 1, 3), extra_reader=False) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    q, k, v = _inputs()
    kernel, name = _kernel(SPEC)
    gv = bb.add_func(kernel, name)
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            o = bb.emit(relax.call_tir(gv, _args(q, k, v), relax.TensorType((B * H, T, D), "float32")))
            heads = bb.emit(relax.op.reshape(o, [B, H, T, D]))
            tokens = bb.emit(relax.op.permute_dims(heads, list(axes)))
            rows = bb.emit(relax.op.reshape(tokens, [B, T, H * D]))
            codes = bb.emit(relax.op.quantize(rows, relax.const(S, "float32"), relax.const(Z, "int32"), -1, "uint8"))
            wide = bb.emit(relax.op.astype(codes, "int16"))
            centred = bb.emit(relax.op.subtract(wide, relax.const(MINUS, "int16")))
            a = bb.emit(relax.op.reshape(centred, [B * T, H * D]))
            out = bb.emit_output(relax.Tuple([a, rows]) if extra_reader else a)
        bb.emit_func_output(out)
    return bb.get()


def _after() -> tvm.IRModule:
    spec = {**SPEC, "out_codes": {"heads": H, "codes": [float(np.float32(S)), Z, 255], "operand": ["int16", MINUS]}}
    bb = relax.BlockBuilder()
    q, k, v = _inputs()
    kernel, name = _kernel(spec)
    gv = bb.add_func(kernel, name)
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            centred = bb.emit(relax.call_tir(gv, _args(q, k, v), relax.TensorType((B, T, H * D), "int16")))
            out = bb.emit_output(relax.op.reshape(centred, [B * T, H * D]))
        bb.emit_func_output(out)
    return bb.get()


def test_before_after_attention_stores_the_projections_operand():
    fuse = FuseAttentionOutputCodes(AVX2)
    tvm.ir.assert_structural_equal(fuse(_before()), _after())
    assert fuse.rewritten == 1


@pytest.mark.parametrize("case", ["extra reader", "other permutation"])
def test_left_alone(case):
    before = _before(extra_reader=True) if case == "extra reader" else _before(axes=(0, 2, 1, 3)[::-1])
    fuse = FuseAttentionOutputCodes(AVX2)
    tvm.ir.assert_structural_equal(fuse(before), before)
    assert fuse.rewritten == 0

