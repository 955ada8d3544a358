"""`AttnV`: a compiled `repq_tvm.kernels.attn_v` kernel (attn @ V of the log√2 attention) callable with NumPy
arrays."""

from __future__ import annotations

import numpy as np
import tvm

from ..kernels.attn_v import padded_tokens, schedule_attn_v
from ..targets import as_target, check_runnable


class AttnV:
    """A compiled kernel: ``kernel(weights, v, z_v, scale)`` → float32 [Bt, M, D] (int64 acc without epilogue)."""

    def __init__(self, Bt, M, N, D, target, *, groups=1, f=14, v_bits=8, variant=None, tiles=None, ref=False,
                 epilogue=True):
        self.shape, self.target, self.epilogue, self.v_bits = (Bt, M, N, D), target, epilogue, v_bits
        sch, self.variant = schedule_attn_v(Bt, M, N, D, target, groups=groups, f=f, v_bits=v_bits,
                                            variant=variant, tiles=tiles, ref=ref, epilogue=epilogue)
        self.executable = tvm.compile(sch.mod, target=as_target(target))
        self._fn = None

    def args(self, weights, v, z_v: int, scale: float = 1.0) -> list:
        """Runtime tensors; weights [Bt, P, M, N] are padded to whole token pairs here."""
        Bt, M, N, D = self.shape
        top = (1 << self.v_bits) - 1
        if not 0 <= z_v <= top or np.asarray(v).max(initial=0) > top:
            raise ValueError(f"V codes or zero point {z_v} exceed {self.v_bits} bits")
        w = np.zeros((*weights.shape[:-1], padded_tokens(N)), np.int16)
        w[..., :N] = weights
        arrays = [w, np.ascontiguousarray(v, np.uint8), np.array([z_v], np.int32)]
        if self.epilogue:
            arrays.append(np.array([scale], np.float32))
        arrays.append(np.empty((Bt, M, D), np.float32 if self.epilogue else np.int64))
        return [tvm.runtime.tensor(a) for a in arrays]

    def function(self):
        """The runtime function (refused when this machine cannot run the target's code)."""
        if self._fn is None:
            check_runnable(self.target, "kernel")
            self._fn = self.executable.jit()["main"]
        return self._fn

    def __call__(self, weights, v, z_v: int, scale: float = 1.0) -> np.ndarray:
        args = self.args(weights, v, z_v, scale)
        self.function()(*args)
        return args[-1].numpy()

    def asm(self) -> str:
        return self.executable.mod.inspect_source("asm")
