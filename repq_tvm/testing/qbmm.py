"""`QBmm`: a compiled `repq_tvm.kernels.qbmm` kernel (q @ kT) callable with NumPy arrays."""

from __future__ import annotations

import numpy as np
import tvm

from ..kernels.qbmm import schedule_qbmm
from ..targets import as_target, check_runnable


class QBmm:
    """A compiled kernel callable with NumPy arrays: ``k(a, b, z_a, z_b, scale) -> float32 [Bt, M, N]``."""

    def __init__(self, Bt, M, N, D, target, b_layout="nd", tiles=None, variant=None, ref=False):
        self.shape, self.target, self.b_layout = (Bt, M, N, D), target, b_layout
        sch, self.variant = schedule_qbmm(Bt, M, N, D, target, b_layout=b_layout, tiles=tiles, variant=variant,
                                          ref=ref)
        self.executable = tvm.compile(sch.mod, target=as_target(target))
        self._fn = None

    def args(self, a, b, z_a: int, z_b: int, scale: float = 1.0) -> list:
        Bt, M, N, _ = self.shape
        arrays = [a, b, np.array([z_a, z_b], np.int32), np.array([scale], np.float32),
                  np.empty((Bt, M, N), np.float32)]
        return [tvm.runtime.tensor(np.ascontiguousarray(x)) for x in arrays]

    def function(self):
        """The runtime function ``main(A, B, zp, scale, out)``; refuses code this CPU cannot run."""
        if self._fn is None:
            check_runnable(self.target, "kernel")
            self._fn = self.executable.jit()["main"]
        return self._fn

    def __call__(self, a, b, z_a: int, z_b: int, scale: float = 1.0) -> np.ndarray:
        args = self.args(a, b, z_a, z_b, scale)
        self.function()(*args)
        return args[-1].numpy()
