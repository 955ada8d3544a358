"""MetaSchedule tuning: the integer kernels' design spaces, the check every tuned kernel passes, the trial plan,
`tune` → `compile --tuning-log` on the ViT fixture (logits equal to the untuned artifact's) and every bad log.

Tests hold on any x86 CPU: kernels for targets this CPU cannot run (VNNI on an AVX2 host, aarch64 sdot) are
checked through their plain-loop intrinsic twins, as `verify` does for a board.
"""

import json
import os
import re
import subprocess
import sys
import shutil

import numpy as np
import pytest
import tvm
from tvm.s_tir import Schedule, TensorIntrin
from tvm.script import tirx as T

from repq_tvm import data, models
from repq_tvm.cli import main
from repq_tvm.deploy.runtime import Runner
from repq_tvm.evaluate import load_batch, make_transform
from repq_tvm.kernels import attn_v as av
from repq_tvm.kernels import intrinsics_x86 as x86
from repq_tvm.kernels import log_weights as lw
from repq_tvm.kernels import qbmm as qb
from repq_tvm.kernels import qdense as qd
from repq_tvm.kernels.intrinsics_x86 import ref_name
from repq_tvm.reference.ops import attn_frac_bits, attn_groups
from repq_tvm.relax_util import scheduled_kernel
from repq_tvm.tuning import log as log_mod
from repq_tvm.tuning import spaces, tasks, verify
from repq_tvm.tuning import tune as tune_mod

TARGETS = {"vnni": qd.X86_VNNI_TARGET, "avx2_u8s8": qd.X86_AVX2_TARGET, "avx2_i16": qd.X86_AVX2_TARGET,
           "neon_sdot": qd.AARCH64_TARGET}
SPECS = [  # (M, N, K, variant, bits_a, bits_w): shapes of the fixtures and DeiT, ragged rows and columns
    (65, 128, 128, "vnni", 4, 4),
    (65, 384, 128, "vnni", 8, 8),  # compensated W8: row tiles outer only
    (65, 128, 512, "avx2_u8s8", 4, 4),  # int16 pre-accumulation depths 1, 2, 4
    (50, 72, 40, "avx2_i16", 8, 8),
    (65, 128, 128, "neon_sdot", 8, 8),
]


def spec_of(M, N, K, variant, bits_a, bits_w) -> dict:
    sch, *_ = qd.schedule_qdense(M, N, K, TARGETS[variant], bits_a=bits_a, bits_w=bits_w, variant=variant,
                                 epilogue=True, ref=True)
    return spaces.spec_of(sch.mod["main"])


def assert_sampled_candidates_match(spec: dict, target, seeds: int, stride: int, per_seed: int | None = None,
                                    key=lambda sch, rows: rows):
    """Design spaces sampled with ``seeds`` seeds, every ``stride``-th space (offset by the seed, at most
    ``per_seed``): each candidate equals the definition bit for bit, and ``key`` (of the trace and its sampled
    rows) takes more than one value: the decisions are really sampled."""
    definition = tvm.IRModule({"main": spaces.definition(spec)})
    seen = set()
    for seed in range(seeds):
        candidates = spaces.design_spaces(Schedule(definition, seed=seed + 1))
        assert len(candidates) >= 2
        for sch in candidates[seed::stride][:per_seed]:
            seen.add(key(sch, int(next(iter(sch.trace.decisions.values())))))
            assert verify.check(sch, definition, target, seed=seed) is None, str(sch.trace)
    assert len(seen) > 1


@pytest.mark.parametrize("shape", SPECS, ids=lambda s: f"{s[3]}-{s[0]}x{s[1]}x{s[2]}-a{s[4]}w{s[5]}")
def test_sampled_qdense_candidates_match_their_definition_bit_for_bit(shape):
    # a few structures per seed; distinct by loop order as well as rows
    assert_sampled_candidates_match(spec_of(*shape), TARGETS[shape[3]], seeds=3, stride=4, per_seed=2,
                                    key=lambda sch, rows: (str(sch.trace).count("reorder"), rows))


def test_column_codes_candidates_match_their_definition():
    """A qkv linear storing its thirds' codes (``column_codes``: quantizers [3, N] as its ``quant`` operand) is searched
    and verified like any linear: the verifier gives it a valid quantizer per column."""
    sch, *_ = qd.schedule_qdense(65, 384, 128, qd.X86_VNNI_TARGET, bits_a=8, bits_w=8, epilogue=True, ref=True,
                                 column_codes=255)
    spec = spaces.spec_of(sch.mod["main"])
    assert spec["column_codes"] == {"top": 255}
    assert_sampled_candidates_match(spec, TARGETS["vnni"], seeds=2, stride=4, per_seed=2)


def test_default_schedule_from_the_spec_is_the_hand_schedule():
    sch, *_ = qd.schedule_qdense(197, 384, 384, qd.X86_VNNI_TARGET, bits_a=8, bits_w=8, epilogue=True, ref=True)
    tvm.ir.assert_structural_equal(spaces.default_schedule(spaces.spec_of(sch.mod["main"]), ref=True).mod, sch.mod)


def test_column_blocks_are_the_hand_schedule_and_in_the_search_space():
    """A 1030-row int16 kernel with 320 KB of weights: the spec's default is `schedule_qdense`'s, in blocks of column
    tiles (`qdense.column_block`); its design spaces hold that order too (a sampled candidate checked bit for bit), a
    197-row kernel's none."""
    def blocked(sch):
        return len(sch.get_loops(sch.get_sblock("out"))) == 6  # blocks, row tiles, column tiles, then the tile's

    spec = spec_of(1030, 1024, 160, "avx2_i16", 8, 8)
    hand, *_ = qd.schedule_qdense(1030, 1024, 160, qd.X86_AVX2_TARGET, bits_a=8, bits_w=8, epilogue=True)
    tvm.ir.assert_structural_equal(spaces.default_schedule(spec).mod, hand.mod)
    assert blocked(hand)
    definition = tvm.IRModule({"main": spaces.definition(spec)})
    candidates = spaces.design_spaces(Schedule(definition, seed=1))
    assert 0 < sum(map(blocked, candidates)) < len(candidates)
    assert verify.check(next(filter(blocked, candidates)), definition, qd.X86_AVX2_TARGET) is None
    few = tvm.IRModule({"main": spaces.definition(spec_of(197, 1024, 160, "avx2_i16", 8, 8))})
    assert not any(map(blocked, spaces.design_spaces(Schedule(few, seed=1))))


def test_only_kernels_with_a_search_space_are_tuned():
    fallback, *_ = qd.schedule_qdense(65, 128, 128, qd.AARCH64_NEON_TARGET, bits_a=8, bits_w=8, epilogue=True)
    vnni, *_ = qd.schedule_qdense(65, 128, 128, qd.X86_VNNI_TARGET, bits_a=8, bits_w=8, epilogue=True, ref=True)
    assert spaces.spec_of(fallback.mod["main"])["variant"] == "fallback"
    assert not tasks.tunable(fallback.mod["main"]) and tasks.tunable(vnni.mod["main"])
    assert not tasks.tunable(_take) and tasks.tunable(_scale)  # data-dependent indexing: not timed on random data


ATTN_V_TARGETS = {"vnni_i16": qd.X86_VNNI_TARGET, "avx2_i16": qd.X86_AVX2_TARGET, "neon_udot": qd.AARCH64_TARGET,
                  "fallback": qd.AARCH64_NEON_TARGET}
ATTN_V_SHAPES = [  # (variant, Bt, M, N, D, groups = weight planes): DeiT-Small's heads and the ViT fixture's
    ("vnni_i16", 6, 197, 197, 64, 2),
    ("vnni_i16", 4, 65, 65, 32, 1),
    ("avx2_i16", 6, 197, 197, 64, 2),
    ("avx2_i16", 4, 65, 65, 32, 1),
    ("neon_udot", 4, 65, 65, 32, 2),  # two u8 weight bands (F = 14)
    ("neon_udot", 4, 65, 65, 32, 1),
]


def attn_v_spec(variant, Bt, M, N, D, groups) -> dict:
    sch, _ = av.schedule_attn_v(Bt, M, N, D, ATTN_V_TARGETS[variant], groups=groups, f=attn_frac_bits(N, 8),
                                variant=variant, ref=True)
    return spaces.spec_of(sch.mod["main"])


@pytest.mark.parametrize("shape", ATTN_V_SHAPES, ids=lambda s: f"{s[0]}-{'x'.join(map(str, s[1:5]))}-g{s[5]}")
def test_sampled_attn_v_candidates_match_their_definition_bit_for_bit(shape):
    assert_sampled_candidates_match(attn_v_spec(*shape), ATTN_V_TARGETS[shape[0]], seeds=2, stride=2)


@pytest.mark.parametrize("variant", list(ATTN_V_TARGETS))
def test_attn_v_default_schedule_from_the_spec_is_the_emitted_kernel(variant):
    for Bt, M, N, D, groups in ((6, 197, 197, 64, 2), (4, 65, 65, 32, 1)):
        f = attn_frac_bits(N, 8)
        func, name = av.attn_v_primfunc(Bt, M, N, D, ATTN_V_TARGETS[variant], groups=groups, f=f)
        spec = spaces.spec_of(func)
        assert spec["kind"] == "attn_v" and spec["variant"] == variant
        tvm.ir.assert_structural_equal(scheduled_kernel(spaces.default_schedule(spec), name), func)
        assert tasks.tunable(func) == (variant != "fallback")


QBMM_TARGETS = {"vnni": qd.X86_VNNI_TARGET, "avx2_i16": qd.X86_AVX2_TARGET, "neon_sdot": qd.AARCH64_TARGET,
                "fallback": qd.AARCH64_NEON_TARGET}
QBMM_SHAPES = [  # (variant, Bt, M, N, D, k layout)
    ("vnni", 6, 197, 197, 64, "nd"),
    ("vnni", 4, 65, 65, 32, "dn"),
    ("avx2_i16", 6, 197, 197, 64, "dn"),
    ("avx2_i16", 4, 65, 65, 32, "nd"),
    ("neon_sdot", 6, 197, 197, 64, "dn"),  # seed 0 samples the row-tiles-outer order, seed 1 the other
]


@pytest.mark.parametrize("shape", QBMM_SHAPES, ids=lambda s: f"{s[0]}-{'x'.join(map(str, s[1:5]))}-{s[5]}")
def test_sampled_qbmm_candidates_match_their_definition_bit_for_bit(shape):
    variant, Bt, M, N, D, layout = shape
    sch, _ = qb.schedule_qbmm(Bt, M, N, D, QBMM_TARGETS[variant], b_layout=layout, variant=variant, ref=True)
    assert_sampled_candidates_match(spaces.spec_of(sch.mod["main"]), QBMM_TARGETS[variant], seeds=2, stride=2)


@pytest.mark.parametrize("variant", list(QBMM_TARGETS))
def test_qbmm_default_schedule_from_the_spec_is_the_emitted_kernel(variant):
    for Bt, M, N, D, layout in ((6, 197, 197, 64, "dn"), (4, 65, 65, 32, "nd")):
        func, name = qb.qbmm_primfunc(Bt, M, N, D, QBMM_TARGETS[variant], b_layout=layout)
        spec = spaces.spec_of(func)
        assert spec["kind"] == "qbmm" and spec["variant"] == variant
        tvm.ir.assert_structural_equal(scheduled_kernel(spaces.default_schedule(spec), name), func)
        assert tasks.tunable(func) == (variant != "fallback")


LOG_WEIGHTS = [  # (shape, attention bits, softmax fused, target): DeiT-Small's heads and the ViT fixture's
    ((6, 197, 197), 8, True, qd.X86_VNNI_TARGET),
    ((4, 65, 65), 4, False, qd.X86_AVX2_TARGET),
]


def log_weights(shape, bits, softmax, target, scale=0.0123):
    """The kernel; from p (not ``softmax``) with ``scale`` in its thresholds, fused with log2(s) a run-time operand."""
    return lw.log_weights_primfunc(shape, bits, True, 14, attn_groups(bits, 14), tvm.target.Target(target),
                                   softmax=softmax, scale=None if softmax else scale)


@pytest.mark.parametrize("case", LOG_WEIGHTS, ids=lambda c: f"{'x'.join(map(str, c[0]))}-b{c[1]}-softmax{c[2]}")
def test_sampled_log_weights_candidates_match_their_definition(case):
    func, _ = log_weights(*case)
    assert_sampled_candidates_match(spaces.spec_of(func), case[3], seeds=2, stride=1)


def test_gelu_codes_kernels_of_every_layer_are_one_task_and_take_its_trace():
    """fc1 → GELU → codes kernels take their quantizer as an operand: every layer's is one kernel, one task, whose
    traced schedule applies to it; the plain kernel of the shape is another task; and a tuning log recorded when
    the quantizer was part of the kernel (spec ``gelu_codes`` = [scale, zero point, top]) keeps its task."""
    import json

    from tvm.s_tir import Schedule

    def spec(codes):
        sch, *_ = qd.schedule_qdense(65, 96, 128, qd.X86_AVX2_TARGET, bits_a=8, bits_w=8, variant="avx2_i16",
                                     epilogue=True, gelu_codes=codes)
        return spaces.spec_of(sch.mod["main"])

    a, plain = spec(255), spec(None)
    assert a["gelu_codes"] == {"top": 255}
    legacy = spaces.definition(a).with_attr("repq.kernel", json.dumps({**a, "gelu_codes": [0.021, 3, 255]}))
    funcs = (spaces.definition(a), legacy, spaces.definition(plain))
    keys = [tasks.group_key(tvm.IRModule({"main": f})) for f in funcs]
    assert keys[0] == keys[1] != keys[2]
    traced = spaces.design_spaces(Schedule(spaces.definition(a)))[0]
    other = Schedule(spaces.definition(a))
    traced.trace.apply_to_schedule(other, remove_postproc=False)
    assert spaces.spec_of(other.mod["main"]) == a
    assert other.trace.insts[-1].kind.name == traced.trace.insts[-1].kind.name


def test_log_weights_of_every_layer_share_one_task_on_the_emitted_schedule():
    """From p the scale is in the kernel (its thresholds) but not in the task; with the softmax fused it is a
    run-time operand: one kernel for every layer."""
    fused = log_weights((4, 65, 65), 8, True, qd.X86_AVX2_TARGET)[0]
    assert "scale" not in spaces.spec_of(fused) and [p.name for p in fused.params][1] == "log2s"
    func, name = log_weights((4, 65, 65), 8, False, qd.X86_AVX2_TARGET)
    other_scale, _ = log_weights((4, 65, 65), 8, False, qd.X86_AVX2_TARGET, scale=0.02)
    other_bits, _ = log_weights((4, 65, 65), 4, False, qd.X86_AVX2_TARGET)
    key = tasks.group_key(tasks.definition_of(func))
    assert tasks.group_key(tasks.definition_of(other_scale)) == key != tasks.group_key(tasks.definition_of(other_bits))
    spec = spaces.spec_of(func)
    emitted = scheduled_kernel(spaces.default_schedule(spec), name).with_attr("op_pattern", 8)
    tvm.ir.assert_structural_equal(emitted, func)
    assert tasks.tunable(func)
    # a schedule of another layer's thresholds is not this kernel: most codes move
    definition = tvm.IRModule({"main": spaces.definition(spec)})
    wrong = spaces.default_schedule(spaces.spec_of(other_scale))
    assert verify.check(wrong, definition, qd.X86_AVX2_TARGET).endswith("of outputs differ from the definition")


def test_replay_swaps_intrinsics_both_ways():
    spec = spec_of(65, 128, 128, "vnni", 4, 4)
    native = spaces.default_schedule(spec)
    twin = spaces.replay(spaces.definition(spec), native.trace, ref=True)
    # the VNNI kernel's intrinsic prefetches the next column tile's weights (`qdense.weight_prefetch`)
    intrin = r"repq_dot_16x4_vnni_pf\d+_\d+"
    assert re.search(intrin, str(native.trace)) and "_ref" not in str(native.trace)
    assert re.search(intrin + "_ref", str(twin.trace))
    back = spaces.replay(spaces.definition(spec), twin.trace, ref=False)
    tvm.ir.assert_structural_equal(back.mod, native.mod)


def test_committed_vnni_log_opens_in_a_fresh_process():
    """A fresh process has made none of the intrinsics registered on first use, yet the DeiT-S VNNI log's accepted
    linear names one (`qdense.weight_prefetch`): opening the log registers it from the records first."""
    log_dir = os.path.join(os.path.dirname(__file__), "..", "tuning_logs",
                           "deit_small_patch16_224-w8a8-b1-x86_64-avx512-vnni")
    with open(os.path.join(log_dir, "database_tuning_record.json")) as f:
        assert "repq_dot_16x4_vnni_pf" in f.read()
    code = ("import sys; from repq_tvm.tuning import log; "
            "print(len(log.open_accepted(sys.argv[1]).get_all_tuning_records()))")
    out = subprocess.run([sys.executable, "-c", code, log_dir], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) >= 1


def test_replay_registers_the_prefetching_intrinsics_a_trace_names():
    """Their registration is on first use: a trace from another process (a tuning log) names ones this process has
    not made yet, and replay registers them from the name."""
    name = ref_name(x86.vnni_intrin() + "_pf123456_7654320")
    assert TensorIntrin.get(name, allow_missing=True) is None
    x86.register_named(name)
    assert TensorIntrin.get(name, allow_missing=True) is not None
    x86.register_named("repq_dot_16x4_vnni_ref")  # a fixed intrinsic's name: nothing to make


@T.prim_func(s_tir=True)
def _triple(A: T.Buffer((256,), "int32"), B: T.Buffer((256,), "int32")):
    for i in range(256):
        with T.sblock("b"):
            vi = T.axis.spatial(256, i)
            B[vi] = A[vi] * 3


@T.prim_func(s_tir=True)
def _triple_off_by_one(A: T.Buffer((256,), "int32"), B: T.Buffer((256,), "int32")):
    for i in range(256):
        with T.sblock("b"):
            vi = T.axis.spatial(256, i)
            B[vi] = A[vi] * 3 + T.if_then_else(vi == 7, 1, 0)


@T.prim_func(s_tir=True)
def _take(A: T.Buffer((10,), "float32"), I: T.Buffer((4,), "int64"), B: T.Buffer((4,), "float32")):
    for i in range(4):
        with T.sblock("b"):
            vi = T.axis.spatial(4, i)
            B[vi] = A[I[vi]]


@T.prim_func(s_tir=True)
def _scale(A: T.Buffer((256,), "float32"), B: T.Buffer((256,), "float32")):
    for i in range(256):
        with T.sblock("b"):
            vi = T.axis.spatial(256, i)
            B[vi] = A[vi] * T.float32(3)


@T.prim_func(s_tir=True)
def _scale_wrong(A: T.Buffer((256,), "float32"), B: T.Buffer((256,), "float32")):
    for i in range(256):
        with T.sblock("b"):
            vi = T.axis.spatial(256, i)
            B[vi] = A[vi] * T.float32(3.01)


def test_verify_rejects_wrong_kernels_by_message():
    host = qd.host_target()
    spec = json.dumps({"kind": "qdense", "bits_a": 8, "bits_w": 8})
    exact = tvm.IRModule({"main": _triple.with_attr("repq.kernel", spec)})
    wrong = Schedule(tvm.IRModule({"main": _triple_off_by_one.with_attr("repq.kernel", spec)}))
    assert verify.check(Schedule(exact), exact, host) is None
    assert verify.check(wrong, exact, host) == "1 of 256 outputs differ from the definition (max 1)"
    # a float kernel: within float32 reordering error passes, a wrong constant does not
    floats = tvm.IRModule({"main": _scale})
    assert verify.check(Schedule(floats), floats, host) is None
    problem = verify.check(Schedule(tvm.IRModule({"main": _scale_wrong})), floats, host)
    assert problem.startswith("max error ") and "against the definition" in problem


def test_trial_plan_follows_the_run_time_share_within_the_budget():
    assert tune_mod.plan_trials([0.5, 0.3, 0.15, 0.05, 0.001], 100) == [50, 30, 15, 5, 0]
    # small budgets: at least MIN_TRIALS a task, largest shares first, never past the budget
    assert tune_mod.plan_trials([0.5, 0.3, 0.2], 10) == [8, 2, 0]
    assert sum(tune_mod.plan_trials([0.2] * 5, 23)) == 23


# --- tune → compile --tuning-log on the ViT fixture ---------------------------------------------------
@pytest.fixture(scope="module")
def tuned(vit_host_build, tmp_path_factory, monkeypatch_module):
    """A tuning log of the ViT fixture (16 trials), every verified candidate accepted (speed alone depends on the
    machine's noise; here the log must hold kernels so that compile applies them), and its tuned artifact."""
    cal, art = vit_host_build
    root = tmp_path_factory.mktemp("tuned")
    log_dir, tuned_art = str(root / "log"), str(root / "art")
    monkeypatch_module.setattr(tune_mod, "MARGIN", -1e9)
    assert main(["tune", cal, "--trials", "16", "-o", log_dir, "--quiet", "--json"]) == 0
    assert main(["compile", cal, "-o", tuned_art, "--tuning-log", log_dir, "--quiet"]) == 0
    return cal, art, log_dir, tuned_art


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_tuned_artifact_matches_the_untuned_one(tuned):
    cal, art, log_dir, tuned_art = tuned
    manifest = json.load(open(os.path.join(log_dir, "tuning.json")))
    accepted = [r for r in manifest["kernels"] if r["verdict"] == "accepted"]
    # the budget is planned over the tasks by their run-time share (this machine's timings: which tasks get trials
    # varies), and every task spends its plan unless its space ran out of candidates (then the next task gets the
    # rest); on AMX CPUs the linears and attn @ V are fixed kernels, and the fixture's float tasks have small spaces
    rows = manifest["kernels"]
    assert accepted and sum(r["trials"] for r in rows) > 0, manifest
    assert all(r["trials"] >= r["planned"] or r["exhausted"] for r in rows), manifest
    assert manifest["key"]["model"] == "vit_cifar10" and manifest["trials_per_minute"] > 0
    compiled = json.load(open(os.path.join(tuned_art, "manifest.json")))["compile"]
    assert compiled["tuning_log"]["tuned_kernels"] >= len(accepted)
    assert compiled["tuning_log"]["sha256"] == log_mod.TuningLog.open(log_dir).sha256
    # integer kernels are bit-exact; a tuned float kernel (LayerNorm's sums in another order) may move a
    # quantization code by one step: the logits agree to a small fraction of their range, the classes exactly
    a, b = Runner(art), Runner(tuned_art)
    source = data.open_images(models.fixture_file(models.FIXTURE_EVAL_DATA))
    x, _ = load_batch(source, np.linspace(0, len(source) - 1, 16).astype(int), make_transform(a.manifest["preprocessing"]))
    x = x.numpy()
    for i in range(len(x)):
        want, got = a(x[i: i + 1]), b(x[i: i + 1])
        assert want.argmax() == got.argmax()
        np.testing.assert_allclose(got, want, rtol=0, atol=0.02 * np.abs(want).max())


def test_a_rerun_resumes_from_the_search_database(tuned, capsys):
    cal, _, log_dir, _ = tuned
    before = json.load(open(os.path.join(log_dir, "tuning.json")))
    assert main(["tune", cal, "--trials", "16", "-o", log_dir, "--json"]) == 0
    out, err = capsys.readouterr()
    after = json.loads(out)
    assert after["trials_this_run"] == 0  # the budget was spent (or the spaces exhausted): nothing to search
    trials = lambda m: {r["kernel"]: r["trials"] for r in m["kernels"]}  # noqa: E731 (rows are in share order)
    assert trials(after) == trials(before)


def _copy(log_dir, tmp_path) -> str:
    dst = str(tmp_path / "log")
    shutil.copytree(log_dir, dst)
    return dst


def _one_error(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("repq-tvm: error: "), err
    for fragment in fragments:
        assert fragment in err, err


def test_bad_tuning_logs_are_one_line_errors(tuned, tmp_path, capsys):
    cal, _, log_dir, _ = tuned
    out = str(tmp_path / "art")
    _one_error(capsys, ["compile", cal, "-o", out, "--tuning-log", str(tmp_path / "nope")], "is not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_error(capsys, ["compile", cal, "-o", out, "--tuning-log", str(empty)], "has no tuning.json")
    corrupt = _copy(log_dir, tmp_path / "c")
    with open(os.path.join(corrupt, "database_tuning_record.json"), "a") as f:
        f.write("[0, garbage]\n")
    _one_error(capsys, ["compile", cal, "-o", out, "--tuning-log", corrupt], "changed since tuning")
    other = _copy(log_dir, tmp_path / "o")
    path = os.path.join(other, "tuning.json")
    manifest = json.load(open(path))
    manifest["key"]["w_bits"] = 8
    json.dump(manifest, open(path, "w"))
    _one_error(capsys, ["compile", cal, "-o", out, "--tuning-log", other], "made for w_bits 8", "for 4")
    with open(path, "w") as f:
        f.write("{not json")
    _one_error(capsys, ["compile", cal, "-o", out, "--tuning-log", other], "not JSON")
    other_target = "x86_64-avx2" if manifest["key"]["target"] != "x86_64-avx2" else "x86_64-avx512-vnni"
    _one_error(capsys, ["compile", cal, "-o", out, "--target", other_target, "--tuning-log", log_dir],
               "made for target")
    assert not os.path.exists(out)


def test_bad_tune_arguments_are_one_line_errors(vit_host_build, tmp_path, capsys, monkeypatch):
    cal, _ = vit_host_build
    _one_error(capsys, ["tune", cal, "--target", "no-such-preset", "-o", str(tmp_path / "l")], "no-such-preset")
    _one_error(capsys, ["tune", cal, "--rpc-tracker", "127.0.0.1:9", "-o", str(tmp_path / "l")], "--rpc-key")
    _one_error(capsys, ["tune", cal, "--trials", "0"], "--trials")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _one_error(capsys, ["tune", cal, "--target", str(bad), "-o", str(tmp_path / "l")], "bad.json")
    # before the model is even read (the .repq file need not exist):
    absent = str(tmp_path / "absent.repq")
    _one_error(capsys, ["tune", absent, "--target", "aarch64-neon-dotprod", "-o", str(tmp_path / "l")],
               "cannot run", "--rpc-tracker")
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no aarch64-linux-gnu-gcc
    _one_error(capsys, ["tune", absent, "--target", "aarch64-neon-dotprod", "-o", str(tmp_path / "l"),
                        "--rpc-tracker", "127.0.0.1:9", "--rpc-key", "rpi5"], "cross compiler aarch64-linux-gnu-gcc")
    assert not os.path.exists(tmp_path / "l")
