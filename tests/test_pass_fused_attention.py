"""`passes/fused_attention`: the three attention kernels (q@kᵀ → log√2 weights → attn @ V) become one kernel call,
AMX or vector by the target, Before/After with `assert_structural_equal`; left alone on aarch64 and where an
intermediate has another reader."""

import numpy as np
import pytest
import tvm
from tvm import relax

from repq_tvm import targets
from repq_tvm.kernels import attention_amx as A
from repq_tvm.kernels import attention_vector
from repq_tvm.kernels.attn_v import attn_v_primfunc, padded_tokens
from repq_tvm.kernels.log_weights import log_weights_primfunc
from repq_tvm.kernels.qbmm import qbmm_primfunc
from repq_tvm.passes.fused_attention import FuseAttention
from repq_tvm.reference import ops

AMX = targets.tvm_target("x86_64-amx")
BT, M, N, D, BITS, S_ATTN = 6, 65, 65, 64, 8, 0.0073
F = ops.attn_frac_bits(N, 8)
GROUPS = ops.attn_groups(BITS, F, True)
PLANES = ops.attn_planes(2, GROUPS)
QK_PARAMS = [relax.const(np.array([3, 130], np.int32)), relax.const(np.array([9e-4], np.float32))]
V_PARAMS = [relax.const(np.array([7], np.int32)), relax.const(np.array([3e-6], np.float32))]


def _inputs():
    return [relax.Var(name, relax.TensorType((BT, rows, D), "uint8")) for name, rows in (("q", M), ("k", N), ("v", N))]


def _before(target, extra_reader: bool = False) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    q, k, v = _inputs()
    qk = bb.add_func(qbmm_primfunc(BT, M, N, D, target)[0], "qk")
    lw = bb.add_func(log_weights_primfunc((BT, M, N), S_ATTN, BITS, True, F, GROUPS, target, softmax=True)[0], "lw")
    av = bb.add_func(attn_v_primfunc(BT, M, N, D, target, parities=2, groups=GROUPS, f=F)[0], "av")
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            y = bb.emit(relax.call_tir(qk, relax.Tuple([q, k, *QK_PARAMS]), relax.TensorType((BT, M, N), "float32")))
            y4 = bb.emit(relax.op.reshape(y, [1, BT, M, N]))
            x = bb.emit(relax.op.reshape(y4, [BT, M, N]))
            w = bb.emit(relax.call_tir(lw, relax.Tuple([x]),
                                       relax.TensorType((BT, PLANES, M, padded_tokens(N)), "int16")))
            o = bb.emit(relax.call_tir(av, relax.Tuple([w, v, *V_PARAMS]), relax.TensorType((BT, M, D), "float32")))
            out = bb.emit_output(relax.Tuple([o, y]) if extra_reader else o)
        bb.emit_func_output(out)
    return bb.get()


def _after(variant: str = "amx") -> tvm.IRModule:
    spec = A.attention_spec(BT, M, N, D, scale=S_ATTN, bits=BITS, sqrt2=True, f=F, groups=GROUPS, v_bits=8)
    spec = {**spec, "variant": variant}
    name = A.kernel_name(spec)
    kernel = attention_vector.attention_func(spec).with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True) \
        .with_attr("op_pattern", 8)
    bb = relax.BlockBuilder()
    q, k, v = _inputs()
    fused = bb.add_func(kernel, name)
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            o = bb.emit_output(relax.call_tir(fused, relax.Tuple([q, k, *QK_PARAMS, v, *V_PARAMS]),
                                              relax.TensorType((BT, M, D), "float32")))
        bb.emit_func_output(o)
    return bb.get()


@pytest.mark.parametrize("preset,variant", [("x86_64-amx", "amx"), ("x86_64-avx512-vnni", "vnni"),
                                            ("x86_64-avx2", "avx2_i16")])
def test_before_after_fused_attention(preset, variant):
    target = targets.tvm_target(preset)
    fuse = FuseAttention(target)
    tvm.ir.assert_structural_equal(fuse(_before(target)), _after(variant))
    assert fuse.rewritten == 1


def test_left_alone_on_aarch64():
    arm = targets.tvm_target("aarch64-neon-dotprod")
    before = _before(arm)
    fuse = FuseAttention(arm)
    tvm.ir.assert_structural_equal(fuse(before), before)
    assert fuse.rewritten == 0


def test_left_alone_when_the_logits_have_another_reader():
    before = _before(AMX, extra_reader=True)
    fuse = FuseAttention(AMX)
    tvm.ir.assert_structural_equal(fuse(before), before)
    assert fuse.rewritten == 0
