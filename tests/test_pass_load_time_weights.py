"""Narrow weights (4-bit two per byte, 8-bit int16 operands a byte each): the format, the kernel that widens it,
and the pass that runs it at load."""

import numpy as np
import pytest
import tvm
from tvm import relax

from repq_tvm.kernels import narrow_weights, packing
from repq_tvm.kernels.qdense import host_target
from repq_tvm.passes.load_time_weights import (
    FUNCTION,
    FoldConstantsAtRunTime,
    HoistLoadTimeWeights,
)

HOST = host_target(1)


def rows_of_16(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Centred 4-bit weights: codes 0..15 minus a zero point per row (rows span ≤ 16 values, bases differ)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 16, (n, k)) - rng.integers(0, 16, (n, 1))


def rows_of_256(n: int, k: int, seed: int = 0) -> np.ndarray:
    """Centred 8-bit weights: codes 0..255 minus a zero point per row."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, k)) - rng.integers(0, 256, (n, 1))


def test_nibbles_round_trip_with_a_base_per_row():
    w = rows_of_16(37, 51)
    nib, base = narrow_weights.pack(w, 4)
    assert nib.dtype == np.uint8 and nib.shape == (37, 26) and base.dtype == np.int32
    np.testing.assert_array_equal(narrow_weights.unpack(nib, base, 51, 4), w)
    assert nib[0, 0] == (w[0, 0] - w[0].min()) | ((w[0, 1] - w[0].min()) << 4)  # low half first


def test_bytes_round_trip_with_a_base_per_row():
    w = rows_of_256(9, 13)
    w[0, :2] = w[0].min() + np.array([0, 255])  # a row spanning all 256 values
    data, base = narrow_weights.pack(w, 8)
    assert data.dtype == np.uint8 and data.shape == (9, 13) and base.dtype == np.int32
    np.testing.assert_array_equal(narrow_weights.unpack(data, base, 13, 8), w)
    assert data[0, 1] == 255 and base[0] == w[0].min()


def test_storage_bits_follow_the_rows_span_and_the_operand():
    w = np.zeros((2, 4), np.int32)
    assert narrow_weights.storage_bits(w, "int8") == 4 and narrow_weights.storage_bits(w, "int16") == 4
    w[1, 0] = 15  # 16 values: still nibbles
    assert narrow_weights.storage_bits(w, "int8") == 4
    w[1, 0] = 16  # 17 values: a byte each for an int16 operand, the operand itself for an int8 one
    assert narrow_weights.storage_bits(w, "int16") == 8 and narrow_weights.storage_bits(w, "int8") is None
    w[1, 0] = 256  # 257 values: nothing narrower than int16
    assert narrow_weights.storage_bits(w, "int16") is None
    assert narrow_weights.storage_bits(w[:0], "int16") is None and narrow_weights.storage_bits(w[0], "int16") is None


def test_rows_spanning_too_many_values_are_refused():
    w = np.zeros((2, 4), np.int32)
    w[1, 0] = 16
    with pytest.raises(ValueError, match="spanning more than 16 values: not storable in 4 bits"):
        narrow_weights.pack(w, 4)
    w[1, 0] = 256
    with pytest.raises(ValueError, match="spanning more than 256 values: not storable in 8 bits"):
        narrow_weights.pack(w, 8)
    with pytest.raises(ValueError, match="stored in 4 or 8 bits, not 2"):
        narrow_weights.pack(w, 2)


@pytest.mark.parametrize("n,k,lanes,kpack,dtype,bits", [(37, 51, 16, 4, "int8", 4), (64, 128, 16, 4, "int8", 4),
                                                         (10, 7, 8, 2, "int16", 4), (10, 7, 8, 2, "int16", 8),
                                                         (37, 51, 8, 2, "int16", 8)])
def test_unpack_kernel_builds_the_packed_operand(n, k, lanes, kpack, dtype, bits):
    """The kernel's output is `packing.pack_weight` of the weights, padding included, for each layout."""
    w = (rows_of_16 if bits == 4 else rows_of_256)(n, k, seed=n)
    func, name = narrow_weights.unpack_func(n, k, lanes, kpack, dtype, bits)
    lib = tvm.compile(func, target=HOST)
    expected = packing.pack_weight(w, lanes, kpack, np.dtype(dtype))
    out = tvm.runtime.tensor(np.full(expected.shape, 99, dtype))
    lib[name](*(tvm.runtime.tensor(a) for a in narrow_weights.pack(w, bits)), out)
    np.testing.assert_array_equal(out.numpy(), expected)


def _unpack_call(bb, gv, w):
    nib, base = narrow_weights.pack(w, 4)
    return relax.call_tir(gv, [relax.const(nib), relax.const(base)], relax.TensorType((2, 8, 16, 4), "int8"))


def before_after():
    """main(x) = x + unpack(w) [+ x + unpack(v) when `two`], and the module the pass should make of it."""
    w, v = rows_of_16(32, 32, seed=1), rows_of_16(32, 32, seed=2)
    ty = relax.TensorType((2, 8, 16, 4), "int8")
    func, name = narrow_weights.unpack_func(32, 32, 16, 4, "int8")

    bb = relax.BlockBuilder()
    gv = bb.add_func(func, name)
    x = relax.Var("x", ty)
    with bb.function("main", [x]):
        with bb.dataflow():
            a = bb.emit(_unpack_call(bb, gv, w))
            b = bb.emit(_unpack_call(bb, gv, v))
            out = bb.emit_output(relax.op.add(relax.op.add(x, a), b))
        bb.emit_func_output(out)
    before = bb.get()

    bb = relax.BlockBuilder()
    gv = bb.add_func(func, name)
    x, w0, w1 = relax.Var("x", ty), relax.Var("w0", ty), relax.Var("w1", ty)
    with bb.function("main", [x, w0, w1]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.add(relax.op.add(x, w0), w1))
        bb.emit_func_output(out)
    with bb.function(FUNCTION, []):
        with bb.dataflow():
            calls = [bb.emit(_unpack_call(bb, gv, w)), bb.emit(_unpack_call(bb, gv, v))]
            out = bb.emit_output(relax.Tuple(calls))
        bb.emit_func_output(out)
    return before, bb.get()


def test_pass_before_after():
    before, expected = before_after()
    hoist = HoistLoadTimeWeights()
    kept = before.script()
    after = hoist(before)
    assert hoist.hoisted == 2 and before.script() == kept  # the input module is not changed
    tvm.ir.assert_structural_equal(after, expected)
    # the same values: main(x) before, main(x, *unpack_weights()) after
    x = np.random.default_rng(3).integers(-8, 8, (2, 8, 16, 4)).astype(np.int8)
    vm_before = relax.VirtualMachine(tvm.compile(before, target=HOST), tvm.cpu())
    vm_after = relax.VirtualMachine(tvm.compile(after, target=HOST), tvm.cpu())
    weights = tuple(vm_after[FUNCTION]())
    np.testing.assert_array_equal(vm_after["main"](tvm.runtime.tensor(x), *weights).numpy(),
                                  vm_before["main"](tvm.runtime.tensor(x)).numpy())


def test_pass_leaves_other_calls_alone():
    """The unpack kernel on a run-time value stays in main (nothing to hoist: no load-time function)."""
    func, name = narrow_weights.unpack_func(32, 32, 16, 4, "int8")
    bb = relax.BlockBuilder()
    gv = bb.add_func(func, name)
    nib = relax.Var("nib", relax.TensorType((32, 16), "uint8"))
    with bb.function("main", [nib]):
        with bb.dataflow():
            out = bb.emit_output(relax.call_tir(gv, [nib, relax.const(np.zeros(32, np.int32))],
                                                relax.TensorType((2, 8, 16, 4), "int8")))
        bb.emit_func_output(out)
    mod = bb.get()
    hoist = HoistLoadTimeWeights()
    after = hoist(mod)
    assert hoist.hoisted == 0 and FUNCTION not in [g.name_hint for g in after.get_global_vars()]
    tvm.ir.assert_structural_equal(after, mod)


def test_constant_folding_keeps_the_load_time_function():
    """TVM's FoldConstant would evaluate the unpack calls at compile time (storing the unpacked bytes again)."""
    _, after = before_after()
    folded = FoldConstantsAtRunTime()(after)
    tvm.ir.assert_structural_equal(folded[FUNCTION], after[FUNCTION])
    plain = relax.transform.FoldConstant()(after)
    assert "call_tir" in after[FUNCTION].script() and "call_tir" not in plain[FUNCTION].script()  # what it prevents
