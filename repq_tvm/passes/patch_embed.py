"""Lower the quantized patch embedding (a conv whose stride equals its kernel) to the integer dense kernel.

A ViT / Swin patch embedding is `conv2d(x̂, Ŵ, stride=p, kernel=p, padding=0)`: non-overlapping
patches, so it is exactly a dense layer over the patches. Matches, in the canonical form,

    x̂ = dequantize(q, s_a, z_a)                       q: uint8 codes [B, C, H, W], layer-wise
    Ŵ = dequantize(W_codes, s_w[N], z_w[N], axis=0)   W_codes: uint8 constant [N, C, p, p]
    y = conv2d(x̂, Ŵ) [+ bias[1, N, 1, 1]]

and emits: the uint8 codes rearranged into patch rows [B·H/p·W/p, C·p·p] (a transpose TVM fuses
with the input quantizer), one `qdense_call` (same kernels, packing and epilogue as the linears),
and the result back in NCHW so the rest of the graph is unchanged.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from ..relax_util import code_bits, const_array, lower_with_bias
from .quantized_linear import _shape, qdense_call


def _patch_size(conv) -> int | None:
    """p if `conv` is a non-overlapping p x p NCHW/OIHW conv without padding, dilation or groups, else None."""
    a = conv.attrs
    strides, padding = [int(s) for s in a.strides], [int(p) for p in a.padding]
    kernel = _shape(conv.args[1])[2:]
    ok = (a.data_layout == "NCHW" and a.kernel_layout == "OIHW" and int(a.groups) == 1
          and all(int(d) == 1 for d in a.dilation) and not any(padding)
          and strides[0] == strides[1] == kernel[0] == kernel[1])
    return strides[0] if ok else None


# conv2d(dequantize(q, s_a, z_a), dequantize(W_codes, s_w, z_w)) [+ bias[1, N, 1, 1]]
_CODES = wildcard()  # q, the activation codes (matched as the value bound to them: code_bits reads its clip)
_X = is_op("relax.dequantize")(_CODES, is_const(), is_const())
_W = is_op("relax.dequantize")(is_const(), is_const(), is_const())
_CONV = is_op("relax.nn.conv2d")(_X, _W)
_BIASED = is_op("relax.add")(_CONV, is_const())


def _parts(m):
    """(q, W_codes, s_w, z_w, s_a, z_a, q's bound value, p) of a `_CONV` match, or None where it is not a
    layer-wise quantized input through a per-channel quantized non-overlapping p x p conv."""
    xq, wdq, conv = m[_X], m[_W], m[_CONV]
    if int(wdq.attrs.axis) != 0:
        return None
    w_codes, s_w, z_w = (const_array(a) for a in wdq.args)
    s_a, z_a = const_array(xq.args[1]), const_array(xq.args[2])
    p = _patch_size(conv)
    if p is None or s_a.size != 1:
        return None
    return xq.args[0], w_codes, s_w, z_w, float(s_a.reshape(())), int(z_a.reshape(())), m[_CODES], p


def _bias(add, _parts):
    """The add's constant [1, N, 1, 1] as the kernel's bias [N] (else None)."""
    bias = const_array(add.args[1])
    return bias.reshape(-1) if bias.ndim == 4 and bias.shape[0] == 1 and bias.shape[2:] == (1, 1) else None


def _emit(bb, target, kernels, q, w_codes, s_w, z_w, s_a, z_a, q_value, p, bias):
    """The kernel call replacing one conv: codes as patch rows, `qdense_call`, result back in NCHW."""
    op = relax.op
    b, c, h, w = _shape(q)
    n, hp, wp = w_codes.shape[0], h // p, w // p
    if h % p or w % p:
        raise NotImplementedError(f"patch embedding of a {h}x{w} input with {p}x{p} patches leaves a remainder")
    patches = op.reshape(q, [b, c, hp, p, wp, p])
    patches = op.permute_dims(patches, [0, 2, 4, 1, 3, 5])
    rows = bb.emit(op.reshape(patches, [b * hp * wp, c * p * p]))
    weight = w_codes.reshape(n, -1).astype(np.int32) - z_w.reshape(-1, 1).astype(np.int32)
    out = qdense_call(bb, rows, weight, s_w, s_a, z_a, code_bits(q_value), bias, target, kernels)
    return op.permute_dims(op.reshape(out, [b, hp, wp, n]), [0, 3, 1, 2])


@tvm.transform.module_pass(opt_level=0, name="LowerPatchEmbed")
class LowerPatchEmbed:
    """Quantized non-overlapping conv (the patch embedding) → integer `repq_qdense` kernel on patch rows.

    A conv whose stride equals its kernel is a dense layer over the patches: lowering it to the linears'
    kernel puts the first layer of the model on the integer path too, instead of a float conv on
    dequantized values.  Two `tvm.relax.dpl` rewrites per function: first `_BIASED`, a conv whose result
    feeds only a constant [1, N, 1, 1] bias add (the kernel adds the bias, the add disappears), then
    `_CONV`, every quantized patch embedding left.  `.rewritten` counts the kernels emitted.
    """

    def __init__(self, target):
        self.target, self.rewritten = target, 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        kernels = {}
        mod, self.rewritten = lower_with_bias(
            mod, _BIASED, _CONV, _parts, _bias,
            lambda bb, parts, bias: _emit(bb, self.target, kernels, *parts, bias))
        return mod
