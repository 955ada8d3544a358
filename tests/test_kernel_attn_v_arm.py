"""attn @ V of the log√2 attention on Arm's udot (`kernels.attn_v`, variant "neon_udot"): exactness, codegen.

- The weight bands: every weight `reference.ops.attn_weights` makes is ``2^7·(W >> 7) + (W & 127)`` with both
  bytes in u8 (one band, ``W`` itself, when F ≤ 7).
- On any (x86) host the udot schedule runs through its portable stand-in ("ref": the same tensorized schedule,
  band split, V packing, start value and epilogue, with the plain-loop twin of udot), bit for bit against
  `reference.ops.attn_v_acc` and the float epilogue: F ≤ 7 and F = 14, one weight plane and two (groups 1 and 2),
  extreme V codes and zero points, sums at the int32 bound, ragged M / N / D; the spec interface of the tuning
  search.
- The aarch64-neon-dotprod build: indexed udot in the hot loop, nothing widening, no spills.
- Slow (`-m slow`, the arm64 sysroot of `make aarch64-sysroot`): the real udot under qemu-aarch64-static.
"""

import json
import re

import numpy as np
import pytest
import tvm
from tvm.s_tir import Schedule

from repq_tvm.kernels import attn_v as av
from repq_tvm.kernels import qdense as Q
from repq_tvm.kernels.intrinsics_arm import SDOT_DEPTHS, register_intrinsics, udot_intrin
from repq_tvm.kernels.intrinsics_x86 import ref_name
from repq_tvm.reference import ops
from repq_tvm.testing.attn_v import AttnV
from test_kernel_arm import _inner_loops, _run_under_qemu

HOST = Q.host_target(1)


def _operands(seed, shape, bits, sqrt2, v_bits, f):
    """(groups, weights, V codes, zero points): random log codes (20% dead) with row 0 all code 0 (the largest
    weight 2^F) and, with 2 groups, row 1 all code 2F + 1 (round(√2·2^F), all in plane 1); V with token
    0 at the largest code and token 1 at 0; zero points at both ends and in between."""
    Bt, M, N, D = shape
    rng = np.random.default_rng(seed)
    top = 2**bits - 1
    groups = ops.attn_groups(bits, f, sqrt2)
    codes = rng.integers(0, top + 1, (Bt, M, N))
    codes[:, 0] = 0
    if groups == 2 and M > 1:
        codes[:, 1] = (2 * f + 1) if sqrt2 else f + 1
    w = ops.attn_weights(codes, rng.random(codes.shape) < 0.2, f, sqrt2, groups)
    v_top = 2**v_bits - 1
    v = rng.integers(0, v_top + 1, (Bt, N, D)).astype(np.uint8)
    v[:, 0], v[:, min(1, N - 1)] = v_top, 0
    return groups, w, v, (0, v_top, int(rng.integers(0, v_top + 1)))


def _stand_in(shape, groups, f, v_bits, **kw):
    return AttnV(*shape, HOST, groups=groups, f=f, v_bits=v_bits, variant="neon_udot", ref=True, **kw)


# --- bands, variant choice, tiles ---------------------------------------------------------------
def test_weights_split_exactly_into_two_bytes():
    for f in range(1, ops.ATTN_MAX_F + 1):
        for sqrt2 in (True, False):
            codes = np.arange(256)[:, None]  # every code of up to 8 bits
            w = ops.attn_weights(codes, np.zeros_like(codes, bool), f, sqrt2, groups=2).astype(np.int64)
            hi, lo = w >> av.HI_SHIFT, w & ((1 << av.HI_SHIFT) - 1)
            assert np.array_equal((hi << av.HI_SHIFT) + lo, w) and w.min() >= 0
            assert hi.max() <= 255 and lo.max() <= 127  # bytes: 255 = (2^15 − 1) >> 7, plane 1's largest
            bands = av.weight_bands(f, 2)
            assert bands == (1 if f <= 7 else 2) and (bands == 2 or w.max() <= 255), (f, sqrt2)
    assert av.weight_bands(7, 1) == 1 and av.weight_bands(8, 1) == 2  # group 0 only: 2^F < 256


def test_variant_choice_and_tiles():
    assert av.variant_for(Q.AARCH64_TARGET) == "neon_udot" and av.variant_for(Q.AARCH64_NEON_TARGET) == "fallback"
    assert av.variant_for(Q.X86_VNNI_TARGET) == "vnni_i16" and av.variant_for(Q.X86_AVX2_TARGET) == "avx2_i16"
    with pytest.raises(ValueError, match="dotprod"):  # not for a target without the instruction ...
        av.schedule_attn_v(2, 5, 6, 8, Q.AARCH64_NEON_TARGET, variant="neon_udot")
    av.schedule_attn_v(2, 5, 6, 8, HOST, variant="neon_udot", ref=True)  # ... unless as its twin
    # DeiT-Small and ViT fixture heads: 2 planes (log√2 attention) x 5 rows, 1 plane (log2, shifts ≤ F) x 10
    assert [av.default_tiles(197, "neon_udot", p) for p in (2, 1)] == [(5, 2), (10, 2)]
    assert [av.default_tiles(65, "neon_udot", p) for p in (2, 1)] == [(5, 2), (6, 2)]  # 1 plane: 66 rows, not 70
    assert av.default_tiles(4, "neon_udot", 2) == (4, 2) and av.default_tiles(197, "fallback", 2) == (2, 4)
    for planes in (1, 2):
        rows, blocks = av.default_tiles(1000, "neon_udot", planes)
        assert planes * rows * blocks <= av.ACCUMULATORS["neon_udot"]


def test_udot_intrinsics_are_registered_with_their_twins():
    from tvm.s_tir import TensorIntrin

    register_intrinsics()
    for d in SDOT_DEPTHS:
        assert TensorIntrin.get(udot_intrin(d)) is not None and TensorIntrin.get(ref_name(udot_intrin(d))) is not None


# --- bit exactness through the portable stand-in ------------------------------------------------
# (bits, sqrt2, v_bits, (Bt, M, N, D), F): two bands (F = 14) and one (F ≤ 7); 2 planes (log√2; log2 of 8 bits: shifts
# past F), 1 (3-bit log2); ragged M, N (not a multiple of 8), D (of 8); the fixture's heads
CASES = [
    (8, True, 8, (2, 9, 11, 5), 14),
    (4, True, 4, (4, 65, 65, 32), 14),
    (8, False, 6, (1, 11, 29, 13), 14),
    (3, False, 8, (2, 13, 37, 20), 14),
    (8, True, 8, (2, 9, 11, 5), 7),
    (4, True, 8, (2, 7, 45, 19), 5),
    (3, False, 4, (1, 5, 65, 9), 7),
]


@pytest.mark.parametrize("bits,sqrt2,v_bits,shape,f", CASES, ids=[
    f"b{c[0]}{'s' if c[1] else 'l'}v{c[2]}-{'x'.join(map(str, c[3]))}-f{c[4]}" for c in CASES])
def test_udot_schedule_is_bit_exact_through_its_twin(bits, sqrt2, v_bits, shape, f):
    groups, w, v, zps = _operands(bits + f, shape, bits, sqrt2, v_bits, f)
    kernel = _stand_in(shape, groups, f, v_bits, epilogue=False)
    assert kernel.variant == "neon_udot"
    for z_v in zps:
        np.testing.assert_array_equal(kernel(w, v, z_v), ops.attn_v_acc(w, v, z_v, f, v_bits), str(z_v))


@pytest.mark.parametrize("n,v_bits", [(197, 8), (65, 4), (3136, 8)])
def test_sums_at_the_int32_bound_and_the_float_epilogue(n, v_bits):
    """Weights at their largest (2^F, plane 1's largest) against |v − z| = 2^b − 1 on every token: Σ W·(v − z), the
    hi band's 2^7·Σ hi·v and z·Σ W as large as the F `attn_frac_bits` picks allows (near 2^31 unless F is capped
    at 14); float output bit for bit."""
    f, top = ops.attn_frac_bits(n, v_bits), 2**v_bits - 1
    assert n * top * ops.attn_max_weight(f) < 2**31 <= n * top * ops.attn_max_weight(f + 1) or f == ops.ATTN_MAX_F
    codes, dead = np.zeros((1, 4, n), np.int64), np.zeros((1, 4, n), bool)
    every = np.arange(4 * f + 3)
    low = ops.attn_weights(every[None], np.zeros((1, every.size), bool), f, True, 2)[1, 0]
    codes[0, 1, ::2] = 1
    codes[0, 2, :] = np.argmax(low)  # the code of the largest plane-1 weight
    w = ops.attn_weights(codes, dead, f, True, 2)
    assert w[:, 1].max() == low.max() <= ops.attn_max_weight(f) and w[:, 0].max() == 1 << f
    kernel = _stand_in((1, 4, n, 8), 2, f, v_bits)
    scale = 0.3855 * 0.02 / 2 ** (f + ops.ATTN_EXTRA_BITS)
    for value, z_v in ((top, 0), (0, top), (top, top)):
        v = np.full((1, n, 8), value, np.uint8)
        acc = ops.attn_v_acc(w, v, z_v, f, v_bits)
        np.testing.assert_array_equal(kernel(w, v, z_v, scale), acc.astype(np.float32) * np.float32(scale))


def test_spec_interface_of_the_tuning_search():
    """`attn_v_spec` / `attn_v_func` / `apply_schedule` as `tuning.spaces` drives them: the default schedule of the
    emitted kernel's spec is that kernel, and each row count a sampled decision (an ExprRV) can take runs bit-exact
    via the twin."""
    from repq_tvm.relax_util import scheduled_kernel

    func, name = av.attn_v_primfunc(2, 13, 37, 20, Q.AARCH64_TARGET, groups=2)
    spec = json.loads(func.attrs["repq.kernel"])
    assert spec["variant"] == "neon_udot" and av.VARIANTS["neon_udot"][1] is not None  # searchable
    tvm.ir.assert_structural_equal(scheduled_kernel(av.default_schedule(spec), name), func)
    groups, w, v, zps = _operands(5, (2, 6, 37, 20), 4, True, 8, 14)
    spec = av.attn_v_spec(2, 6, 37, 20, groups=groups, variant="neon_udot", tiles=(3, 2), epilogue=False)
    w_p = np.zeros((*w.shape[:-1], av.padded_tokens(37)), np.int16)
    w_p[..., :37] = w
    for decision in range(2):  # 1 or 3 rows a tile
        sch = Schedule(av.attn_v_func(spec))
        mi = sch.sample_categorical([1, 3], [0.5, 0.5], decision=decision)
        av.apply_schedule(sch, "neon_udot", mi, 2, ref=True)
        args = [tvm.runtime.tensor(x) for x in (w_p, v, np.array([zps[2]], np.int32), np.empty((2, 6, 20), np.int64))]
        tvm.compile(sch.mod, target=HOST).jit()["main"](*args)
        np.testing.assert_array_equal(args[-1].numpy(), ops.attn_v_acc(w, v, zps[2], 14))


# --- the aarch64 build ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape,groups", [((6, 197, 197, 64), 2), ((4, 65, 65, 32), 2)], ids=["deit", "vit"])
def test_aarch64_hot_loop_is_udot(shape, groups):
    """The aarch64-neon-dotprod build: the innermost loop with the most udot is indexed udot (planes x rows x
    blocks x depth of them per step) on 8-byte weight loads and V tiles, nothing widening, no stack traffic; the
    kernel refuses to run on this host."""
    kernel = AttnV(*shape, Q.AARCH64_TARGET, groups=groups)
    assert kernel.variant == "neon_udot"
    planes = groups
    rows, blocks = av.default_tiles(shape[1], "neon_udot", planes)
    asm = kernel.asm()
    hot = max(_inner_loops(asm), key=lambda body: body.count("udot"))
    assert hot.count("udot") % (planes * rows * blocks * av.UDOT_DEPTH) == 0 and hot.count("udot") >= 36, hot
    assert re.search(r"udot\s+v\d+\.4s, v\d+\.16b, v\d+\.4b\[[0-3]\]", hot), "not the indexed form"
    for widening in ("smlal", "smull", "sxtl", "saddw", "sdot"):
        assert widening not in hot, widening
    assert "sp" not in re.findall(r"\[(\w+)", hot), "registers spilled to the stack in the hot loop"
    assert not re.search(r"smlal2?\s+v\d+\.4s", asm), "int16 multiply-accumulates (the fallback's)"  # (.2d: epilogue)
    with pytest.raises(RuntimeError, match="cannot run"):
        kernel.function()


# --- the real instruction, emulated -------------------------------------------------------------
@pytest.mark.slow
def test_udot_kernels_under_qemu_are_exact(tmp_path):
    """The aarch64 kernels (real udot, emulated by qemu-aarch64-static): DeiT-Small's and the fixture's heads, two
    bands and one, 1 and 2 planes, ragged shapes; extreme codes and zero points, bit for bit."""
    cases = [(8, True, 8, (6, 197, 197, 64), 14), (4, True, 4, (4, 65, 65, 32), 14), *CASES[2:]]
    calls, expected = [], []
    for bits, sqrt2, v_bits, shape, f in cases:
        groups, w, v, zps = _operands(bits + f, shape, bits, sqrt2, v_bits, f)
        kernel = AttnV(*shape, Q.AARCH64_TARGET, groups=groups, f=f, v_bits=v_bits, epilogue=False)
        assert kernel.variant == "neon_udot"
        for z_v in zps:
            calls.append((kernel.executable, [x.numpy() for x in kernel.args(w, v, z_v)]))
            expected.append(((bits, sqrt2, v_bits, shape, f, z_v), ops.attn_v_acc(w, v, z_v, f, v_bits)))
    for got, (case, want) in zip(_run_under_qemu(tmp_path, calls), expected):
        np.testing.assert_array_equal(got, want, err_msg=str(case))
