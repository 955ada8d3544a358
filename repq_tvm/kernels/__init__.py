"""Hand-scheduled TVM kernels for the integer graph (untuned TVM has no good int8 matmul rule).

Modules: `packing` (NumPy layouts and epilogue constants, no TVM import), `intrinsics_x86`
(tensor intrinsics: VNNI, AVX2 u8 x s8 and int16), `intrinsics_arm` (Arm dot product: sdot),
`qdense` (compute, schedules).  The modules hold computes, schedules and PrimFunc builders only; the
NumPy-callable harnesses compiled from them, for tests and benchmarks, are in `repq_tvm.testing`.
The names below are loaded lazily so `packing` stays importable without paying for TVM.
"""

_QDENSE = ("choose_variant", "VARIANTS", "host_target")
_PACKING = ("pack_weight", "unpack_weight", "pad_activation", "center_activation", "epilogue_params",
            "reference", "u8s8_is_exact")
__all__ = [*_QDENSE, *_PACKING]


def __getattr__(name):
    if name in _QDENSE:
        from . import qdense

        return getattr(qdense, name)
    if name in _PACKING:
        from . import packing

        return getattr(packing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
