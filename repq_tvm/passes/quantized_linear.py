"""Lower quantized linears to one integer kernel: uint8 codes x int weights → int32 → float epilogue with bias.

Matches, in the canonical form (see `repq_tvm.frontends`):

    x̂  = dequantize(q, s_a, z_a)                        q: uint8 codes of a layer-wise quantizer
    Ŵ  = dequantize(W_codes, s_w[N], z_w[N], axis=0)     W_codes: uint8 constant [N, K]
    y  = matmul(x̂, permute_dims(Ŵ, [1, 0]))  [+ bias]   bias: constant [N]

and emits one call of the target's scheduled `repq_tvm.kernels.qdense` kernel, computing
acc = Σ_k (q − z_a)(W − z_w) exactly in int32 and y = float(acc)·(s_a·s_w[n]) + bias[n] in its
epilogue. Weights are centred (W − z_w), packed for the target's dot instruction and folded with the
zero-point correction and scales at compile time; the variant (AMX tiles, VNNI, AVX2 u8·s8 or int16, Arm sdot,
plain vector loops) is the fastest one that is exact for these bit widths. sdot takes s8 activations:
codes of at most 7 bits as they are, 8-bit codes as q − 128, with 128·Σ_k w folded into the zero-point
constant (`packing.activation_shift`). 8-bit weights centred on their
zero point span ±255: int8 kernels get them offset into int8 per channel, and add back
offset[n]·Σ_k q[m, k] in the kernel (`packing.weight_offset`), so W8 runs on vpdpbusd at full speed.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, wildcard

from ..relax_util import code_bits
from ..relax_util import const_array as _const
from ..relax_util import lower_with_bias, scheduled_kernel

def _shape(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape]


def weight_bits(w: np.ndarray) -> int:
    """The narrowest project bit width whose code bound covers the centred weights w − z_w."""
    from ..kernels.packing import code_bounds

    top = int(np.abs(w).max(initial=0))
    return next((b for b in (4, 6, 8) if top <= code_bounds(8, b)[1]), 8)


def qdense_call(bb: relax.BlockBuilder, q: relax.Expr, w: np.ndarray, s_w: np.ndarray, s_a: float, z_a: int,
                bits_a: int, bias: np.ndarray | None, target, kernels: dict) -> relax.Expr:
    """Emit the scheduled kernel for codes q [..., K] (M rows in all) and centred weights w [N, K]; returns float32
    [M, N].  An int16 or int8 kernel's centring of the codes comes before q is flattened to [M, K]: so it fuses
    into q's producer (LayerNorm → quantize writes the int16 codes itself; across a reshape TVM's fusion stops).

    `kernels` caches one PrimFunc per (shape, bit widths): layers of the same shape share their kernel.
    """
    from ..kernels import packing
    from ..kernels.qdense import choose_variant, schedule_qdense

    q_shape = _shape(q)
    m, k = int(np.prod(q_shape[:-1])), q_shape[-1]
    n = w.shape[0]
    bits_w = weight_bits(w)
    v = choose_variant(target, bits_a, bits_w, (m, n, k))
    # 8-bit codes: w - z_w beyond int8; the AMX kernel always takes the offsets (zeros where they fit)
    compensate = v.name == "amx" or (v.w_dtype == "int8" and packing.needs_offset(w))
    key = (m, n, k, bits_a, bits_w, compensate)
    if key not in kernels:
        sch, v, _, _ = schedule_qdense(m, n, k, target, bits_a=bits_a, bits_w=bits_w, epilogue=True,
                                       compensate=compensate)
        name = f"repq_qdense_{v.name}_{m}x{n}x{k}_a{bits_a}w{bits_w}{'c' if compensate else ''}"
        kernels[key] = (bb.add_func(scheduled_kernel(sch, name), name), v)
    gv, v = kernels[key]
    zp = 0 if v.a_dtype == "int16" else z_a
    shift = v.a_shift(bits_a)
    zp_wsum, scale, bias = packing.epilogue_params(w, s_w.reshape(-1), s_a, zp, bias, a_shift=shift)
    offset = packing.weight_offset(w) if compensate else np.zeros(n, np.int32)
    kp = packing.ceil_to(k, v.kpack)
    a = q
    if v.a_dtype == "int16":
        a = bb.emit(relax.op.subtract(relax.op.astype(q, "int16"), relax.const(z_a, "int16")))
    elif v.a_dtype == "int8":  # sdot: s8 activations, q − shift (0 for codes of at most 7 bits)
        if shift:
            a = bb.emit(relax.op.subtract(relax.op.astype(q, "int16"), relax.const(shift, "int16")))
        a = bb.emit(relax.op.astype(a, "int8"))
    if len(q_shape) != 2:
        a = bb.emit(relax.op.reshape(a, [m, k]))
    if kp != k:  # zero columns meet zero weight rows: they add nothing (and nothing to the row sums)
        a = bb.emit(relax.op.nn.pad(a, [0, 0, 0, kp - k]))
    # after the activation: the bindings in argument order, as a `tvm.relax.dpl` rewrite normalizes them
    weights = [_weight_operand(bb, w - offset[:, None], v, kernels), *([relax.const(offset)] if compensate else [])]
    return bb.emit(relax.call_tir(gv, [a, *weights, relax.const(zp_wsum), relax.const(scale),
                                       relax.const(bias)], relax.TensorType((m, n), "float32")))


def _weight_operand(bb: relax.BlockBuilder, w: np.ndarray, v, kernels: dict) -> relax.Expr:
    """The kernel's packed weight operand: a constant, or for weights storable narrower than the operand (4-bit
    ones two per byte, 8-bit ones of an int16 kernel a byte each) the call that widens them
    (`kernels.narrow_weights`; `passes.load_time_weights` moves it to load time)."""
    from ..kernels import narrow_weights, packing

    packed = packing.pack_weight(w, v.lanes, v.kpack, np.dtype(v.w_dtype))  # also checks the values fit the dtype
    bits = narrow_weights.storage_bits(w, v.w_dtype)
    if bits is None:
        return relax.const(packed)
    n, k = w.shape
    key = ("unpack", n, k, v.lanes, v.kpack, v.w_dtype, bits)
    if key not in kernels:
        func, name = narrow_weights.unpack_func(n, k, v.lanes, v.kpack, v.w_dtype, bits)
        kernels[key] = bb.add_func(func, name)
    data, base = narrow_weights.pack(w, bits)
    return bb.emit(relax.call_tir(kernels[key], [relax.const(data), relax.const(base)],
                                  relax.TensorType(packed.shape, v.w_dtype)))


# matmul(dequantize(q, s_a, z_a), permute_dims(dequantize(W_codes, s_w, z_w))) [+ bias]: the canonical linear
_CODES = wildcard()  # q, the activation codes (matched as the value bound to them: code_bits reads its clip)
_X = is_op("relax.dequantize")(_CODES, is_const(), is_const())
_W = is_op("relax.dequantize")(is_const(), is_const(), is_const())
_WT = is_op("relax.permute_dims")(_W)
_LINEAR = is_op("relax.matmul")(_X, _WT)
_BIASED = is_op("relax.add")(_LINEAR, is_const())


def _parts(m):
    """(q, W_codes, s_w, z_w, s_a, z_a, q's bound value) of a `_LINEAR` match, or None where its attributes
    or constants do not fit: a transpose other than [1, 0], a weight not quantized per output channel
    (axis 0) or not 2-D, an activation quantizer that is not layer-wise."""
    xq, wt, wdq = m[_X], m[_WT], m[_W]
    if wt.attrs.axes is not None and [int(a) for a in wt.attrs.axes] != [1, 0]:
        return None
    if int(wdq.attrs.axis) != 0:
        return None
    w_codes, s_w, z_w = (_const(a) for a in wdq.args)
    s_a, z_a = _const(xq.args[1]), _const(xq.args[2])
    if w_codes.ndim != 2 or s_a.size != 1:
        return None
    return xq.args[0], w_codes, s_w, z_w, float(s_a.reshape(())), int(z_a.reshape(())), m[_CODES]


def _bias(add, parts):
    """The add's constant as the kernel's bias: 1-D, one value per output channel (else None)."""
    bias = _const(add.args[1])
    return bias if bias.ndim == 1 and bias.shape[0] == parts[1].shape[0] else None


def _emit(bb, target, kernels, q, w_codes, s_w, z_w, s_a, z_a, q_value, bias):
    """The kernel call replacing one linear: `qdense_call` on the codes (flattened to [M, K] there), result back
    in shape."""
    w = w_codes.astype(np.int32) - z_w.reshape(-1, 1).astype(np.int32)
    in_shape = _shape(q)
    n = w.shape[0]
    out = qdense_call(bb, q, w, s_w, s_a, z_a, code_bits(q_value), bias, target, kernels)
    return relax.op.reshape(out, [*in_shape[:-1], n])


@tvm.transform.module_pass(opt_level=0, name="LowerQuantizedLinear")
class LowerQuantizedLinear:
    """Quantized linear (dequantize · dequantized-weightᵀ [+ bias]) → one integer `repq_qdense` kernel.

    The fake-quant linear computes in float what is exactly an integer dot product of the codes: this pass
    replaces it by that dot product (int32 accumulation, packed weights, scales and bias in the kernel's
    epilogue), so the model's linears run on the target's integer dot instructions.  Two `tvm.relax.dpl`
    rewrites per function: first `_BIASED`, a linear whose matmul feeds only a constant 1-D bias add of
    its width (the kernel adds the bias, the add disappears), then `_LINEAR`, every quantized linear left
    (its add, if any, stays a float op).  `.rewritten` counts the kernels emitted.
    """

    def __init__(self, target):
        self.target, self.rewritten = target, 0

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        kernels = {}
        mod, self.rewritten = lower_with_bias(
            mod, _BIASED, _LINEAR, _parts, _bias,
            lambda bb, parts, bias: _emit(bb, self.target, kernels, *parts, bias))
        return mod
