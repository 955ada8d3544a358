"""Row moves folded into the linears' row reads (`passes.row_moves`, `kernels.qdense` ``a_rows``): the same numbers
as the moves they replace, kernel by kernel and on a Swin-shaped block."""

import json

import numpy as np
import pytest
from tvm import relax

import tvm
from repq_tvm.frontends import canonical
from repq_tvm.kernels import qdense as Q
from repq_tvm.passes.quantized_linear import LowerQuantizedLinear
from repq_tvm.passes.row_moves import FoldRowMoves, row_table
from repq_tvm.relax_util import scheduled_kernel
from repq_tvm.testing.qdense import build_qdense
from test_pass_quantized_linear import run

HOST = Q.host_target(1)


def _kernels():
    """(variant, ref): every x86 variant this CPU runs natively; VNNI and Arm's sdot through their plain-loop twins,
    and the plain-loop fallback, everywhere."""
    out = [("vnni", True), ("neon_sdot", True), ("fallback", False)]
    for name in ("avx2_i16", "avx2_u8s8", "vnni"):
        if Q.target_has(HOST, Q.VARIANTS[name].feature):
            out.append((name, False))
    return out


CASES = {"permutation": (197, 197), "repeats": (100, 131), "gather": (300, 41)}


def _kernel_cases():
    """Every variant on a permutation; the rows read twice or not at all on the native int16 kernel and VNNI's twin."""
    out = [(v, ref, "permutation") for v, ref in _kernels()]
    return out + [(v, ref, case) for v, ref in (("avx2_i16", False), ("vnni", True)) for case in ("repeats", "gather")]


@pytest.mark.parametrize("variant,ref,case", _kernel_cases(), ids=str)
def test_kernel_reads_rows_through_the_table(variant, ref, case):
    """Row m of the output is the kernel's row for A[rows[m]]: the same as the kernel without a table run on the
    gathered rows, with the residual added and, on VNNI, the compensation of 8-bit weights (row sums of the
    gathered rows); M not a multiple of the tile's rows."""
    (a_rows, M), N, K = CASES[case], 48, 72
    bits = 4 if variant == "avx2_u8s8" else 8
    rng = np.random.default_rng(a_rows)
    a = rng.integers(0, 2 ** bits, (a_rows, K), dtype=np.uint8)
    w = rng.integers(-(2 ** bits - 1) // 2, (2 ** bits - 1) // 2 + 1, (N, K)) if bits == 4 else \
        (rng.integers(0, 256, (N, K)) - rng.integers(0, 256, (N, 1)))
    rows = (rng.permutation(a_rows) if a_rows == M else rng.integers(0, a_rows, M)).astype(np.int32)
    res = rng.normal(0, 3, (M, N)).astype(np.float32)
    kw = dict(variant=variant, ref=ref, bits_a=bits, bits_w=bits, epilogue=True, residual=True)
    plain = build_qdense(M, N, K, HOST, **kw)
    table = build_qdense(M, N, K, HOST, a_rows=a_rows, **kw)
    assert table.compensate == plain.compensate == (bits == 8 and variant != "avx2_i16")
    zp = 2 ** (bits - 1)
    params = plain.epilogue_params(w, np.full(N, 5e-4, np.float32), 0.02, zp, np.linspace(-1, 1, N, dtype=np.float32))
    want = plain(plain.prepare_activation(a[rows], zp), *plain.weight_args(w), *params, res)
    got = table(table.prepare_activation(a, zp), *table.weight_args(w), *params, res, rows)
    np.testing.assert_array_equal(got, want)


def test_the_amx_kernel_takes_no_table():
    with pytest.raises(ValueError, match="the amx qdense reads its activation rows in order: no a_rows"):
        Q.schedule_qdense(64, 64, 64, HOST, variant="amx", epilogue=True, ref=True, a_rows=80)


# --- the table of a tree of moves ------------------------------------------------------------------------
def _moves_module(shape, moves):
    """main(x) = moves(x) as Relax bindings; returns (function, bound values, result variable)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(moves(bb, x))
        bb.emit_func_output(out)
    func = bb.get()["main"]
    bound = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    return func.params[0], bound, func.body.blocks[0].bindings[-1].var


def roll(bb, x, shift, axes=(1, 2)):
    """torch.roll as Swin's export writes it: per axis, two strided slices and a concat."""
    for axis in axes:
        n = int(x.ty.shape[axis])
        cut = (-shift) % n
        head = bb.emit(relax.op.strided_slice(x, [axis], [0], [cut]))
        tail = bb.emit(relax.op.strided_slice(x, [axis], [cut], [n]))
        x = bb.emit(relax.op.concat([tail, head], axis=axis))
    return x


def partition(bb, x, window):
    b, h, w, c = (int(d) for d in x.ty.shape)
    x = bb.emit(relax.op.reshape(x, [b, h // window, window, w // window, window, c]))
    x = bb.emit(relax.op.permute_dims(x, [0, 1, 3, 2, 4, 5]))
    return bb.emit(relax.op.reshape(x, [b * (h // window) * (w // window), window * window, c]))


def test_table_of_a_cyclic_shift_and_window_partition():
    shape, window, shift = (1, 8, 12, 5), 4, 2
    x, bound, out = _moves_module(shape, lambda bb, x: partition(bb, roll(bb, x, -shift), window))
    source, rows = row_table(out, bound)
    assert source.same_as(x)
    index = np.arange(8 * 12).reshape(1, 8, 12)
    rolled = np.roll(index, (-shift, -shift), axis=(1, 2))
    expected = rolled.reshape(1, 2, 4, 3, 4).transpose(0, 1, 3, 2, 4).reshape(-1)
    np.testing.assert_array_equal(rows, expected)


def test_moves_that_mix_channels_have_no_table():
    """Patch merging's 2x2 gather puts four tokens' channels in one row: not a row move."""
    def merge(bb, x):
        x = bb.emit(relax.op.reshape(x, [1, 4, 2, 4, 2, 6]))
        x = bb.emit(relax.op.permute_dims(x, [0, 1, 3, 4, 2, 5]))
        return bb.emit(relax.op.reshape(x, [1, 4, 4, 24]))

    _, bound, out = _moves_module((1, 8, 8, 6), merge)
    assert row_table(out, bound) is None


# --- the pass on a Swin-shaped block ------------------------------------------------------------------------
C, WINDOW, SHIFT = 16, 4, 2


def _linear(bb, x, seed, n=C, bits=8):
    rng = np.random.default_rng(seed)
    w_codes, z_w = rng.integers(0, 2 ** bits, (n, C)), rng.integers(0, 2 ** bits, n)
    xh = bb.emit(canonical.uniform_qdq(x, 0.05, 2 ** (bits - 1) + seed, bits))
    wh = bb.emit(canonical.weight_dq(relax.const(w_codes.astype(np.uint8)), relax.const(
        rng.uniform(0.01, 0.1, n).astype(np.float32)), relax.const(z_w.astype(np.uint8))))
    y = bb.emit(relax.op.matmul(xh, relax.op.permute_dims(wh, [1, 0]), out_dtype="float32"))
    return bb.emit(relax.op.add(y, relax.const(rng.standard_normal(n).astype(np.float32))))


def swin_block(shift: int, bits: int):
    """x → LayerNorm → shift → windows → codes → linear → codes → linear → windows back → unshift → x + that;
    ``bits``-bit codes (below 8: clipped, as `canonical.uniform_qdq` writes them)."""
    h, w = 8, 8
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, h, w, C), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            t = bb.emit(relax.op.nn.layer_norm(x, relax.const(np.ones(C, np.float32)),
                                               relax.const(np.zeros(C, np.float32)), axes=[-1]))
            t = partition(bb, roll(bb, t, -shift) if shift else t, WINDOW)
            y = _linear(bb, _linear(bb, t, 1, bits=bits), 2, bits=bits)
            y = bb.emit(relax.op.reshape(y, [1, h // WINDOW, w // WINDOW, WINDOW, WINDOW, C]))
            y = bb.emit(relax.op.permute_dims(y, [0, 1, 3, 2, 4, 5]))
            y = bb.emit(relax.op.reshape(y, [1, h, w, C]))
            y = roll(bb, y, shift) if shift else y
            out = bb.emit_output(bb.emit(relax.op.add(x, y)))
        bb.emit_func_output(out)
    return bb.get()


def _ops_of(binding) -> str | None:
    value = binding.value
    return value.op.name if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else None


def _ops(mod) -> list[str]:
    return [op for block in mod["main"].body.blocks for b in block.bindings if (op := _ops_of(b))]


@pytest.mark.parametrize("shift,bits", [(0, 8), (SHIFT, 8), (SHIFT, 4)], ids=str)
def test_pass_before_after(shift, bits):
    """Both moves go into the kernels: no transpose, slice or concat left, no add; the first linear's codes come
    straight from the LayerNorm; the kernels are `schedule_qdense`'s with the tables; the same output bit for bit."""
    before = LowerQuantizedLinear(HOST)(swin_block(shift, bits))
    fold = FoldRowMoves(HOST)
    after = fold(before)
    assert fold.rewritten == 2
    moves = {"relax.permute_dims", "relax.strided_slice", "relax.concat"}
    assert moves & set(_ops(before)) and not moves & set(_ops(after)), _ops(after)
    assert "relax.add" not in _ops(after) and "relax.nn.layer_norm" in _ops(after)
    bindings = [b for block in after["main"].body.blocks for b in block.bindings]
    (norm,) = [b.var for b in bindings if _ops_of(b) == "relax.nn.layer_norm"]
    assert [_ops_of(b) for b in bindings if norm in b.value.args] == ["relax.quantize"]
    specs = {gv.name_hint: json.loads(str(after[gv].attrs["repq.kernel"])) for gv in after.get_global_vars()
             if gv.name_hint.startswith("repq_qdense")}
    assert sorted(s.get("rows", 0) for s in specs.values()) == [64, 64] and \
        sorted(bool(s.get("residual")) for s in specs.values()) == [False, True]
    for name, spec in specs.items():
        sch, _, _, _ = Q.schedule_qdense(spec["M"], spec["N"], spec["K"], HOST, bits_a=bits, bits_w=spec["bits_w"],
                                         variant=spec["variant"], epilogue=True, compensate=spec["compensate"],
                                         residual=bool(spec.get("residual")), a_rows=spec["rows"])
        gv = next(gv for gv in after.get_global_vars() if gv.name_hint == name)
        tvm.ir.assert_structural_equal(after[gv], scheduled_kernel(sch, name))
    x = np.random.default_rng(0).standard_normal((1, 8, 8, C)).astype(np.float32) * 3
    np.testing.assert_array_equal(run(after, x), run(before, x))


def test_codes_moved_after_their_quantizer_are_left_alone():
    """A quantizer below the moves (codes shifted, then cast): the pass rebuilds only the ops above the moves, so it
    must not fold these (the quantizer would be lost); the module is unchanged."""
    rng = np.random.default_rng(3)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 8, C), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            s, z = relax.const(0.05, "float32"), relax.const(128, "uint8")
            q = bb.emit(relax.op.quantize(x, s, z, axis=-1, out_dtype="uint8"))
            t = partition(bb, roll(bb, q, -SHIFT), WINDOW)
            dq = bb.emit(relax.op.dequantize(t, s, z, axis=-1, out_dtype="float32"))
            w = rng.integers(0, 256, (C, C))
            wh = bb.emit(canonical.weight_dq(relax.const(w.astype(np.uint8)), relax.const(
                np.full(C, 0.02, np.float32)), relax.const(np.full(C, 128, np.uint8))))
            out = bb.emit_output(bb.emit(relax.op.matmul(dq, relax.op.permute_dims(wh, [1, 0]), out_dtype="float32")))
        bb.emit_func_output(out)
    before = LowerQuantizedLinear(HOST)(bb.get())
    assert any(gv.name_hint.startswith("repq_qdense") for gv in before.get_global_vars())
    fold = FoldRowMoves(HOST)
    after = fold(before)
    assert fold.rewritten == 0
    tvm.ir.assert_structural_equal(after, before)


def test_a_linear_on_the_functions_input_is_left_alone():
    """The operand's walk down through the quantizer and casts ends at a parameter (no binding): nothing to fold
    (this walk once looped there)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16, C), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(_linear(bb, x, 4))
        bb.emit_func_output(out)
    before = LowerQuantizedLinear(HOST)(bb.get())
    fold = FoldRowMoves(HOST)
    after = fold(before)
    assert fold.rewritten == 0
    tvm.ir.assert_structural_equal(after, before)
