"""AMX-INT8 qdense (`kernels/qdense_amx`): exact on every CPU through its emulation, for real where AMX exists.

The emulation is the same kernel (blocking, ragged-M overlap, compensation, epilogue) with plain loops in
place of the tile instructions, compiled for the host: it runs on AVX2, Zen 4 and Sapphire Rapids alike.
The instructions and their operand order are checked in the assembly on every CPU; the native kernel runs
only where /proc/cpuinfo lists amx_int8 (skipped elsewhere, naming the flag).
"""

import re

import numpy as np
import pytest
import tvm

from conftest import extreme_codes
from repq_tvm import targets
from repq_tvm.kernels import packing as P
from repq_tvm.kernels import qdense as Q
from repq_tvm.kernels import qdense_amx
from repq_tvm.testing.qdense import build_qdense

AMX_TARGET = targets.tvm_target("x86_64-amx", 1)
HAS_AMX = {"amx_tile", "amx_int8"} <= targets.host_flags()
# (M, N, K, bits_a, bits_w): one block; a 16-row half block last (M % 32 = 1); K = 64 k steps of extreme 8-bit
# codes (|acc| < 2^24, so the float32 output holds the integer exactly); DeiT-Small's proj (half block); a ragged
# full last block (M % 32 = 18, overlap of 14 rows); ten row blocks and a half one; tasks over row blocks
# (M >= qdense_amx.ROWS_PARALLEL_M), the last a half block, then a ragged full one
SHAPES = [(32, 32, 64, 8, 8), (33, 64, 128, 8, 8), (65, 96, 192, 8, 6), (197, 384, 384, 4, 4), (50, 64, 128, 8, 8),
          (300, 64, 128, 8, 8), (520, 96, 128, 8, 8), (530, 64, 128, 8, 8)]
MODES = ["emulated", "native"]


def _build(M, N, K, bits_a, bits_w, mode):
    if mode == "native" and not HAS_AMX:
        pytest.skip("this CPU lacks amx_int8: the AMX kernel is checked through its emulation and its asm")
    target = AMX_TARGET if mode == "native" else Q.host_target(1)
    return build_qdense(M, N, K, target, variant="amx", bits_a=bits_a, bits_w=bits_w, epilogue=True,
                        ref=mode == "emulated")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("M,N,K,bits_a,bits_w", SHAPES)
def test_accumulator_is_exact(M, N, K, bits_a, bits_w, mode):
    """Unit epilogue (no zero point, scale 1, bias 0): the output is the int32 accumulator, compensation included."""
    a, w = extreme_codes(M, N, K, bits_a, bits_w, seed=M)
    kernel = _build(M, N, K, bits_a, bits_w, mode)
    assert kernel.compensate and kernel.tiles == (32, 2, 1)
    unit = (np.zeros(N, np.int32), np.ones(N, np.float32), np.zeros(N, np.float32))
    out = kernel(kernel.prepare_activation(a), *kernel.weight_args(w), *unit)
    acc = P.reference(a, w)
    assert np.abs(acc).max() < 2**24
    np.testing.assert_array_equal(out, acc.astype(np.float32))


@pytest.mark.parametrize("mode", MODES)
def test_epilogue_matches_numpy_and_the_vnni_stand_in(mode):
    M, N, K = 197, 384, 384
    a, w = extreme_codes(M, N, K, 8, 8, seed=5)
    rng = np.random.default_rng(6)
    a_scale, a_zp = 0.0213, 117
    w_scale = rng.uniform(1e-3, 2e-2, N).astype(np.float32)
    bias = rng.normal(0, 1, N).astype(np.float32)
    outs = []
    for kernel in (_build(M, N, K, 8, 8, mode),
                   build_qdense(M, N, K, Q.host_target(1), variant="vnni", epilogue=True, ref=True)):
        params = kernel.epilogue_params(w, w_scale, a_scale, a_zp, bias)
        outs.append(kernel(kernel.prepare_activation(a), *kernel.weight_args(w), *params))
    acc = (a.astype(np.float64) - a_zp) @ w.astype(np.float64).T
    expected = acc * (a_scale * w_scale.astype(np.float64)) + bias
    np.testing.assert_allclose(outs[0], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # the same float epilogue as the vnni kernel, up to the rounding of a fused multiply-add
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_assembly_has_the_tile_instructions_in_order():
    """AT&T ``tdpbusd src2, src1, dst``: src1 (u8) must be an A tile (tmm4/5), src2 (s8) a B tile (tmm6/7)."""
    sch, v, _, _ = Q.schedule_qdense(197, 384, 384, AMX_TARGET, variant="amx", epilogue=True)

    asm = tvm.compile(sch.mod, target=AMX_TARGET).mod.inspect_source("asm")
    dots = re.findall(r"tdpbusd\s+%tmm(\d),\s*%tmm(\d),\s*%tmm(\d)", asm)
    assert sorted(set(dots)) == [("6", "4", "0"), ("6", "5", "2"), ("7", "4", "1"), ("7", "5", "3")]
    for instr in ("ldtilecfg", "tileloadd", "tilestored", "tilezero", "tilerelease"):
        assert instr in asm, instr
    assert re.search(r"call\w*\s+.*syscall", asm), "the kernel must ask Linux for the AMX state"
    # the column tasks ask for the next block's weights into L2 while theirs run; prefetch=False leaves that out
    assert "prefetcht1" in asm
    plain, _, _, _ = Q.schedule_qdense(197, 384, 384, AMX_TARGET, variant="amx", epilogue=True, prefetch=False)
    assert "prefetch" not in tvm.compile(plain.mod, target=AMX_TARGET).mod.inspect_source("asm")


def test_variant_choice_and_shapes():
    assert Q.choose_variant(AMX_TARGET, 8, 8, (197, 384, 384)).name == "amx"
    assert Q.choose_variant(AMX_TARGET, 4, 4, (197, 1536, 382)).name == "amx"  # K pads to 384
    for shape in ((31, 384, 384), (197, 48, 384), (197, 384, 100)):
        assert not qdense_amx.fits(*shape) and Q.choose_variant(AMX_TARGET, 8, 8, shape).name == "vnni"
    assert Q.choose_variant(AMX_TARGET, 8, 8).name == "vnni"  # no shape: no epilogue, no AMX
    assert Q.choose_variant(Q.X86_VNNI_TARGET, 8, 8, (197, 384, 384)).name == "vnni"
    sch, v, _, compensate = Q.schedule_qdense(197, 384, 384, AMX_TARGET, epilogue=True)
    assert v.name == "amx" and compensate


def test_refusals_name_the_reason():
    with pytest.raises(ValueError, match="amx qdense exists only compensated and with the float epilogue"):
        Q.schedule_qdense(197, 384, 384, AMX_TARGET, variant="amx")
    with pytest.raises(ValueError, match=r"amx qdense needs M >= 32, N % 32 == 0 .* got 197x48x384"):
        Q.schedule_qdense(197, 48, 384, AMX_TARGET, variant="amx", epilogue=True)
    with pytest.raises(ValueError, match="lacks amx-int8 needed by amx"):
        Q.schedule_qdense(197, 384, 384, Q.X86_VNNI_TARGET, variant="amx", epilogue=True)


def test_native_kernel_refuses_to_run_without_amx(monkeypatch):
    """A CPU without AMX gets the runnable check's message, not SIGILL."""
    monkeypatch.setattr(targets, "host_flags", lambda: frozenset({"avx2", "fma", "avx512f", "avx512_vnni"}))
    kernel = build_qdense(32, 32, 64, AMX_TARGET, variant="amx", epilogue=True)
    with pytest.raises(targets.NotRunnable, match="needs AMX-TILE, AMX-INT8"):
        kernel.function()


@pytest.mark.parametrize("mode", MODES)
def test_qkv_codes_are_the_split_and_quantized_output(mode):
    """The qkv tail stores, per q/k/v, the codes of the float output's [B, heads, tokens, D] slice under its
    quantizer, the kernel's run-time operand: one compiled kernel, called with two sets of quantizers."""
    from tvm import te

    from repq_tvm.kernels import epilogue

    B, tokens, heads, D, K = 2, 65, 4, 32, 128
    M, N = B * tokens, 3 * heads * D
    a, w = extreme_codes(M, N, K, 8, 8, seed=9)
    rng = np.random.default_rng(10)
    params = (np.zeros(N, np.int32), np.full(N, 2e-6, np.float32), rng.normal(0, 1, N).astype(np.float32))
    cfg = {"tokens": tokens, "heads": heads, "codes": [(0.05, 120, 255), (0.04, 100, 255), (0.03, 130, 15)]}
    plain = _build(M, N, K, 8, 8, mode)
    y = plain(plain.prepare_activation(a), *plain.weight_args(w), *params)
    target = AMX_TARGET if mode == "native" else Q.host_target(1)
    fused = build_qdense(M, N, K, target, variant="amx", epilogue=True, ref=mode == "emulated", qkv_codes=cfg)
    split = y.reshape(B, tokens, 3, heads, D).transpose(2, 0, 3, 1, 4)  # [3, B, heads, tokens, D]
    x = te.placeholder((split[0].size,), "float32")
    for quantizers in (cfg["codes"], [(0.07, 131, 255), (0.021, 90, 255), (0.045, 128, 15)]):  # the same tops
        fused.qkv_codes = {**cfg, "codes": quantizers}  # what the harness passes as the kernel's quant operand
        out = fused(fused.prepare_activation(a), *fused.weight_args(w), *params)
        for i, codes in enumerate(quantizers):
            f = tvm.compile(te.create_prim_func([x, te.compute(x.shape, lambda j: epilogue.codes(x[j], *codes))]),
                            target=Q.host_target(1))
            expected = tvm.runtime.tensor(np.zeros(split[i].size, np.uint8))
            f(tvm.runtime.tensor(np.ascontiguousarray(split[i]).ravel()), expected)
            np.testing.assert_array_equal(out[i].ravel(), expected.numpy())
        assert len(np.unique(out[0])) > 100 and all(out[i].max() <= top for i, (_, _, top) in enumerate(quantizers))


def test_fast_macro_lookup_parses_the_same_kernel(monkeypatch):
    """`kernels.macro_lookup` (TVMScript's parser found by a frame walk, not `inspect.getouterframes`) gives the
    same PrimFunc as TVM's own lookup, on a kernel of nested macros (a GELU-codes tail over a half block)."""
    import inspect

    from tvm.script.parser.core.parser import ScriptMacro

    from repq_tvm.kernels import macro_lookup

    fast = qdense_amx.qdense_amx_func(50, 64, 128, gelu_codes=255)
    assert ScriptMacro._find_parser_def is macro_lookup._find_parser_def
    looked_up = []

    def tvm_lookup(self):  # TVM's own (tvm.script.parser.core.parser.ScriptMacro._find_parser_def)
        for info in inspect.getouterframes(inspect.currentframe()):
            parser = info.frame.f_globals.get(ScriptMacro.parser_object_name)
            if parser is not None:
                looked_up.append(parser)
                return parser
        raise RuntimeError("no parser")

    monkeypatch.setattr(ScriptMacro, "_find_parser_def", tvm_lookup)
    slow = qdense_amx.qdense_amx_func(50, 64, 128, gelu_codes=255)
    assert len(looked_up) >= 10  # the kernel did expand its macros through the lookup
    tvm.ir.assert_structural_equal(fast, slow)
