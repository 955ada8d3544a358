"""Lower ``attn @ V`` with a log-quantized attention to an integer dot product (`repq_tvm.kernels.attn_v`).

Matches, in the canonical form (see `repq_tvm.frontends`):

    â  = call_pure_packed("repq.log_sqrt2_fake_quant" | "repq.log2_fake_quant", p, s (f32 const), b)
    v̂  = dequantize(v_codes, s_v, z_v)                  layer-wise (scalar) s_v / z_v, non-constant uint8 codes
                                                         (v_codes = clip(quantize(..), 0, 2^b − 1) ⇒ b-bit V)
    y  = matmul(â, v̂)                                    float32, static shapes, rank ≥ 3, same leading dims

and emits

    w = int16 weights [.., P, M, Np] (`reference.ops.attn_weights`): 2^(F − s) in the plane of the code's
        parity, code = round(−m·log2(p / s)) (m = 2, P = 2 for log√2; m = 1, P = 1 for log2), shift
        s = ⌈code/m⌉ (0 in the other plane, and where the quantizer underflows or s > F), computed from p's
        exponent and mantissa bits with compile-time thresholds
        (`code_thresholds`): one TE function that TVM fuses into the softmax loop
    y = call_tir(repq_attn_v kernel, [w, v_codes, z_v, s·s_v/2^(F+G)])   leading dims folded into one batch,
        F = attn_frac_bits(N, b) ≤ 14: the fewer V bits or tokens, the more fractional bits fit int32

The kernel (`repq_tvm.kernels.attn_v`) computes `reference.ops.attn_v_acc` exactly: per parity an int16 dot
product Σ_n w·(v − z_v) in int32 (vpdpwssd on AVX-512 VNNI, vpmaddwd on AVX2, smlal on NEON), one √2
fixed-point multiply and one float multiply per output.
Other uses of the log quantizer (if any) keep the original call.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax, te
from tvm.relax.expr_functor import PyExprMutator, mutator
from tvm.s_tir import Schedule

from ..frontends.canonical import log_call_params
from ..reference.ops import ATTN_EXTRA_BITS, attn_frac_bits, attn_groups, attn_planes, sqrt2_weight
from ..relax_util import activation_dequant, batched_matmul_shapes, code_bits, follow, rewrite_pass, scheduled_kernel
from ..targets import target_has
from ..relax_util import is_op as _is_op
from ..relax_util import static_shape as _static_shape


def code_thresholds(scale: float, sqrt2: bool) -> tuple[int, list[int]]:
    """(offset, mantissa thresholds) so that for a normal float32 p = 2^(e−127)·(1 + mant/2^23):

        round(−m·log2(p/s)) = −m·(e − 127) + offset + #{k : mant ≤ thresholds[k]}

    With A = m·log2(s) = Li + Lf (Li integer, 0 ≤ Lf < 1) and t = −m·log2(1 + mant/2^23) ∈ (−m, 0],
    round(Lf + t) = −m + #{k ∈ {−m + ½, …, ½} : Lf + t ≥ k}, and Lf + t ≥ k ⇔ 1 + mant/2^23 ≤ 2^((Lf − k)/m).
    Computed in float64 at compile time; exact except where float32 log2 itself rounds across a boundary.
    """
    m = 2 if sqrt2 else 1
    a = m * math.log2(float(np.float32(scale)))
    li = math.floor(a)
    lf = a - li
    thresholds = []
    for i in range(m + 1):
        k = -m + 0.5 + i
        bound = (2.0 ** ((lf - k) / m) - 1.0) * 2 ** 23
        thresholds.append(int(min(max(math.floor(bound), -1), 2 ** 23)))
    return li - m, thresholds


def _code(x, i, m: int, offset: int, thresholds: list[int], top: int):
    """int32 log code of x[i] (−1 where the quantizer outputs 0: zero, negative, subnormal or past 2^b − 1)."""
    b = tvm.tirx.reinterpret("int32", x[i])
    mant = b & 0x7FFFFF
    raw = -m * ((b >> 23) - 127) + offset
    for t in thresholds:
        raw = raw + tvm.tirx.Select(mant <= t, 1, 0)
    dead = tvm.tirx.Or(b <= 0x7FFFFF, raw > top)
    return tvm.tirx.Select(dead, -1, tvm.tirx.max(raw, 0))


def log_weights_kernel(shape, scale: float, bits: int, sqrt2: bool, f: int, groups: int, target):
    """Scheduled PrimFunc ``main(p, w)``: int16 weights `reference.ops.attn_weights` [Bt, planes, M, Np] of
    p [Bt, M, N] (tokens padded to pairs), from p's float32 exponent and mantissa bits: no log per element
    (libm's logf does not vectorize and cost ~15 ns per attention entry), integer shifts, masks and compares
    (`code_thresholds`).  Codes go to a row buffer first (one vector pass per row), then each weight plane
    reads them: inlined, the code's expression tree was copied into every use and LLVM took minutes."""
    from ..kernels.attn_v import padded_tokens

    bt, rows, n = shape
    m = 2 if sqrt2 else 1
    offset, thresholds = code_thresholds(scale, sqrt2)
    top, parities, r_f = 2 ** bits - 1, m, sqrt2_weight(f)
    planes, n_p = attn_planes(parities, groups), padded_tokens(n)
    x = te.placeholder((bt, rows, n), "float32", name="p")
    codes = te.compute((bt, rows, n_p), lambda b, r, t: tvm.tirx.Select(
        t < n, _code(x, (b, r, tvm.tirx.min(t, n - 1)), m, offset, thresholds, top), -1), name="codes")
    one = tvm.tirx.const(1, "int32")

    def weight(b, plane, r, t):  # `reference.ops.attn_weights`
        c = codes[b, r, t]
        s = (c + 1) >> 1 if sqrt2 else c
        w0 = one << (f - tvm.tirx.max(tvm.tirx.min(s, f), 0))
        g0 = tvm.tirx.all(c >= 0, s <= f, ((c & 1) if sqrt2 else 0) == plane)
        if groups == 1:
            return tvm.tirx.Select(g0, w0, 0).astype("int16")
        rr = tvm.tirx.max(tvm.tirx.min(s - f - 1, f + 1), 0)
        w1 = (tvm.tirx.Select((c & 1) == 1, (r_f + ((one << rr) >> 1)) >> rr, (one << f) >> rr) if sqrt2
              else (one << f) >> rr)
        g1 = tvm.tirx.all(c >= 0, s > f, s <= 2 * f + 1)
        return tvm.tirx.Select(plane < parities, tvm.tirx.Select(g0, w0, 0),
                               tvm.tirx.Select(g1, w1, 0)).astype("int16")

    w = te.compute((bt, planes, rows, n_p), weight, name="w")
    sch = Schedule(te.create_prim_func([x, w]))
    blk = sch.get_sblock("w")
    b, pl, r, t = sch.get_loops(blk)
    sch.reorder(b, r, pl, t)
    task = sch.fuse(b, r)
    sch.parallel(task)
    lanes = 16 if target_has(target, "avx512f") else 8
    sch.vectorize(sch.split(t, [None, lanes])[1])
    cb = sch.get_sblock("codes")
    sch.compute_at(cb, task, preserve_unit_loops=True)
    sch.vectorize(sch.split(sch.get_loops(cb)[-1], [None, lanes])[1])
    name = f"repq_log_weights_{'sqrt2' if sqrt2 else 'log2'}_{bt}x{rows}x{n}_b{bits}_g{groups}_f{f}"
    # opaque (8): FuseOps must not pull the reshape of p into this hand-scheduled kernel
    return scheduled_kernel(sch, name).with_attr("op_pattern", 8), name


def log_weights(bb: relax.BlockBuilder, p: relax.Expr, scale: float, bits: int, sqrt2: bool, f: int,
                groups: int, target) -> relax.Expr:
    """Emit `log_weights_kernel` on p [.., M, N]; returns int16 [bt, planes, M, Np] (leading dims folded)."""
    shape = _static_shape(p)
    lead, (rows, n) = shape[:-2], shape[-2:]
    bt = int(np.prod(lead, dtype=np.int64))
    if len(lead) != 1:
        p = bb.emit(relax.op.reshape(p, [bt, rows, n]))
    func, name = log_weights_kernel((bt, rows, n), scale, bits, sqrt2, f, groups, target)
    gv = bb.add_func(func, name)
    from ..kernels.attn_v import padded_tokens

    planes = attn_planes(2 if sqrt2 else 1, groups)
    return bb.emit(relax.call_tir(gv, [p], relax.TensorType((bt, planes, rows, padded_tokens(n)), "int16")))


def v_code_bits(codes, z_v: int) -> int:
    """Bits b such that the V codes and z_v lie in [0, 2^b − 1]: from the canonical clip(q, lo, hi) on the
    codes (`frontends.canonical.uniform_qdq` emits one when b < 8), else 8 (any uint8)."""
    return max(code_bits(codes), int(z_v).bit_length())


def attn_v_call(bb: relax.BlockBuilder, weights: relax.Expr, v: relax.Expr, z_v: int, scale: float, f: int,
                parities: int, target, kernels: dict, v_bits: int = 8) -> relax.Expr:
    """Emit the kernel on int16 weights [Bt, planes, M, Np] (`log_weights`) and `v_bits`-bit uint8 V codes
    [.., N, D] (Bt = the product of the leading dims); returns float32 [.., M, D].

    `kernels` caches one PrimFunc per (shape, parities, F, v_bits): zero point and scale are run-time operands.
    """
    from ..kernels.attn_v import attn_v_primfunc

    (bt, planes, m, _), v_shape = _static_shape(weights), _static_shape(v)
    lead, (n, d) = v_shape[:-2], v_shape[-2:]
    key = (bt, m, n, d, parities, planes, f, v_bits)
    if key not in kernels:
        func, name = attn_v_primfunc(bt, m, n, d, target, parities=parities, groups=planes - parities + 1, f=f,
                                     v_bits=v_bits)
        kernels[key] = bb.add_func(func, name)
    if len(lead) != 1:
        v = bb.emit(relax.op.reshape(v, [bt, n, d]))
    params = [relax.const(np.array([z_v], np.int32)), relax.const(np.array([scale], np.float32))]
    out = relax.call_tir(kernels[key], [weights, v, *params], relax.TensorType((bt, m, d), "float32"))
    return out if len(lead) == 1 else relax.op.reshape(bb.emit(out), [*lead, m, d])


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, target):
        super().__init__(mod)
        self.target, self.rewritten, self.kernels = target, 0, {}

    def _log_quant(self, expr):
        """(p, s, bits, sqrt2) of a canonical log-quantizer call on float32, else None."""
        params = log_call_params(follow(self, expr))
        if params is None or params[0].ty.dtype != "float32" or not 1 <= params[2] <= 8 or params[1] <= 0:
            return None
        return params

    def _dequant(self, expr):
        """(codes, s_v, z_v, v_bits) of a layer-wise dequantize of non-constant uint8 codes, else None."""
        parts = activation_dequant(self, expr)
        if parts is None:
            return None
        codes, s, z = parts
        return codes, s, z, v_code_bits(follow(self, codes), z)

    def _match(self, call):
        if not _is_op(call, "relax.matmul") or call.ty.dtype != "float32":
            return None
        lq, dq = self._log_quant(call.args[0]), self._dequant(call.args[1])
        if lq is None or dq is None:
            return None
        if batched_matmul_shapes(lq[0], dq[0]) is None:
            return None
        return lq, dq

    def visit_call_(self, call):
        call = super().visit_call_(call)
        parts = self._match(call)
        if parts is None:
            return call
        (p, s_attn, bits, sqrt2), (v, s_v, z_v, v_bits) = parts
        f = attn_frac_bits(_static_shape(p)[-1], v_bits)
        weights = log_weights(self.builder_, p, s_attn, bits, sqrt2, f, attn_groups(bits, f, sqrt2), self.target)
        scale = float(np.float32(np.float64(s_attn) * np.float64(s_v) / 2.0 ** (f + ATTN_EXTRA_BITS)))
        self.rewritten += 1
        return attn_v_call(self.builder_, weights, v, z_v, scale, f, 2 if sqrt2 else 1, self.target, self.kernels,
                           v_bits)


LowerLog2Attention = rewrite_pass(
    "LowerLog2Attention", _Rewriter,
    "matmul(log-quantized attention, dequantized V) → int16 log√2 weights + integer dot product `repq_attn_v`.")
