"""Weights of at most 16 values per row stored two per byte, and the kernel that unpacks them at load time.

Why: a 4-bit model's centred weights take a byte each in the qdense kernels' packed layout (`packing.pack_weight`),
so a W4 artifact was as large as a W8 one.  Stored as nibbles, ``w[n, k] − base[n]`` in [0, 15] with one int32
``base`` per row, they take half.  `unpack_func` rebuilds the kernel's packed operand from them; the compiler
runs it once when the artifact is loaded (`passes.load_time_weights`), not per inference.

    nibbles uint8 [N, ⌈K/2⌉]   byte j of row n holds k = 2j in its low and k = 2j + 1 in its high half
    base    int32 [N]
    packed  [Np/lanes, Kp/kpack, lanes, kpack] of the kernel's weight dtype, zero outside N x K
"""

from __future__ import annotations

import json

import numpy as np

# the function attribute that marks a PrimFunc as computed once from constants when the artifact is loaded
LOAD_TIME = "repq.load_time"


def packable(w: np.ndarray) -> bool:
    """True if every row of the integer weights [N, K] spans at most 16 values (any 4-bit quantizer's do)."""
    w = np.asarray(w)
    return w.ndim == 2 and w.size > 0 and w.dtype.kind in "iu" and int((w.max(1).astype(np.int64)
                                                                         - w.min(1)).max()) <= 15


def pack_nibbles(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer weights [N, K] → (nibbles uint8 [N, ⌈K/2⌉], base int32 [N]) with w = nibble + base."""
    w = np.asarray(w).astype(np.int64)
    if not packable(w):
        raise ValueError(f"weights {w.shape} have a row spanning more than 16 values: not storable as nibbles")
    base = w.min(1)
    d = (w - base[:, None]).astype(np.uint8)
    if d.shape[1] % 2:
        d = np.pad(d, ((0, 0), (0, 1)))
    return np.ascontiguousarray(d[:, 0::2] | (d[:, 1::2] << 4)), base.astype(np.int32)


def unpack_nibbles(nibbles: np.ndarray, base: np.ndarray, k: int) -> np.ndarray:
    """Inverse of `pack_nibbles` (int32 [N, k]): the NumPy statement of what `unpack_func` computes."""
    d = np.stack([nibbles & 15, nibbles >> 4], axis=-1).reshape(nibbles.shape[0], -1)[:, :k]
    return d.astype(np.int32) + base.astype(np.int32)[:, None]


def unpack_func(n: int, k: int, lanes: int, kpack: int, dtype: str):
    """PrimFunc ``main(nibbles, base, packed)``: the packed kernel operand from the nibbles, scheduled (parallel
    over lane blocks, vectorized), with the `LOAD_TIME` attribute."""
    import tvm
    from tvm import te
    from tvm.s_tir import Schedule

    from .packing import ceil_to

    n_p, k_p = ceil_to(n, lanes), ceil_to(k, kpack)
    nib = te.placeholder((n, (k + 1) // 2), "uint8", name="nibbles")
    base = te.placeholder((n,), "int32", name="base")

    def value(nb, kb, lane, j):
        row, col = nb * lanes + lane, kb * kpack + j
        r, c = tvm.tirx.min(row, n - 1), tvm.tirx.min(col, k - 1)
        half = (nib[r, c >> 1].astype("int32") >> ((c & 1) * 4)) & 15
        inside = tvm.tirx.all(row < n, col < k)
        return tvm.tirx.Select(inside, half + base[r], 0).astype(dtype)

    packed = te.compute((n_p // lanes, k_p // kpack, lanes, kpack), value, name="packed")
    spec = {"kind": "unpack_nibbles", "n": n, "k": k, "lanes": lanes, "kpack": kpack, "dtype": dtype}
    sch = Schedule(te.create_prim_func([nib, base, packed]))
    nb, kb, lane, j = sch.get_loops(sch.get_sblock("packed"))
    sch.parallel(nb)
    sch.vectorize(sch.fuse(lane, j))
    name = f"repq_unpack_nibbles_{n}x{k}_{lanes}x{kpack}_{dtype}"
    func = sch.mod["main"].with_attr("global_symbol", name).with_attr("tirx.is_scheduled", True)
    # opaque (8): FuseOps must keep it a call of its own, the unit the load-time pass moves
    return func.with_attr(LOAD_TIME, json.dumps(spec, sort_keys=True)).with_attr("op_pattern", 8), name
