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
from repq_tvm.kernels.attention_consts import attention_consts, log2_scale
from repq_tvm.kernels.attn_v import attn_v_primfunc, padded_tokens
from repq_tvm.kernels.log_weights import log2_scale_operand, log_weights_primfunc
from repq_tvm.kernels.qbmm import qbmm_primfunc
from repq_tvm.passes.fused_attention import FuseAttention
from repq_tvm.reference import ops

AMX = targets.tvm_target("x86_64-amx")
BT, M, N, D, BITS, S_ATTN = 6, 65, 65, 64, 8, 0.0073
F = ops.attn_frac_bits(N, 8)
GROUPS = ops.attn_groups(BITS, F, True)
QK_PARAMS = [relax.const(np.array([3, 130], np.int32)), relax.const(np.array([9e-4], np.float32))]
V_PARAMS = [relax.const(np.array([7], np.int32)), relax.const(np.array([3e-6], np.float32))]


def _log2s(scale):
    """The fused-softmax weights kernel's run-time log2(s), as `log2_attention` passes it."""
    return relax.const(log2_scale_operand(scale), "float64")


def _consts(scale, quantizers=None):
    """The fused kernel's ``consts`` argument, as `fused_attention` passes it."""
    return relax.const(attention_consts(log2_scale(scale), quantizers), "float64")


def _inputs():
    return [relax.Var(name, relax.TensorType((BT, rows, D), "uint8")) for name, rows in (("q", M), ("k", N), ("v", N))]


def _three_kernels(bb, target):
    """q @ kᵀ, the fused softmax → weights and attn @ V kernels of the heads here, added to ``bb``."""
    return (bb.add_func(qbmm_primfunc(BT, M, N, D, target)[0], "qk"),
            bb.add_func(log_weights_primfunc((BT, M, N), BITS, True, F, GROUPS, target, softmax=True)[0], "lw"),
            bb.add_func(attn_v_primfunc(BT, M, N, D, target, groups=GROUPS, f=F)[0], "av"))


def _before(target, extra_reader: bool = False) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    q, k, v = _inputs()
    qk, lw, av = _three_kernels(bb, target)
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            y = bb.emit(relax.call_tir(qk, relax.Tuple([q, k, *QK_PARAMS]), relax.TensorType((BT, M, N), "float32")))
            y4 = bb.emit(relax.op.reshape(y, [1, BT, M, N]))
            x = bb.emit(relax.op.reshape(y4, [BT, M, N]))
            w = bb.emit(relax.call_tir(lw, relax.Tuple([x, _log2s(S_ATTN)]),
                                       relax.TensorType((BT, GROUPS, M, padded_tokens(N)), "int16")))
            o = bb.emit(relax.call_tir(av, relax.Tuple([w, v, *V_PARAMS]), relax.TensorType((BT, M, D), "float32")))
            out = bb.emit_output(relax.Tuple([o, y]) if extra_reader else o)
        bb.emit_func_output(out)
    return bb.get()


def _after(variant: str = "amx") -> tvm.IRModule:
    spec = A.attention_spec(BT, M, N, D, bits=BITS, sqrt2=True, f=F, groups=GROUPS, v_bits=8)
    spec = {**spec, "variant": variant}
    name = A.kernel_name(spec)
    kernel = attention_vector.attention_func(spec).with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True) \
        .with_attr("op_pattern", 8)
    bb = relax.BlockBuilder()
    q, k, v = _inputs()
    fused = bb.add_func(kernel, name)
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            o = bb.emit_output(relax.call_tir(fused, relax.Tuple([q, k, *QK_PARAMS, v, *V_PARAMS,
                                                                   _consts(S_ATTN)]),
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


def test_blocks_with_other_softmax_scales_share_one_kernel():
    """Two blocks' attentions that differ only in the log quantizer's scale (one softmax kernel, each call with
    its own log2(s)): one fused kernel, each call with its own log2(s) in its ``consts``."""
    avx2 = targets.tvm_target("x86_64-avx2")
    bb = relax.BlockBuilder()
    q, k, v = _inputs()
    qk, lw, av = _three_kernels(bb, avx2)
    scales = (S_ATTN, 0.0112)
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            outs = []
            for s in scales:
                y = bb.emit(relax.call_tir(qk, relax.Tuple([q, k, *QK_PARAMS]), relax.TensorType((BT, M, N), "float32")))
                w = bb.emit(relax.call_tir(lw, relax.Tuple([y, _log2s(s)]),
                                           relax.TensorType((BT, GROUPS, M, padded_tokens(N)), "int16")))
                outs.append(bb.emit(relax.call_tir(av, relax.Tuple([w, v, *V_PARAMS]),
                                                   relax.TensorType((BT, M, D), "float32"))))
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    fuse = FuseAttention(avx2)
    after = fuse(bb.get())
    assert fuse.rewritten == 2
    assert [gv.name_hint for gv, f in after.functions_items() if isinstance(f, tvm.tirx.PrimFunc)] == [
        A.kernel_name({**A.attention_spec(BT, M, N, D, bits=BITS, sqrt2=True, f=F, groups=GROUPS, v_bits=8),
                       "variant": "avx2_i16"})]
    calls = [b.value for b in after["main"].body.blocks[0].bindings if isinstance(b.value, relax.Call)]
    assert len({c.args[0].name_hint for c in calls}) == 1
    assert [c.args[1].fields[-1].value.numpy()[0] for c in calls] == [log2_scale(s) for s in scales]


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


B, H = 2, 3  # BT = B·H heads of one qkv output
QUANTIZERS = [(0.031, 3, 255), (0.027, 130, 255), (0.05, 7, 255)]  # q, k, v: the zero points of QK_PARAMS, V_PARAMS


def _before_qkv(target, zps=(3, 130, 7), codes_read_elsewhere: bool = False) -> tvm.IRModule:
    """The attention of a qkv output x [B·T, 3·H·D] as the model has it: heads moved, thirds sliced, quantized."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((B * M, 3 * H * D), "float32"))
    qk, lw, av = _three_kernels(bb, target)
    with bb.function("main", [x]):
        with bb.dataflow():
            p = bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(x, [B, M, 3, H, D])), [2, 0, 3, 1, 4]))
            codes, quantized = [], []
            for i, ((s, _, _), z) in enumerate(zip(QUANTIZERS, zps)):
                third = bb.emit(relax.op.squeeze(bb.emit(relax.op.strided_slice(p, [0], [i], [i + 1])), [0]))
                c = bb.emit(relax.op.quantize(third, relax.const(s, "float32"), relax.const(z, "int8" if z < 128
                                                                                            else "uint8"), -1, "uint8"))
                quantized.append(c)
                codes.append(bb.emit(relax.op.reshape(c, [BT, M, D])))
            y = bb.emit(relax.call_tir(qk, relax.Tuple([codes[0], codes[1], *QK_PARAMS]),
                                       relax.TensorType((BT, M, N), "float32")))
            w = bb.emit(relax.call_tir(lw, relax.Tuple([y, _log2s(S_ATTN)]),
                                       relax.TensorType((BT, GROUPS, M, padded_tokens(N)), "int16")))
            o = relax.call_tir(av, relax.Tuple([w, codes[2], *V_PARAMS]), relax.TensorType((BT, M, D), "float32"))
            o = bb.emit_output(relax.Tuple([o, quantized[0]]) if codes_read_elsewhere else o)
        bb.emit_func_output(o)
    return bb.get()


def test_before_after_q_k_v_quantized_in_the_fused_kernel():
    """The vector kernel takes the qkv output itself: slices, head moves and quantizers go (one kernel call)."""
    avx2 = targets.tvm_target("x86_64-avx2")
    spec = {**A.attention_spec(BT, M, N, D, bits=BITS, sqrt2=True, f=F, groups=GROUPS, v_bits=8),
            "variant": "avx2_i16", "qkv": {"heads": H, "tops": [top for *_, top in QUANTIZERS]}}
    consts = _consts(S_ATTN, {slot: (s, z) for slot, (s, z, _) in zip("qkv", QUANTIZERS)})
    name = A.kernel_name(spec)
    assert name.endswith("_qkv")
    kernel = attention_vector.attention_func(spec).with_attr("global_symbol", name).with_attr(
        "tirx.is_scheduled", True).with_attr("op_pattern", 8)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((B * M, 3 * H * D), "float32"))
    fused = bb.add_func(kernel, name)
    with bb.function("main", [x]):
        with bb.dataflow():
            o = bb.emit_output(relax.call_tir(fused, relax.Tuple([x, QK_PARAMS[0], QK_PARAMS[1], *V_PARAMS,
                                                                   consts]),
                                              relax.TensorType((BT, M, D), "float32")))
        bb.emit_func_output(o)
    fuse = FuseAttention(avx2)
    tvm.ir.assert_structural_equal(fuse(_before_qkv(avx2)), bb.get())
    assert fuse.rewritten == 1


@pytest.mark.parametrize("case", [{"zps": (3, 131, 7)}, {"codes_read_elsewhere": True}])
def test_q_k_v_stay_codes_when_the_kernel_cannot_take_their_quantizers(case):
    """A quantizer whose zero point is not the one the attention kernels were given, or q's codes read elsewhere
    too (the kernel would quantize again what stays computed): the codes stay the kernel's inputs."""
    avx2 = targets.tvm_target("x86_64-avx2")
    out = FuseAttention(avx2)(_before_qkv(avx2, **case))
    (call,) = [b.value for b in out["main"].body.blocks[0].bindings if "repq_attention" in str(getattr(
        b.value, "args", [""])[0])]
    assert len(call.args[1].fields) == 8 and call.args[0].name_hint.endswith("_codes")


def test_amx_targets_keep_the_three_kernels_where_the_amx_kernel_does_not_fit():
    """Head dim 32 (Swin, the ViT fixture): no AMX attention; attn @ V stays on AMX tiles rather than the vector
    kernel (the two are not measured against each other)."""
    from repq_tvm.passes.fused_attention import attention_spec_of

    qk = {"Bt": 6, "M": 49, "N": 49, "D": 32, "b_layout": "nd"}
    lw = {"softmax": True, "shape": [6, 49, 49], "sqrt2": True, "groups": 2, "f": 14, "scale": 0.01, "bits": 8}
    av = {"Bt": 6, "M": 49, "N": 49, "D": 32, "epilogue": True, "groups": 2, "f": 14, "v_bits": 8}
    assert attention_spec_of(qk, lw, av, AMX) is None
    assert attention_spec_of(qk, lw, av, targets.tvm_target("x86_64-avx512-vnni"))["variant"] == "vnni"
    assert attention_spec_of({**qk, "D": 64}, lw, {**av, "D": 64}, AMX)["variant"] == "amx"
    assert attention_spec_of({**qk, "D": 64}, lw, {**av, "D": 64}, AMX, terms=1) is None  # the AMX kernel adds none


WINDOWS, MASKS = 2, 2  # BT = WINDOWS·H heads (H = 3): Swin's windows, two masks of shifted windows


def _terms():
    rng = np.random.default_rng(5)
    bias = (rng.standard_normal((1, H, M, N)) * 2).astype(np.float32)  # per head, as timm adds it
    mask = np.where(rng.random((MASKS, 1, M, N)) < 0.3, -100.0, 0.0).astype(np.float32)  # per window
    return bias, mask


def _before_terms(target, bias_first: bool = True) -> tvm.IRModule:
    """Swin's logits: q @ kᵀ in windows [W, H, T, T], + the relative position bias, + the shifted windows' mask
    (as [B, nW, H, T, T]), then the softmax."""
    bias, mask = _terms()
    bb = relax.BlockBuilder()
    q, k, v = _inputs()
    qk, lw, av = _three_kernels(bb, target)
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            y = bb.emit(relax.call_tir(qk, relax.Tuple([q, k, *QK_PARAMS]), relax.TensorType((BT, M, N), "float32")))
            y = bb.emit(relax.op.reshape(y, [WINDOWS, H, M, N]))
            if bias_first:
                y = bb.emit(relax.op.add(y, relax.const(bias)))
            y = bb.emit(relax.op.reshape(y, [WINDOWS // MASKS, MASKS, H, M, N]))
            y = bb.emit(relax.op.add(y, relax.const(mask)))
            x = bb.emit(relax.op.reshape(y, [BT, M, N]))
            w = bb.emit(relax.call_tir(lw, relax.Tuple([x, _log2s(S_ATTN)]),
                                       relax.TensorType((BT, GROUPS, M, padded_tokens(N)), "int16")))
            o = bb.emit_output(relax.call_tir(av, relax.Tuple([w, v, *V_PARAMS]), relax.TensorType((BT, M, D),
                                                                                                 "float32")))
        bb.emit_func_output(o)
    return bb.get()


def test_before_after_logit_terms():
    """The bias and the mask become the vector kernel's logit terms: tables of one row block per head (1, H) and per
    window (H, masks), keys padded to whole vectors, added in the graph's order."""
    avx2 = targets.tvm_target("x86_64-avx2")
    bias, mask = _terms()
    spec = {**A.attention_spec(BT, M, N, D, bits=BITS, sqrt2=True, f=F, groups=GROUPS, v_bits=8),
            "variant": "avx2_i16", "logit_terms": [[1, H], [H, MASKS]]}
    name = A.kernel_name(spec)
    kernel = attention_vector.attention_func(spec).with_attr("global_symbol", name).with_attr(
        "tirx.is_scheduled", True).with_attr("op_pattern", 8)
    pad = ((0, 0), (0, 0), (0, attention_vector.logit_term_shape(1, M, N)[2] - N))
    tables = [np.pad(bias[0], pad), np.pad(mask[:, 0], pad)]
    bb = relax.BlockBuilder()
    q, k, v = _inputs()
    fused = bb.add_func(kernel, name)
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            o = bb.emit_output(relax.call_tir(fused, relax.Tuple([q, k, *QK_PARAMS, v, *V_PARAMS,
                                                                   *map(relax.const, tables),
                                                                   _consts(S_ATTN)]),
                                              relax.TensorType((BT, M, D), "float32")))
        bb.emit_func_output(o)
    fuse = FuseAttention(avx2)
    tvm.ir.assert_structural_equal(fuse(_before_terms(avx2)), bb.get())
    assert fuse.rewritten == 1
    # the mask alone: one term, per window
    (call,) = [b.value for b in fuse(_before_terms(avx2, bias_first=False))["main"].body.blocks[0].bindings
               if "repq_attention" in str(getattr(b.value, "args", [""])[0])]
    assert call.args[0].name_hint.endswith("_t1_codes") and len(call.args[1].fields) == 9
    # on AMX (its kernel adds no terms) the three kernels stay
    assert FuseAttention(AMX)(_before_terms(AMX)).get_global_var("lw") is not None


def test_logit_term_tables_are_the_smallest_period():
    from repq_tvm.passes.fused_attention import _periodic

    rng = np.random.default_rng(0)
    per_head = rng.standard_normal((3, 4, 4))
    assert _periodic(np.tile(per_head, (4, 1, 1))) == (1, 3)  # 12 heads: the table of 3 repeats
    per_window = np.repeat(rng.standard_normal((2, 4, 4)), 3, axis=0)  # 2 windows x 3 heads
    assert _periodic(np.tile(per_window, (2, 1, 1))) == (3, 2)
    assert _periodic(np.zeros((6, 4, 4))) == (1, 1)
    assert _periodic(rng.standard_normal((6, 4, 4))) == (1, 6)  # no repetition: one table per head


def test_swin_fixture_same_logits_as_the_three_kernels(swin_w8_calibrated, tmp_path, monkeypatch, capfd):
    """The Swin fixture built for x86_64-avx2 (runs on every CPU here) with the attention passes and without them:
    every block's attention is one kernel (the relative position bias its logit term, q, k, v from the qkv output,
    proj's codes stored; no q@kᵀ, softmax, attn @ V, slice or heads → tokens → quantize kernel left), and with
    `row_moves` no cyclic shift kernel either (the window moves are the linears' row tables), and the logits are
    equal bit for bit.  W8/A8 on held-out images: with the product q·kᵀ·scale fused into the relative position
    bias's add by an FMA (`epilogue.as_stored`), 2 of these 32 images moved by up to 0.027 at these bit widths (none
    at W4/A4, nor on random inputs)."""
    import json
    import re
    import subprocess

    from repq_tvm import api, data, models
    from repq_tvm.deploy.runtime import Runner
    from repq_tvm.evaluate import load_batch, make_transform
    from repq_tvm.passes import pipeline

    cal = swin_w8_calibrated
    capfd.readouterr()
    api.compile_artifact(cal, str(tmp_path / "fused"), target="x86_64-avx2", progress=False)
    # the relative position bias's gather folds without TVM's "fast mode" take warning (`normalize._take_mode`)
    assert "Warning" not in capfd.readouterr().err
    with open(tmp_path / "fused" / "manifest.json") as f:
        stats = json.load(f)["compile"]
    assert stats["fused_attention"] == stats["fused_attention_out_codes"] == 6  # one per block
    assert stats["folded_row_moves"] > 0  # `row_moves`: the window moves into qkv and proj (no kernel of their own)
    without = [p for p in pipeline.INTEGER_PASSES
               if p[0] not in ("fused-attention", "attention-out-codes", "qkv-column-codes", "row-moves")]
    monkeypatch.setattr(pipeline, "INTEGER_PASSES", without)
    api.compile_artifact(cal, str(tmp_path / "plain"), target="x86_64-avx2", progress=False)

    def kernels(art):
        nm = subprocess.run(["nm", "-D", str(tmp_path / art / "model.so")], capture_output=True, text=True, check=True)
        return re.findall(r" T __tvm_ffi_(\S+)", nm.stdout)

    gone = r"repq_(qbmm|log_weights|attn_v)_|strided_slice\d*_squeeze"  # the three kernels, the q/k/v slices
    assert [k for k in kernels("fused") if re.search(gone, k)] == [] and len(
        [k for k in kernels("plain") if re.search(gone, k)]) >= 3
    moved = r"transpose\d*_reshape\d*_quantize"  # heads → tokens → quantize, and the windows' partition before qkv
    assert len([k for k in kernels("fused") if re.search(moved, k)]) < len([k for k in kernels("plain")
                                                                            if re.search(moved, k)])
    attention = [k for k in kernels("fused") if k.startswith("repq_attention_")]
    # q, k and v as the qkv kernels' codes (`qkv_column_codes`), the window moves those kernels' row tables
    assert [k for k in attention if re.search(r"_t1_qkv_codes_out_codes", k)]
    assert stats["fused_qkv_column_codes"] == stats["fused_attention"]
    # one kernel per shape and tail (the blocks' scales and quantizers are its run-time constants): no name with a
    # number TVM appends to tell copies apart, fewer kernels than blocks
    assert all(re.search(r"_out_codes$", k) for k in attention) and len(attention) < stats["fused_attention"]
    rolls = r"strided_slice\d*_strided_slice\d*_concatenate"  # the cyclic shifts
    assert [k for k in kernels("fused") if re.search(rolls, k)] == [] and len(
        [k for k in kernels("plain") if re.search(rolls, k)]) >= 2
    fused, plain = Runner(str(tmp_path / "fused")), Runner(str(tmp_path / "plain"))
    source = data.open_images(models.fixture_file(models.FIXTURE_EVAL_DATA))
    x, _ = load_batch(source, np.linspace(0, len(source) - 1, 32).astype(int),
                      make_transform(fused.manifest["preprocessing"]))
    logits = [fused.predict(x.numpy()), plain.predict(x.numpy())]
    differ = np.nonzero(np.abs(logits[0] - logits[1]).max(1))[0]
    assert differ.size == 0 and np.abs(logits[0]).max() > 0, f"images {differ.tolist()} differ"


def test_logit_terms_take_at_most_two_constants():
    """The walk from the softmax back to q @ kᵀ: two adds of constants become two terms in graph order, a third
    leaves the attention alone (the kernel adds two)."""
    from repq_tvm.passes.fused_attention import logit_terms
    from repq_tvm.relax_util import var_uses

    def chain(adds: int):
        bb = relax.BlockBuilder()
        y = relax.Var("y", relax.TensorType((BT, M, N), "float32"))
        with bb.function("main", [y]):
            with bb.dataflow():
                x = bb.emit(relax.op.reshape(y, [BT, M, N]))  # stands for q @ kᵀ's call
                start = x
                for i in range(adds):
                    x = bb.emit(relax.op.add(x, relax.const(np.full((1, M, N), i + 1, np.float32))))
                out = bb.emit_output(relax.op.reshape(x, [BT, M, N]))
            bb.emit_func_output(out)
        func = bb.get()["main"]
        bound = {b.var: b.value for block in func.body.blocks for b in block.bindings}
        stop = bound[start]
        softmax_input = func.body.blocks[0].bindings[-1].var
        return logit_terms(softmax_input, stop, bound, var_uses(func), (BT, M, N))

    divs, tables = chain(2)
    assert divs == [[1, 1], [1, 1]] and [t[0, 0, 0] for t in tables] == [1, 2]
    assert chain(3) is None and chain(0) == ([], [])
