"""4-bit weights two per byte: the nibble format, the kernel that unpacks it, and the pass that runs it at load."""

import numpy as np
import pytest
import tvm
from tvm import relax

from repq_tvm.kernels import nibbles, packing
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


def test_nibbles_round_trip_with_a_base_per_row():
    w = rows_of_16(37, 51)
    nib, base = nibbles.pack_nibbles(w)
    assert nib.dtype == np.uint8 and nib.shape == (37, 26) and base.dtype == np.int32
    np.testing.assert_array_equal(nibbles.unpack_nibbles(nib, base, 51), w)
    assert nib[0, 0] == (w[0, 0] - w[0].min()) | ((w[0, 1] - w[0].min()) << 4)  # low half first


def test_rows_spanning_more_than_16_values_are_refused():
    w = np.zeros((2, 4), np.int32)
    w[1, 0] = 16
    assert not nibbles.packable(w) and nibbles.packable(w[:, 1:]) and not nibbles.packable(w[:0])
    with pytest.raises(ValueError, match="more than 16 values"):
        nibbles.pack_nibbles(w)


@pytest.mark.parametrize("n,k,lanes,kpack,dtype", [(37, 51, 16, 4, "int8"), (64, 128, 16, 4, "int8"),
                                                    (10, 7, 8, 2, "int16")])
def test_unpack_kernel_builds_the_packed_operand(n, k, lanes, kpack, dtype):
    """The kernel's output is `packing.pack_weight` of the weights, padding included, for each layout."""
    w = rows_of_16(n, k, seed=n)
    func, name = nibbles.unpack_func(n, k, lanes, kpack, dtype)
    lib = tvm.compile(func, target=HOST)
    expected = packing.pack_weight(w, lanes, kpack, np.dtype(dtype))
    out = tvm.runtime.tensor(np.full(expected.shape, 99, dtype))
    lib[name](*(tvm.runtime.tensor(a) for a in nibbles.pack_nibbles(w)), out)
    np.testing.assert_array_equal(out.numpy(), expected)


def _unpack_call(bb, gv, w):
    nib, base = nibbles.pack_nibbles(w)
    return relax.call_tir(gv, [relax.const(nib), relax.const(base)], relax.TensorType((2, 8, 16, 4), "int8"))


def before_after():
    """main(x) = x + unpack(w) [+ x + unpack(v) when `two`], and the module the pass should make of it."""
    w, v = rows_of_16(32, 32, seed=1), rows_of_16(32, 32, seed=2)
    ty = relax.TensorType((2, 8, 16, 4), "int8")
    func, name = nibbles.unpack_func(32, 32, 16, 4, "int8")

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
    func, name = nibbles.unpack_func(32, 32, 16, 4, "int8")
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
