"""The fused attentions' run-time constants (`attention_amx`, `attention_vector`): one float64 operand ``consts``.

    consts[0]                 log2(s) of the softmax's log quantizer (float64, as `log_weights._code_bias` adds it)
    consts[1 + 3i : 4 + 3i]   (s, 1/s, z) of quantizer i of `SLOTS`: q, k, v (what a kernel reading the qkv output
                              quantizes) and out (the output projection's codes it stores): `epilogue.quantizer_args`,
                              float32 values, exact in float64

Slots a kernel does not read hold the quantizer (1, 0).  Why: these are the only values in which the attentions of
a ViT's blocks differ; baked into the code as constants they made one kernel per block (DeiT-Small: twelve, most
of its compile time), read at run time they make one kernel per shape.  The operations are the same either way
(a float64 add of log2(s), the quantizers' `epilogue.quantize_codes`), so the results are too (tested).
"""

from __future__ import annotations

import math

import numpy as np

from .epilogue import QUANT, Quantizer, quantizer_args

SLOTS = ("q", "k", "v", "out")
CONSTS = 1 + QUANT * len(SLOTS)


def log2_scale(scale: float) -> float:
    """The float64 log2 of the float32 softmax scale (as the unfused `log_weights` kernel takes it too)."""
    return math.log2(float(np.float32(scale)))


def attention_consts(log2s: float, quantizers: dict | None = None) -> np.ndarray:
    """float64 [`CONSTS`]: the softmax scale's log2 (`log2_scale`, or the unfused kernel's ``log2s`` operand) and the
    quantizers ``{slot: (scale, zero point)}``."""
    unknown = set(quantizers or {}) - set(SLOTS)
    if unknown:
        raise ValueError(f"no quantizer slot {sorted(unknown)} in a fused attention, only {SLOTS}")
    consts = np.zeros(CONSTS, np.float64)
    consts[0] = log2s
    for slot in SLOTS:
        consts = with_quantizer(consts, slot, *(quantizers or {}).get(slot, (1.0, 0)))
    return consts


def with_quantizer(consts: np.ndarray, slot: str, scale: float, zp: int) -> np.ndarray:
    """A copy of ``consts`` with the quantizer of ``slot`` set."""
    if consts.shape != (CONSTS,):
        raise ValueError(f"attention constants are float64 [{CONSTS}], got shape {consts.shape}")
    out = np.array(consts, np.float64)
    i = 1 + QUANT * SLOTS.index(slot)
    out[i:i + QUANT] = quantizer_args(scale, zp)
    return out


def loaded_log2_scale(consts):
    """The float64 log2(s) a kernel reads from its ``consts`` buffer."""
    return consts[0]


def loaded_quantizer(consts, slot: str) -> Quantizer:
    """Quantizer ``slot`` a kernel reads from its ``consts`` buffer, as float32 (`epilogue.Quantizer`)."""
    i = 1 + QUANT * SLOTS.index(slot)
    return Quantizer(*(consts[i + j].astype("float32") for j in range(QUANT)))
