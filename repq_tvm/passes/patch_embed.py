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
from tvm.relax.expr_functor import PyExprMutator, mutator

from ..relax_util import code_bits, const_array, follow, is_op, rewrite_pass, var_uses
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


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target):
        super().__init__(mod)
        self.target, self.rewritten, self.kernels = target, 0, {}
        self.bias_of, self.fused = {}, set()

    def plan_bias_fusion(self, func: relax.Function) -> None:
        """`add(conv_var, const[1, N, 1, 1])` where the conv has no other use: the kernel adds the bias."""
        values = {b.var: b.value for block in func.body.blocks for b in block.bindings}
        uses = var_uses(func)
        for var, value in values.items():
            if is_op(value, "relax.add") and isinstance(value.args[0], relax.Var):
                conv, bias = values.get(value.args[0]), const_array(value.args[1])
                if (is_op(conv, "relax.nn.conv2d") and uses.get(value.args[0]) == 1 and bias is not None
                        and bias.ndim == 4 and bias.shape[0] == 1 and bias.shape[2:] == (1, 1)):
                    self.bias_of[value.args[0]] = (var, bias.reshape(-1))

    def visit_var_binding_(self, binding):
        self._current = binding.var
        super().visit_var_binding_(binding)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        current = getattr(self, "_current", None)
        if current in self.fused and is_op(call, "relax.add"):
            return call.args[0]  # the kernel already added this bias
        if not is_op(call, "relax.nn.conv2d"):
            return call
        xq, wdq = follow(self, call.args[0]), follow(self, call.args[1])
        if not (is_op(xq, "relax.dequantize") and is_op(wdq, "relax.dequantize") and int(wdq.attrs.axis) == 0):
            return call
        w_codes, s_w, z_w = (const_array(a) for a in wdq.args)
        s_a, z_a = const_array(xq.args[1]), const_array(xq.args[2])
        p = _patch_size(call)
        if any(v is None for v in (w_codes, s_w, z_w, s_a, z_a, p)) or s_a.size != 1:
            return call
        bias = None
        if current in self.bias_of:
            add_var, bias = self.bias_of[current]
            self.fused.add(add_var)
        return self._emit(xq.args[0], w_codes, s_w, z_w, float(s_a.reshape(())), int(z_a.reshape(())), bias, p)

    def _emit(self, q, w_codes, s_w, z_w, s_a, z_a, bias, p):
        bb, op = self.builder_, relax.op
        b, c, h, w = _shape(q)
        n, hp, wp = w_codes.shape[0], h // p, w // p
        if h % p or w % p:
            raise NotImplementedError(f"patch embedding of a {h}x{w} input with {p}x{p} patches leaves a remainder")
        patches = op.reshape(q, [b, c, hp, p, wp, p])
        patches = op.permute_dims(patches, [0, 2, 4, 1, 3, 5])
        rows = bb.emit(op.reshape(patches, [b * hp * wp, c * p * p]))
        weight = w_codes.reshape(n, -1).astype(np.int32) - z_w.reshape(-1, 1).astype(np.int32)
        out = qdense_call(bb, rows, weight, s_w, s_a, z_a, code_bits(follow(self, q)), bias, self.target,
                          self.kernels)
        self.rewritten += 1
        return op.permute_dims(op.reshape(out, [b, hp, wp, n]), [0, 3, 1, 2])


LowerPatchEmbed = rewrite_pass(
    "LowerPatchEmbed", _Rewriter,
    "Quantized non-overlapping conv (patch embedding) → integer `repq_qdense` kernel on patch rows.",
    plan="plan_bias_fusion")
