"""`passes.qkv_head_split`: q, k and v sliced off the qkv output before their heads move, same values."""

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import relax as R

from repq_tvm.passes.qkv_head_split import SplitQKVHeads

T_, H, D = 5, 2, 4  # tokens, heads, head dim (batch 1)


def _before(axes=(2, 0, 3, 1, 4)):
    @R.function
    def main(y: R.Tensor((T_, 3 * H * D), "float32")):
        with R.dataflow():
            y3 = R.reshape(y, (1, T_, 3 * H * D))
            p = R.permute_dims(R.reshape(y3, (1, T_, 3, H, D)), axes)
            q = R.squeeze(R.strided_slice(p, axes=[0], begin=[0], end=[1]), axis=[0])
            k = R.squeeze(R.strided_slice(p, axes=[0], begin=[1], end=[2]), axis=[0])
            v = R.squeeze(R.strided_slice(p, axes=[0], begin=[2], end=[3]), axis=[0])
            out = (q, k, v)
            R.output(out)
        return out

    return tvm.IRModule({"main": main})


@R.function
def _after(y: R.Tensor((T_, 3 * H * D), "float32")):
    with R.dataflow():
        q = R.permute_dims(R.reshape(R.strided_slice(y, axes=[1], begin=[0], end=[H * D]), (1, T_, H, D)),
                           [0, 2, 1, 3])
        k = R.permute_dims(R.reshape(R.strided_slice(y, axes=[1], begin=[H * D], end=[2 * H * D]), (1, T_, H, D)),
                           [0, 2, 1, 3])
        v = R.permute_dims(R.reshape(R.strided_slice(y, axes=[1], begin=[2 * H * D], end=[3 * H * D]),
                                     (1, T_, H, D)), [0, 2, 1, 3])
        out = (q, k, v)
        R.output(out)
    return out


def _run(mod, y):
    exe = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(exe, tvm.cpu())
    return [t.numpy() for t in vm["main"](tvm.runtime.tensor(y))]


def test_thirds_are_sliced_before_the_heads_move():
    before = _before()
    split = SplitQKVHeads()
    after = split(before)
    assert split.rewritten == 3
    tvm.ir.assert_structural_equal(after["main"], _after.with_attr("global_symbol", "main"))
    y = np.random.default_rng(0).standard_normal((T_, 3 * H * D)).astype(np.float32)
    for a, b in zip(_run(after, y), _run(before, y)):
        assert a.shape == (1, H, T_, D)
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("axes", [(2, 0, 1, 3, 4), (0, 2, 3, 1, 4)])
def test_other_layouts_are_left_alone(axes):
    before = _before(axes)
    split = SplitQKVHeads()
    after = split(before)
    assert split.rewritten == 0
    tvm.ir.assert_structural_equal(after, before)
