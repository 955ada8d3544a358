"""`QDense`, a compiled `repq_tvm.kernels.qdense` kernel callable with NumPy arrays, and `build_qdense`, which
compiles one."""

from __future__ import annotations

import numpy as np
import tvm

from ..kernels import packing
from ..kernels.packing import ceil_to
from ..kernels.epilogue import quantizer_args
from ..kernels.qdense import X86_VNNI_TARGET, Variant, schedule_qdense
from ..targets import as_target, check_runnable


class QDense:
    """A compiled qdense kernel: prepare operands, call it with NumPy arrays, or read its assembly.

    ``variant`` is the `Variant`, ``tiles`` the schedule's (rows, lane blocks, depth).
    """

    def __init__(self, M, N, K, target, variant: Variant, bits, epilogue, ref, tiles, executable,
                 compensate: bool = False, gelu_codes: tuple | None = None, residual: bool = False,
                 qkv_codes: dict | None = None, codes_operand: tuple | None = None, a_rows: int | None = None,
                 column_codes: tuple | None = None):
        self.M, self.N, self.K, self.epilogue, self.compensate = M, N, K, epilogue, compensate
        self.gelu_codes, self.residual, self.qkv_codes = gelu_codes, residual, qkv_codes
        self.column_codes = column_codes
        self.codes_operand, self.a_rows = codes_operand, a_rows
        self.variant, self.bits_a, self.bits_w, self.ref, self.tiles = variant, *bits, ref, tiles
        self.Kp = ceil_to(K, variant.kpack)
        self.target, self.executable = target, executable
        self._fn = None

    @property
    def schedule(self) -> str:
        """"ref" for plain-loop intrinsic bodies, else the variant name."""
        return "ref" if self.ref else self.variant.name

    # operand preparation in this kernel's layouts
    def pack_weight(self, w: np.ndarray) -> np.ndarray:
        """Centred weights ``[N, K]`` -> packed (offset into int8 first when compensated)."""
        v = self.variant
        if self.compensate:
            w = np.asarray(w).astype(np.int32) - packing.weight_offset(w)[:, None]
        return packing.pack_weight(w, v.lanes, v.kpack, np.dtype(v.w_dtype))

    def weight_args(self, w: np.ndarray) -> list[np.ndarray]:
        """The kernel's weight operands for centred weights: ``[packed]`` or ``[packed, comp]``."""
        packed = self.pack_weight(w)
        return [packed, packing.weight_offset(w)] if self.compensate else [packed]

    def prepare_activation(self, a: np.ndarray, a_zp: int = 0) -> np.ndarray:
        """uint8 codes ``[M, K]`` -> this kernel's A: padded u8, centered int16 (``a - a_zp``), or s8
        ``a - a_shift`` (sdot: 128 for 8-bit codes, else 0; `packing.activation_shift`)."""
        if self.variant.a_dtype == "int16":
            return packing.center_activation(a, a_zp, self.variant.kpack)
        if self.variant.a_dtype == "int8":
            return packing.shift_activation(a, self.variant.a_shift(self.bits_a), self.variant.kpack)
        return packing.pad_activation(a, self.variant.kpack)

    def epilogue_params(self, w, w_scale, a_scale: float, a_zp: int, bias=None):
        """`packing.epilogue_params`, with no zero-point term when A is already centered, and the
        activation shift of an s8 A folded into it."""
        zp = 0 if self.variant.a_dtype == "int16" else a_zp
        return packing.epilogue_params(w, w_scale, a_scale, zp, bias, a_shift=self.variant.a_shift(self.bits_a))

    # running
    def _check_runnable(self) -> None:
        """Refuse to run code this CPU cannot execute (it would die of SIGILL, not raise): `targets.NotRunnable`."""
        check_runnable(self.target, "kernel")

    def function(self):
        """The runtime function ``main(A, W, [zp_wsum, scale, bias,] out)``."""
        if self._fn is None:
            self._check_runnable()
            self._fn = self.executable.jit()["main"]
        return self._fn

    def _check_codes(self, a, w_packed) -> None:
        """Refuse NumPy operands outside the bit widths the variant was chosen for (cheap, exact)."""
        if self.variant.name != "avx2_u8s8" or not isinstance(a, np.ndarray):
            return
        a_max, w_max = packing.code_bounds(self.bits_a, self.bits_w)
        if a.size and int(a.max()) > a_max:
            raise ValueError(f"activation code {int(a.max())} exceeds bits_a={self.bits_a}")
        if isinstance(w_packed, np.ndarray) and w_packed.size:
            if int(np.abs(w_packed.astype(np.int16)).max()) > w_max:
                raise ValueError(f"|weight| exceeds {w_max} (bits_w={self.bits_w})")

    def _args(self, a, *rest):
        """``rest`` = `weight_args` then, with an epilogue, (zp_wsum, scale, bias) [and res], then [rows]; with
        ``gelu_codes``, ``qkv_codes`` or ``column_codes`` the kernel's quantizer operand goes in after bias
        (`epilogue.quantizer_args`: one, q's, k's and v's, or one per column as rows [3, N])."""
        if len(rest) != 1 + self.compensate + 3 * self.epilogue + self.residual + bool(self.a_rows):
            raise TypeError("call with (a, *weight_args(w), [zp_wsum, scale, bias, [res]], [rows])")
        quant = quantizer_args(*self.gelu_codes[:2]) if self.gelu_codes else np.stack(
            [quantizer_args(*c[:2]) for c in self.qkv_codes["codes"]]) if self.qkv_codes else None
        if self.column_codes:
            quant = np.ascontiguousarray(self.column_codes[0], np.float32)
        if quant is not None:
            at = 1 + self.compensate + 3
            rest = (*rest[:at], quant, *rest[at:])
        codes = self.gelu_codes or self.qkv_codes or self.column_codes
        dtype = np.uint8 if codes else np.float32 if self.epilogue else np.int32
        if self.codes_operand:
            dtype = np.dtype(self.codes_operand[0])
        outs = [np.empty((self.M, self.N), dtype)]
        if self.qkv_codes:  # q, k, v: [B, heads, tokens, D] each
            t, h = self.qkv_codes["tokens"], self.qkv_codes["heads"]
            outs = [np.empty((self.M // t, h, t, self.N // (3 * h)), dtype) for _ in range(3)]
        arrays = [a, *rest, *outs]
        return [
            x if isinstance(x, tvm.runtime.Tensor) else tvm.runtime.tensor(np.ascontiguousarray(x))
            for x in arrays
        ]

    def __call__(self, a, *rest) -> np.ndarray:
        """``a`` from `prepare_activation`, then `weight_args`, then the epilogue vectors if built with them."""
        self._check_codes(a, rest[0] if rest else None)
        args = self._args(a, *rest)
        self.function()(*args)
        return np.stack([x.numpy() for x in args[-3:]]) if self.qkv_codes else args[-1].numpy()

    def time(self, a, *rest, runs: int = 50, number: int = 10) -> np.ndarray:
        """Seconds per call for ``runs`` repeats of ``number`` calls each (time_evaluator)."""
        self.function()
        timer = self.executable.jit().time_evaluator("main", tvm.cpu(), number=number, repeat=runs)
        return np.asarray(timer(*self._args(a, *rest)).results)

    def asm(self) -> str:
        """Generated assembly (``inspect_source("asm")`` on the LLVM module)."""
        return self.executable.mod.inspect_source("asm")


def build_qdense(
    M: int, N: int, K: int, target=X86_VNNI_TARGET, *, bits_a: int = 8, bits_w: int = 8,
    variant: str = "auto", epilogue: bool = False, ref: bool = False,
    tiles: tuple[int, int] | None = None, depth: int | None = None, compensate: bool | None = None,
    gelu_codes: tuple[float, int, int] | None = None, residual: bool = False, qkv_codes: dict | None = None,
    codes_operand: tuple[str, int] | None = None, a_rows: int | None = None, column_blocks: bool = True,
    prefetch: bool = True, column_codes: tuple[np.ndarray, int] | None = None,
) -> QDense:
    """Compile `schedule_qdense` for ``target`` into a callable `QDense` (same arguments, but ``gelu_codes`` =
    (scale, zero point, top code), ``qkv_codes`` = {"tokens", "heads", "codes": three (scale, zero point, top)}
    and ``column_codes`` = (the quantizer rows float32 [3, N], top code): the kernel gets the top codes, its calls
    the quantizer operand)."""
    sch, v, tiles, compensate = schedule_qdense(
        M, N, K, target, bits_a=bits_a, bits_w=bits_w, variant=variant, epilogue=epilogue, ref=ref,
        tiles=tiles, depth=depth, compensate=compensate, gelu_codes=None if gelu_codes is None else int(gelu_codes[2]),
        residual=residual, qkv_codes=None if qkv_codes is None else {
            "tokens": qkv_codes["tokens"], "heads": qkv_codes["heads"], "tops": [c[2] for c in qkv_codes["codes"]]},
        codes_operand=codes_operand, a_rows=a_rows, column_blocks=column_blocks, prefetch=prefetch,
        column_codes=None if column_codes is None else int(column_codes[1]))
    exe = tvm.compile(sch.mod, target=as_target(target))
    return QDense(M, N, K, target, v, (bits_a, bits_w), epilogue, ref, tiles, exe, compensate, gelu_codes, residual,
                  qkv_codes, codes_operand, a_rows, column_codes)
