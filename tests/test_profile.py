"""The roofline's parts: the peak micro-kernels (`deploy.peak`) and the profiler's MAC counts (`deploy.profile`).

The whole-model breakdown (coverage of every kernel call, its sum against the end-to-end median) is tested on
the compiled ViT fixture in test_compile.py.
"""

import pytest

from repq_tvm import targets
from repq_tvm.deploy import peak, profile

AVX2_ONLY_FLAGS = frozenset({"sse4_2", "avx", "avx2", "fma", "bmi2"})  # a Zen 3
VNNI_FLAGS = AVX2_ONLY_FLAGS | {"avx512f", "avx512bw", "avx512_vnni"}  # a Zen 4 or Sapphire Rapids


@pytest.mark.parametrize("name", peak.DEFAULT_FAMILIES)
def test_peak_kernel_has_its_instruction(name):
    """On any x86 host (building needs no CPU feature): LLVM emitted the instruction the family is named for."""
    assert peak.missing_instructions(name) == []


@pytest.mark.parametrize("name", peak.DEFAULT_FAMILIES)
def test_peak_is_measured_where_the_cpu_has_the_family_and_skipped_by_name_elsewhere(name):
    fam = peak.family_for(name)
    res = peak.measure_family(name, seconds=0.001, repeat=3)
    reason = peak.skip_reason(fam)
    if reason is not None:
        assert res["skipped"] == reason and "lacks" in reason
        pytest.skip(f"{name}: {reason}")
    assert res["gmacs_1t"] > 0 and res["gmacs_all"] > 0 and res["threads"] >= 1
    assert res["gops_1t"] == 2 * res["gmacs_1t"] and res["gops_all"] == 2 * res["gmacs_all"]
    assert res["gmacs_1t"] >= res["gmacs_1t_median"] > 0


def test_peak_skips_name_the_missing_feature():
    vnni = peak.measure_family("vnni", flags=AVX2_ONLY_FLAGS)
    assert "AVX-512 VNNI" in vnni["skipped"] and "avx512_vnni" in vnni["skipped"]
    assert "AVX2" in peak.measure_family("avx2_i16", flags=frozenset({"sse4_2"}))["skipped"]
    assert peak.skip_reason(peak.family_for("vnni", VNNI_FLAGS), VNNI_FLAGS) is None
    arm = peak.skip_reason(peak.FAMILIES["avx2_u8s8"], flags=VNNI_FLAGS, machine="aarch64")
    assert "aarch64" in arm
    # fp32 reference: zmm with AVX-512F, ymm without
    assert "zmm" in peak.family_for("fp32_fma", VNNI_FLAGS).instruction
    assert "ymm" in peak.family_for("fp32_fma", AVX2_ONLY_FLAGS).instruction


def test_target_int8_family_matches_the_presets():
    for name in ("x86_64-avx512-vnni", "x86_64-avx2"):
        assert peak.TARGET_FAMILY[targets.load(name)["int8_dot"]] in peak.FAMILIES


def test_integer_kernel_macs_from_shapes():
    m, n, k = 197, 1536, 384
    qdense = [(m, k), (n // 16, k // 4, 16, 4), (n,), (n,), (n,), (n,), (m, n)]  # compensated: one more (N,)
    assert profile.kernel_macs("repq_qdense_vnni_197x1536x384_a8w8c", qdense) == m * n * k
    bt, m, n, d = 6, 197, 197, 64
    assert profile.kernel_macs("repq_qbmm_avx2_i16_6x197x197x64_nd", [(bt, m, d), (bt, n, d), (2,), (1,),
                                                                      (bt, m, n)]) == bt * m * n * d
    assert profile.kernel_macs("repq_attn_v_vnni_i16_6x197x197x64_g2_v8_f14",
                               [(bt, 2, m, n + 1), (bt, n, d), (1,), (1,), (bt, m, d)]) == bt * m * n * d
    fused = "repq_attention_avx2_i16_6x197x197x64_sqrt2_b8_g2_v8_f14"  # both products: q@kᵀ and attn@V
    assert profile.kernel_macs(fused, [(bt, m, d), (bt, n, d), (2,), (1,), (bt, n, d), (1,), (1,),
                                       (bt, m, d)]) == 2 * bt * m * n * d
    assert profile.kernel_macs(fused + "_qkv", [(2 * 197, 3 * 3 * d), (2,), (1,), (1,), (1,),
                                                (bt, m, d)]) == 2 * bt * m * m * d  # y of 2 images x 3 heads
    assert profile.kernel_macs("fused_softmax_log_codes", [(6, 197, 197), (6, 197, 197)]) is None


def test_kernel_work_counts_what_the_instructions_execute():
    m, n, k = 197, 1536, 384
    qdense = [(m, k), (n // 16, k // 4, 16, 4), (n,), (n,), (n,), (n,), (m, n)]
    assert profile.kernel_work("repq_qdense_vnni_197x1536x384_a8w8c", qdense, "vnni") == {"vnni": m * n * k}
    bt, m, n, d = 6, 197, 197, 64
    useful = bt * m * n * d
    attn_v = [(bt, 2, m, n + 1), (bt, n, d), (1,), (1,), (bt, m, d)]
    # attn @ V: one int16 dot product per weight plane
    assert profile.kernel_work("repq_attn_v_vnni_i16_6x197x197x64_g2_v8_f14", attn_v, "vnni") == {
        "vnni_i16": 2 * useful}
    fused = [(bt, m, d), (bt, n, d), (2,), (1,), (bt, n, d), (1,), (1,), (bt, m, d)]
    # the fused attention: q @ kᵀ on vpdpbusd, the planes on vpdpwssd; on AVX2 both on vpmaddwd
    assert profile.kernel_work("repq_attention_vnni_6x197x197x64_sqrt2_b8_g2_v8_f14_codes", fused, "vnni") == {
        "vnni": useful, "vnni_i16": 2 * useful}
    assert profile.kernel_work("repq_attention_avx2_i16_6x197x197x64_log2_b4_g1_v4_f14_codes", fused, "avx2") == {
        "avx2_i16": 2 * useful}
    # no simple count: the AMX attention's u8 weight bands, kernels without a family, float kernels
    assert profile.kernel_work("repq_attention_amx_6x197x197x64_sqrt2_b8_g2_v8_f14_codes", fused, "amx") is None
    assert profile.kernel_work("repq_attn_v_fallback_6x197x197x64_g2_v8_f14", attn_v, "sdot") is None
    assert profile.kernel_work("fused_layer_norm_quantize", [(197, 384), (197, 384)], "vnni") is None


def test_floor_is_the_work_at_the_measured_peaks():
    measured = {"vnni": {"gmacs_all": 400.0}, "vnni_i16": {"gmacs_all": 200.0},
                "amx": {"skipped": "this CPU lacks AMX-INT8 (amx_int8)"}}
    assert profile.floor_ms({"vnni": 4e9, "vnni_i16": 1e9}, measured) == pytest.approx(10.0 + 5.0)
    assert profile.floor_ms({"amx": 4e9}, measured) is None  # the family was not measured on this CPU
    assert profile.floor_ms(None, measured) is None


def test_kernel_family():
    assert profile.kernel_family("repq_qdense_vnni_65x384x128_a4w4", "vnni") == "vnni"
    assert profile.kernel_family("repq_qdense_avx2_i16_65x384x128_a8w8", "avx2") == "avx2_i16"
    assert profile.kernel_family("repq_qdense_avx2_u8s8_65x384x128_a4w4", "avx2") == "avx2_u8s8"
    assert profile.kernel_family("repq_qbmm_avx2_i16_4x65x65x32_nd", "avx2") == "avx2_i16"
    assert profile.kernel_family("repq_qbmm_vnni_4x65x65x32_nd", "vnni") == "vnni"
    assert profile.kernel_family("repq_attn_v_vnni_i16_4x65x65x32_g2_v4_f14", "vnni") == "vnni_i16"
    assert profile.kernel_family("repq_attn_v_fallback_4x65x65x32_g2_v4_f14", "sdot") is None
    assert profile.kernel_family("repq_qdense_fallback_65x384x128_a4w4", "sdot") is None
    assert profile.kernel_family("fused_layer_norm", "vnni") is None


def test_best_peak_keeps_the_faster_round_of_each_rate():
    slow = {"family": "avx2_i16", "gmacs_1t": 60.0, "gmacs_all": 72.0, "gops_all": 144.0, "threads": 2}
    fast = {"family": "avx2_i16", "gmacs_1t": 55.0, "gmacs_all": 150.0, "gops_all": 300.0, "threads": 2}
    merged = profile.best_peak(profile.best_peak(None, slow), fast)
    assert merged == {"family": "avx2_i16", "gmacs_1t": 60.0, "gmacs_all": 150.0, "gops_all": 300.0, "threads": 2}
    skipped = {"family": "vnni", "skipped": "this CPU lacks AVX-512 VNNI (avx512_vnni)"}
    assert profile.best_peak(profile.best_peak(None, skipped), skipped) == skipped


def _row(name, macs, ms, alone, family, peak_gmacs):
    gm, gm_alone = macs / (ms * 1e6), macs / (alone * 1e6)
    return {"group": name, "macs_per_run": macs, "ms_per_run": ms, "standalone_ms_per_run": alone,
            "peak_family": family, "peak_gmacs": peak_gmacs, "pct_of_peak": 100 * gm / peak_gmacs,
            "standalone_pct_of_peak": 100 * gm_alone / peak_gmacs}


def test_roofline_summary_puts_the_run_against_the_peaks():
    # two linears on vnni (400 GMAC/s peak) and an attn@V on vnni_i16 (200), a float kernel without MACs
    fc1 = _row("repq_qdense_vnni_fc1", 1.2e9, 4.0, 3.0, "vnni", 400.0)  # 75% in the model, 100% alone
    qkv = _row("repq_qdense_vnni_qkv", 0.8e9, 4.0, 2.5, "vnni", 400.0)  # 50%, 80%
    attn = _row("repq_attn_v_vnni_i16_x", 0.2e9, 2.0, 2.0, "vnni_i16", 200.0)
    head = _row("repq_qdense_vnni_1x1000x384", 0.0004e9, 0.01, 0.005, "vnni", 400.0)  # 10%: below 1% of the MACs
    result = {"median_ms": 12.0, "groups": [fc1, qkv, attn, head, {"group": "fused_layer_norm", "ms_per_run": 1.0}],
              "peak": {"families": {"vnni": {"gmacs_all": 400.0}, "vnni_i16": {"gmacs_all": 200.0},
                                    "amx": {"skipped": "this CPU lacks AMX-INT8 (amx_int8)"}}}}
    s = profile.roofline_summary(result)
    assert s["integer_gmac_per_run"] == pytest.approx(2.2004)
    assert s["gmacs"] == pytest.approx(2.2004e9 / 12e6)  # 183.4 GMAC/s over the end-to-end median
    # against vpdpbusd and the linears' families, not the attention planes' vpdpwssd (measured for the floor)
    assert s["pct_of_peak"] == pytest.approx({"vnni": 100 * 183.37 / 400}, rel=1e-4)
    lin = s["linears"]  # 2.0004e9 MACs take 5.001 ms at 400 GMAC/s: of 8.01 in the model, 5.505 alone
    assert lin["efficiency"] == pytest.approx(100 * 5.001 / 8.01)
    assert lin["standalone_efficiency"] == pytest.approx(100 * 5.001 / 5.505)
    assert (lin["lowest"], lin["lowest_standalone"]) == ("repq_qdense_vnni_qkv", "repq_qdense_vnni_qkv")
    assert (lin["lowest_pct"], lin["lowest_standalone_pct"]) == (pytest.approx(50), pytest.approx(80))
    text = "\n".join(profile.format_report({**result, "summary": s, "threads": 2, "runs": 3, "batch": 1,
                                            "p90_ms": 13.0, "min_ms": 11.0, "kernel_calls": 5,
                                            "kernels_sum_ms": 11.0, "standalone_sum_ms": 8.5,
                                            "kernels_over_e2e": 11 / 12, "standalone_over_e2e": 8.5 / 12,
                                            "groups": [{**r, "calls_per_run": 1, "share": 0.25} for r in
                                                       [fc1, qkv, attn, head]]}))
    assert "integer work 2.20 GMAC per run at the end-to-end median: 183 GMAC/s = 46% of vnni (measured peaks)" in text
    assert "linears at 62% of their family's peak in the model, 91% standalone; lowest 50% (repq_qdense_vnni_qkv)" \
        in text
    assert "floor" not in s  # the rows carry no floor
    # with floors: the integer kernels' summed, and the other kernels' time as measured
    floors = {"repq_qdense_vnni_fc1": 3.0, "repq_qdense_vnni_qkv": 2.0, "repq_attn_v_vnni_i16_x": 1.0,
              "repq_qdense_vnni_1x1000x384": 0.001}
    groups = [{**r, "bound_ms_per_run": floors[r["group"]]} if "macs_per_run" in r else r for r in result["groups"]]
    s = profile.roofline_summary({**result, "groups": groups})
    assert s["floor"] == pytest.approx({"integer_ms": 6.001, "integer_model_ms": 10.01, "other_ms": 1.0, "ms": 7.001})
    text = "\n".join(profile.format_report({**result, "summary": s, "threads": 2, "runs": 3, "batch": 1,
                                            "p90_ms": 13.0, "min_ms": 11.0, "kernel_calls": 5,
                                            "kernels_sum_ms": 11.0, "standalone_sum_ms": 8.5,
                                            "kernels_over_e2e": 11 / 12, "standalone_over_e2e": 8.5 / 12,
                                            "groups": [{**r, "calls_per_run": 1, "share": 0.25} for r in groups
                                                       if "macs_per_run" in r]}))
    assert ("floor: the integer kernels' dot products at the measured peaks 6.00 ms (in the model they took 10.01: "
            "60%) + the other kernels 1.00 = 7.00 ms, against 12.00 end to end") in text
    # one integer kernel without a floor (an AMX attention): no floor, rather than a low one
    groups[2] = {**groups[2], "bound_ms_per_run": None}
    assert "floor" not in profile.roofline_summary({**result, "groups": groups})
    # nothing measured (--no peaks, or no integer kernel): no summary
    assert profile.roofline_summary({**result, "peak": {"families": {}}}) == {}


def test_kernel_groups_sum_the_copies_of_one_kind():
    """Per-block copies group by kind: TVM's fused copies, fc1's GELU epilogues and the fused attentions (one per
    block: their constants differ); shared integer kernels keep their shapes and bit widths in the name."""
    from repq_tvm.deploy.profile import kernel_group

    assert kernel_group("fused_softmax_log_codes7") == kernel_group("fused_softmax_log_codes") == \
        "fused_softmax_log_codes"
    gelu = "repq_qdense_avx2_i16_197x1536x384_a8w8_gelu"
    assert kernel_group(gelu + "0") == kernel_group(gelu + "11") == gelu
    for att in ("repq_attention_avx2_i16_6x197x197x64_sqrt2_b8_g2_v8_f14_qkv",
                "repq_attention_vnni_6x197x197x64_sqrt2_b8_g2_v8_f14_codes"):
        assert kernel_group(att) == kernel_group(att + "10") == att
    assert kernel_group("repq_qdense_vnni_197x384x384_a8w8_res0") == "repq_qdense_vnni_197x384x384_a8w8_res"
    assert kernel_group("repq_qdense_vnni_197x1152x384_a8w8") == "repq_qdense_vnni_197x1152x384_a8w8"
    assert kernel_group("repq_qbmm_avx2_i16_6x197x197x64_nd") == "repq_qbmm_avx2_i16_6x197x197x64_nd"


def test_chart_labels_keep_both_ends_of_long_kernel_names():
    """Swin's fused attentions differ only near the end of their names (one or two logit terms): cut at a width they
    would be one label, so one bar of the chart."""
    t1 = "repq_attention_avx2_i16_192x49x49x32_sqrt2_b8_g2_v8_f14_t1_qkv_out_codes"
    t2 = t1.replace("_t1_", "_t2_")
    short = [profile.short_name(n) for n in (t1, t2)]
    assert short[0] != short[1] and all(len(s) == 64 and "…" in s for s in short)
    assert short[0].startswith("repq_attention_avx2_i16_192x49x49x32") and short[0].endswith("f14_t1_qkv_out_codes")
    assert profile.short_name("fused_layer_norm_quantize") == "fused_layer_norm_quantize"
