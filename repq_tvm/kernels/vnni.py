"""Deprecated import path (the first VNNI-only kernel); use `repq_tvm.kernels.qdense`.

Kept so old callers work unchanged: 16-lane layouts only (`pack_weight` / `pad_activation`
defaults) and the old ``schedule`` argument ("auto" = VNNI if the target has it, else fallback;
"ref" = the VNNI schedule with a plain-loop intrinsic body).
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin  # noqa: F401  (old tests look intrinsics up through here)

from . import qdense as _q
from .intrinsics_x86 import ref_name, register_intrinsics, vnni_intrin  # noqa: F401
from .packing import epilogue_params, pack_weight, pad_activation, reference, unpack_weight  # noqa: F401
from .qdense import (  # noqa: F401
    AARCH64_TARGET, X86_VNNI_TARGET, QDense, host_has_vnni, host_target, target_has_vnni,
)

VNNI_INTRIN = vnni_intrin()
REF_INTRIN = ref_name(VNNI_INTRIN)
LANES, KPACK = 16, 4
SCHEDULES = ("auto", "vnni", "ref", "fallback")


def build_qdense(M, N, K, target=X86_VNNI_TARGET, *, epilogue=False, schedule="auto", tiles=None) -> QDense:
    """Old signature of `qdense.build_qdense` (8-bit codes, 16-lane layouts)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "auto":
        schedule = "vnni" if target_has_vnni(target) else "fallback"
    variant = "fallback" if schedule == "fallback" else "vnni"
    return _q.build_qdense(
        M, N, K, target, variant=variant, epilogue=epilogue, ref=schedule == "ref", tiles=tiles
    )
