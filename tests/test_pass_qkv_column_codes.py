"""`passes/qkv_column_codes`: a vector attention reading the qkv projection's float output → the qkv kernel stores
the q, k and v codes (a quantizer per column) and the attention reads them; Before/After with
`assert_structural_equal`, and left alone where the float output has another reader or the thirds' codes differ in
width."""

import numpy as np
import pytest
import tvm
from tvm import relax

from repq_tvm import targets
from repq_tvm.kernels import attention_amx as A
from repq_tvm.kernels import attention_vector
from repq_tvm.kernels import qdense as Q
from repq_tvm.kernels.attention_consts import attention_consts, log2_scale
from repq_tvm.kernels.epilogue import quantizer_args
from repq_tvm.passes.qkv_column_codes import FuseQKVColumnCodes, column_quantizers
from repq_tvm.reference import ops
from repq_tvm.relax_util import scheduled_kernel

AVX2 = targets.tvm_target("x86_64-avx2")
B, H, T, D, K = 2, 3, 45, 64, 96  # qkv: [B·T, K] → [B·T, 3·H·D]
ROWS, COLS = B * T, 3 * H * D
F = ops.attn_frac_bits(T, 8)
QUANTIZERS = [(0.031, 3), (0.027, 130), (0.05, 7)]  # q, k, v
QK_PARAMS = [relax.const(np.array([3, 130], np.int32)), relax.const(np.array([9e-4], np.float32))]
V_PARAMS = [relax.const(np.array([7], np.int32)), relax.const(np.array([3e-6], np.float32))]
CONSTS = attention_consts(log2_scale(0.0073), dict(zip("qkv", QUANTIZERS)))


def _qkv_kernel(**tail):
    sch, _, _, _ = Q.schedule_qdense(ROWS, COLS, K, AVX2, epilogue=True, **tail)
    return sch


def _attention(tops, codes: bool = False):
    spec = {**A.attention_spec(B * H, T, T, D, bits=8, sqrt2=True, f=F, groups=ops.attn_groups(8, F, True), v_bits=8),
            "variant": "avx2_i16", "qkv": {"heads": H, "tops": list(tops), **({"codes": True} if codes else {})}}
    name = A.kernel_name(spec)
    return name, attention_vector.attention_func(spec).with_attr("global_symbol", name).with_attr(
        "tirx.is_scheduled", True).with_attr("op_pattern", 8)


def _params(sch):
    """Relax parameters for a qdense kernel's operands (every buffer but the output)."""
    return [relax.Var(str(p.name), relax.TensorType([int(d) for d in p.shape], str(p.dtype)))
            for p in sch.mod["main"].params[:-1]]  # the params are the buffers


def _before(tops=(255, 255, 255), extra_reader=False):
    bb = relax.BlockBuilder()
    sch = _qkv_kernel()
    qkv = bb.add_func(scheduled_kernel(sch, "qkv"), "qkv")
    name, attention = _attention(tops)
    attn = bb.add_func(attention, name)
    params = _params(sch)
    with bb.function("main", params):
        with bb.dataflow():
            y = bb.emit(relax.call_tir(qkv, relax.Tuple(params), relax.TensorType((ROWS, COLS), "float32")))
            o = relax.call_tir(attn, relax.Tuple([y, *QK_PARAMS, *V_PARAMS, relax.const(CONSTS, "float64")]),
                               relax.TensorType((B * H, T, D), "float32"))
            out = bb.emit_output(relax.Tuple([o, y]) if extra_reader else o)
        bb.emit_func_output(out)
    return bb.get()


def _after():
    bb = relax.BlockBuilder()
    plain = _qkv_kernel()
    sch = _qkv_kernel(column_codes=255)
    qkv = bb.add_func(scheduled_kernel(sch, "qkv_codes0"), "qkv_codes0")
    name, attention = _attention((255, 255, 255), codes=True)
    attn = bb.add_func(attention, name)
    params = _params(plain)
    quant = np.repeat(np.stack([quantizer_args(s, z) for s, z in QUANTIZERS], axis=1), H * D, axis=1)
    with bb.function("main", params):
        with bb.dataflow():
            c = bb.emit(relax.call_tir(qkv, relax.Tuple([*params, relax.const(quant)]),
                                       relax.TensorType((ROWS, COLS), "uint8")))
            o = bb.emit_output(relax.call_tir(attn, relax.Tuple([c, *QK_PARAMS, *V_PARAMS,
                                                                  relax.const(CONSTS, "float64")]),
                                              relax.TensorType((B * H, T, D), "float32")))
        bb.emit_func_output(o)
    return bb.get()


def test_before_after_qkv_stores_the_codes():
    fuse = FuseQKVColumnCodes(AVX2)
    tvm.ir.assert_structural_equal(fuse(_before()), _after())
    assert fuse.rewritten == 1


@pytest.mark.parametrize("case", [{"extra_reader": True}, {"tops": (255, 255, 15)}])
def test_left_alone(case):
    """The float output read elsewhere too (it must stay), or thirds of different code widths (one top per kernel)."""
    before = _before(**case)
    fuse = FuseQKVColumnCodes(AVX2)
    tvm.ir.assert_structural_equal(fuse(before), before)
    assert fuse.rewritten == 0


def test_column_quantizers_are_the_consts_slots_by_third():
    rows = column_quantizers(CONSTS, 4)
    assert rows.shape == (3, 12) and rows.dtype == np.float32
    for third, (s, z) in enumerate(QUANTIZERS):
        np.testing.assert_array_equal(rows[:, 4 * third:4 * (third + 1)], np.repeat(quantizer_args(s, z)[:, None], 4, 1))
