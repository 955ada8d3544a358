"""Integer q @ kᵀ: the qbmm kernel is bit-exact; LowerQuantizedQK keeps the numbers and touches nothing else."""

import numpy as np
import pytest
import tvm
from tvm import relax

from repq_tvm.frontends import canonical
from repq_tvm.kernels.qbmm import schedule_qbmm
from repq_tvm.kernels.qdense import AARCH64_NEON_TARGET, AARCH64_TARGET, X86_AVX2_TARGET
from repq_tvm.passes.quantized_qk import LowerQuantizedQK, qbmm_call
from repq_tvm.reference import ops
from repq_tvm.testing.qbmm import QBmm

TARGET = X86_AVX2_TARGET  # the x86_64-avx2 preset
GENERIC_X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}  # no AVX2: the plain-loop fallback


# --- kernel ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,shape,layout,target", [
    (4, (3, 13, 11, 7), "nd", TARGET),  # ragged M, N, odd D
    (6, (2, 65, 65, 32), "nd", TARGET),  # ViT fixture attention
    (8, (4, 9, 17, 5), "dn", TARGET),  # k codes still transposed
    (8, (2, 1, 3, 1), "nd", TARGET),  # degenerate
    (6, (2, 10, 21, 6), "nd", GENERIC_X86),
    (8, (1, 7, 9, 3), "dn", GENERIC_X86),
])
def test_kernel_is_exact(bits, shape, layout, target):
    bt, m, n, d = shape
    rng = np.random.default_rng(bits + m)
    hi = 2 ** bits
    a = rng.integers(0, hi, (bt, m, d), dtype=np.uint8)
    b = rng.integers(0, hi, (bt, n, d), dtype=np.uint8)
    z_a, z_b = int(rng.integers(0, hi)), int(rng.integers(0, hi))
    kern = QBmm(bt, m, n, d, target, b_layout=layout)
    assert kern.variant == ("fallback" if target is GENERIC_X86 else "avx2_i16")
    out = kern(a, b if layout == "nd" else b.transpose(0, 2, 1), z_a, z_b)
    acc = ops.qmatmul_acc(a, z_a, b.transpose(0, 2, 1), z_b)
    assert np.array_equal(out, acc.astype(np.float32))
    # the scale is one float multiply per output
    np.testing.assert_array_equal(kern(a, b if layout == "nd" else b.transpose(0, 2, 1), z_a, z_b, 0.37),
                                  acc.astype(np.float32) * np.float32(0.37))


@pytest.mark.parametrize("ref", [True, False], ids=["stand-in", "vpdpbusd"])
@pytest.mark.parametrize("bits,shape,layout", [
    (8, (3, 13, 11, 7), "nd"),  # ragged M, N, D not a multiple of 4
    (8, (2, 65, 65, 32), "nd"),
    (4, (4, 9, 17, 5), "dn"),
    (8, (2, 1, 3, 1), "nd"),
])
def test_vnni_kernel_is_exact(bits, shape, layout, ref):
    """The VNNI variant (q codes x (k - 128) as s8, zero points folded into the epilogue) with extreme
    codes; as its portable stand-in on any CPU, with vpdpbusd where the CPU has AVX-512 VNNI."""
    from repq_tvm import targets

    if not ref and "avx512_vnni" not in targets.host_flags():
        pytest.skip("this CPU lacks avx512_vnni: checked through the stand-in and the asm")
    bt, m, n, d = shape
    rng = np.random.default_rng(bits + m)
    hi = 2 ** bits
    a = rng.integers(0, hi, (bt, m, d), dtype=np.uint8)
    b = rng.integers(0, hi, (bt, n, d), dtype=np.uint8)
    a[0, 0], b[0, 0] = hi - 1, 0  # the largest |(q - z_q)(k - z_k)| terms
    z_a, z_b = 0, hi - 1
    kern = QBmm(bt, m, n, d, targets.tvm_target("host"), b_layout=layout, variant="vnni", ref=ref)
    out = kern(a, b if layout == "nd" else b.transpose(0, 2, 1), z_a, z_b, 0.37)
    acc = ops.qmatmul_acc(a, z_a, b.transpose(0, 2, 1), z_b)
    assert np.array_equal(out, acc.astype(np.float32) * np.float32(0.37))


def test_vnni_target_uses_vpdpbusd():
    from repq_tvm.kernels.qdense import X86_VNNI_TARGET

    kern = QBmm(6, 197, 197, 64, X86_VNNI_TARGET)
    asm = kern.executable.mod.inspect_source("asm")
    assert kern.variant == "vnni" and "vpdpbusd" in asm and "vpmaddwd" not in asm


@pytest.mark.parametrize("layout", ["nd", "dn"])
@pytest.mark.parametrize("target,variant", [(AARCH64_TARGET, "neon_sdot"), (AARCH64_NEON_TARGET, "fallback")],
                         ids=["dotprod", "neon"])
def test_aarch64_kernels_compile(layout, target, variant):
    """sdot with the dot-product extension, the plain loops without (tests/test_kernel_arm.py checks both)."""
    sch, chosen = schedule_qbmm(3, 13, 11, 7, target, b_layout=layout)
    assert chosen == variant
    tvm.compile(sch.mod, target=tvm.target.Target(target))  # not run: wrong CPU


# --- pass ------------------------------------------------------------------------------------
S_Q, Z_Q, S_K, Z_K = 0.11, 7, 0.09, 9


def qk_module(lead, m, n, d, bits, transposed=True, multiplier=0.125, bias=False):
    """The frontend's attention logits: dequantized q @ dequantized kᵀ (· softmax scale) (+ rel-pos bias)."""
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((*lead, m, d), "float32"))
    k = relax.Var("k", relax.TensorType((*lead, n, d) if transposed else (*lead, d, n), "float32"))
    with bb.function("main", [q, k]):
        with bb.dataflow():
            rank = len(lead) + 2
            kt = bb.emit(relax.op.permute_dims(k, [*range(rank - 2), rank - 1, rank - 2])) if transposed else k
            qh = bb.emit(canonical.uniform_qdq(q, S_Q, Z_Q, bits))
            kh = bb.emit(canonical.uniform_qdq(kt, S_K, Z_K, bits))
            y = bb.emit(relax.op.matmul(qh, kh, out_dtype="float32"))
            if multiplier is not None:
                y = bb.emit(relax.op.multiply(y, relax.const(multiplier, "float32")))
            if bias:
                rng = np.random.default_rng(5)
                y = bb.emit(relax.op.add(y, relax.const(rng.standard_normal((lead[-1], m, n)).astype(np.float32))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def run(mod, *args):
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(TARGET)), tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(x) for x in args)).numpy()


def op_counts(mod):
    return canonical.canonical_ops(mod)


def kernel_scale(mod) -> float:
    """The scale operand of the (single) qbmm call_tir in main."""
    calls = []
    relax.analysis.post_order_visit(mod["main"], lambda e: calls.append(e) if isinstance(e, relax.Call) else None)
    (call,) = [c for c in calls if getattr(c.op, "name", "") == "relax.call_tir"]
    return float(call.args[1].fields[3].value.numpy()[0])


@pytest.mark.parametrize("bits,lead,m,n,d,transposed,multiplier,bias", [
    (4, (1, 4), 65, 65, 32, True, 0.125, False),  # ViT fixture
    (8, (6, 3), 16, 16, 8, True, 0.25, True),  # Swin: windows x heads, rel-pos bias after the scale
    (6, (2,), 9, 11, 5, False, None, False),  # rank 3, kᵀ given as is, no softmax scale
])
def test_pass_matches_fake_quant_graph(bits, lead, m, n, d, transposed, multiplier, bias):
    mod = qk_module(lead, m, n, d, bits, transposed=transposed, multiplier=multiplier, bias=bias)
    lower = LowerQuantizedQK(TARGET)
    lowered = lower(mod)
    assert lower.rewritten == 1
    counts = op_counts(lowered)
    assert counts["relax.matmul"] == 0 and counts["relax.multiply"] == 0  # the softmax scale was folded
    assert counts["relax.permute_dims"] == 0 and counts["relax.dequantize"] == 0
    assert counts["relax.add"] == int(bias)
    assert np.isclose(kernel_scale(lowered), S_Q * S_K * (multiplier or 1.0))
    name = next(gv.name_hint for gv in lowered.get_global_vars() if gv.name_hint.startswith("repq_qbmm"))
    assert name.endswith("_nd" if transposed else "_dn")
    rng = np.random.default_rng(bits)
    q = rng.standard_normal((*lead, m, d)).astype(np.float32)
    k = rng.standard_normal((*lead, n, d) if transposed else (*lead, d, n)).astype(np.float32)
    ref, out = run(mod, q, k), run(lowered, q, k)
    assert np.allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max()), np.abs(out - ref).max()


def test_multiply_is_kept_when_the_logits_have_another_use():
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((2, 5, 4), "float32"))
    k = relax.Var("k", relax.TensorType((2, 4, 6), "float32"))
    with bb.function("main", [q, k]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(bb.emit(canonical.uniform_qdq(q, S_Q, Z_Q, 8)),
                                        bb.emit(canonical.uniform_qdq(k, S_K, Z_K, 8))))
            z = bb.emit(relax.op.multiply(y, relax.const(0.5, "float32")))
            out = bb.emit_output(relax.op.add(y, z))
        bb.emit_func_output(out)
    lower = LowerQuantizedQK(TARGET)
    lowered = lower(bb.get())
    assert lower.rewritten == 1 and op_counts(lowered)["relax.multiply"] == 1
    assert np.isclose(kernel_scale(lowered), S_Q * S_K)  # the 0.5 stays outside



def test_linears_and_log_quant_attn_v_are_left_alone():
    bb = relax.BlockBuilder()
    attn = relax.Var("attn", relax.TensorType((1, 2, 9, 9), "float32"))
    v = relax.Var("v", relax.TensorType((1, 2, 9, 8), "float32"))
    with bb.function("main", [attn, v]):
        with bb.dataflow():
            p = bb.emit(relax.op.nn.softmax(attn))
            pq = bb.emit(canonical.log_fake_quant(p, p.ty, 0.9, 4))
            vh = bb.emit(canonical.uniform_qdq(v, 0.1, 8, 4))
            o = bb.emit(relax.op.matmul(pq, vh, out_dtype="float32"))  # attn @ V
            x = bb.emit(canonical.uniform_qdq(o, 0.2, 3, 4))
            w = relax.const(np.arange(48, dtype=np.uint8).reshape(6, 8) % 16)
            wh = bb.emit(canonical.weight_dq(w, relax.const(np.full(6, 0.01, np.float32)),
                                             relax.const(np.full(6, 8, np.uint8))))
            y = bb.emit(relax.op.matmul(x, relax.op.permute_dims(wh, [1, 0]), out_dtype="float32"))  # linear
            w3 = relax.const(np.ones((8, 5), np.uint8))  # constant codes without a transpose
            y3 = bb.emit(relax.op.matmul(x, relax.op.dequantize(w3, relax.const(0.5, "float32"),
                                                                relax.const(1, "uint8"), out_dtype="float32")))
            out = bb.emit_output(relax.Tuple([y, y3]))
        bb.emit_func_output(out)
    mod = bb.get()
    lower = LowerQuantizedQK(TARGET)
    lowered = lower(mod)
    assert lower.rewritten == 0
    tvm.ir.assert_structural_equal(lowered["main"], mod["main"])


# --- Before/After: the rewritten graph, structurally ----------------------------------------------
def test_before_after_logits_with_softmax_scale():
    """q codes · requantized k rows in one qbmm call ("nd"), the 0.125 in its scale: the dequantizes, the
    transposed k's quantizer, the matmul and the multiply are gone."""
    lower = LowerQuantizedQK(TARGET)
    after = lower(qk_module((4,), 9, 11, 8, 4))
    assert lower.rewritten == 1

    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((4, 9, 8), "float32"))
    k = relax.Var("k", relax.TensorType((4, 11, 8), "float32"))
    with bb.function("main", [q, k]):
        with bb.dataflow():
            q_codes = bb.emit(canonical.uniform_qdq(q, S_Q, Z_Q, 4).args[0])
            k_rows = bb.emit(canonical.uniform_qdq(k, S_K, Z_K, 4).args[0])  # quantized below the transpose
            scale = float(np.float32(S_Q)) * float(np.float32(S_K)) * 0.125
            out = bb.emit_output(qbmm_call(bb, q_codes, k_rows, Z_Q, Z_K, scale, TARGET, {}, "nd"))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get())


@pytest.mark.parametrize("case", ["per_channel_q_scale", "float_q"])
def test_before_after_unmatched_logits_are_left_alone(case):
    bb = relax.BlockBuilder()
    q = relax.Var("q", relax.TensorType((4, 9, 8), "float32"))
    k = relax.Var("k", relax.TensorType((4, 8, 11), "float32"))
    with bb.function("main", [q, k]):
        with bb.dataflow():
            if case == "float_q":
                qh = q
            else:
                codes = bb.emit(canonical.uniform_qdq(q, S_Q, Z_Q, 8).args[0])
                qh = bb.emit(relax.op.dequantize(codes, relax.const(np.full(8, S_Q, np.float32)),
                                                 relax.const(Z_Q, "uint8"), axis=-1))
            y = bb.emit(relax.op.matmul(qh, bb.emit(canonical.uniform_qdq(k, S_K, Z_K, 8)), out_dtype="float32"))
            out = bb.emit_output(relax.op.multiply(y, relax.const(0.125, "float32")))
        bb.emit_func_output(out)
    mod = bb.get()
    lower = LowerQuantizedQK(TARGET)
    tvm.ir.assert_structural_equal(lower(mod), mod)
    assert lower.rewritten == 0
