"""Weights stored narrower than the kernel's operand, and the kernel that widens them at load time.

Why: the qdense kernels read their weights packed in their operand type (`packing.pack_weight`): int8, or int16
for AVX2's exact 8-bit kernel (`vpmaddwd`).  So a 4-bit model's weights took a byte each, as large as an 8-bit
one, and an 8-bit model built for AVX2 took two bytes a weight, twice the size of its int8 peers.  Stored as
unsigned offsets from one int32 ``base`` per row, they take what their values need: 4 bits (two per byte) when
a row spans at most 16 values (any 4-bit quantizer's), 8 bits when it spans at most 256 and the operand is
int16.  `unpack_func` rebuilds the kernel's packed operand from them; the compiler runs it once when the artifact
is loaded (`passes.load_time_weights`), not per inference.

    data    uint8 [N, ⌈K·bits/8⌉]  4 bits: byte j of row n holds k = 2j in its low and k = 2j + 1 in its high half;
                                    8 bits: byte k holds k
    base    int32 [N]               w[n, k] = offset + base[n]
    packed  [Np/lanes, Kp/kpack, lanes, kpack] of the kernel's weight dtype, zero outside N x K
"""

from __future__ import annotations

import json

import numpy as np

# the function attribute that marks a PrimFunc as computed once from constants when the artifact is loaded
LOAD_TIME = "repq.load_time"
BITS = (4, 8)


def _span(w: np.ndarray) -> int | None:
    """The most distinct values a row of the integer weights [N, K] spans (max − min + 1); None if not such."""
    w = np.asarray(w)
    if w.ndim != 2 or w.size == 0 or w.dtype.kind not in "iu":
        return None
    return int((w.max(1).astype(np.int64) - w.min(1)).max()) + 1


def storage_bits(w: np.ndarray, w_dtype: str) -> int | None:
    """Bits a weight of [N, K] is stored in for a kernel operand of ``w_dtype``: 4 if every row spans at most 16
    values, 8 if at most 256 and the operand is wider (int16); None: stored as the operand itself."""
    span = _span(w)
    if span is None:
        return None
    operand_bits = np.dtype(w_dtype).itemsize * 8
    return next((b for b in BITS if span <= 1 << b and b < operand_bits), None)


def pack(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer weights [N, K] → (data uint8 [N, ⌈K·bits/8⌉], base int32 [N]) with w = offset + base."""
    if bits not in BITS:
        raise ValueError(f"weights are stored in {' or '.join(map(str, BITS))} bits, not {bits}")
    span = _span(w)
    if span is None or span > 1 << bits:
        raise ValueError(f"weights {np.shape(w)} have a row spanning more than {1 << bits} values: not storable "
                         f"in {bits} bits")
    w = np.asarray(w).astype(np.int64)
    base = w.min(1)
    d = (w - base[:, None]).astype(np.uint8)
    if bits == 8:
        return np.ascontiguousarray(d), base.astype(np.int32)
    if d.shape[1] % 2:
        d = np.pad(d, ((0, 0), (0, 1)))
    return np.ascontiguousarray(d[:, 0::2] | (d[:, 1::2] << 4)), base.astype(np.int32)


def unpack(data: np.ndarray, base: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Inverse of `pack` (int32 [N, k]): the NumPy statement of what `unpack_func` computes."""
    d = data if bits == 8 else np.stack([data & 15, data >> 4], axis=-1).reshape(data.shape[0], -1)
    return d[:, :k].astype(np.int32) + base.astype(np.int32)[:, None]


def unpack_func(n: int, k: int, lanes: int, kpack: int, dtype: str, bits: int = 4):
    """PrimFunc ``main(data, base, packed)``: the packed kernel operand from the ``bits``-bit offsets, scheduled
    (parallel over lane blocks, vectorized), with the `LOAD_TIME` attribute."""
    import tvm
    from tvm import te
    from tvm.s_tir import Schedule

    from .packing import ceil_to

    if bits not in BITS:
        raise ValueError(f"weights are stored in {' or '.join(map(str, BITS))} bits, not {bits}")
    n_p, k_p = ceil_to(n, lanes), ceil_to(k, kpack)
    data = te.placeholder((n, (k * bits + 7) // 8), "uint8", name="data")
    base = te.placeholder((n,), "int32", name="base")

    def value(nb, kb, lane, j):
        row, col = nb * lanes + lane, kb * kpack + j
        r, c = tvm.tirx.min(row, n - 1), tvm.tirx.min(col, k - 1)
        if bits == 8:
            offset = data[r, c].astype("int32")
        else:
            offset = (data[r, c >> 1].astype("int32") >> ((c & 1) * 4)) & 15
        inside = tvm.tirx.all(row < n, col < k)
        return tvm.tirx.Select(inside, offset + base[r], 0).astype(dtype)

    packed = te.compute((n_p // lanes, k_p // kpack, lanes, kpack), value, name="packed")
    kind = {4: "nibbles", 8: "bytes"}[bits]
    spec = {"kind": f"unpack_{kind}", "n": n, "k": k, "lanes": lanes, "kpack": kpack, "dtype": dtype}
    sch = Schedule(te.create_prim_func([data, base, packed]))
    nb, kb, lane, j = sch.get_loops(sch.get_sblock("packed"))
    sch.parallel(nb)
    sch.vectorize(sch.fuse(lane, j))
    name = f"repq_unpack_{kind}_{n}x{k}_{lanes}x{kpack}_{dtype}"
    func = sch.mod["main"].with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
    # opaque (8): FuseOps must keep it a call of its own, the unit the load-time pass moves
    return func.with_attr(LOAD_TIME, json.dumps(spec, sort_keys=True)).with_attr("op_pattern", 8), name
