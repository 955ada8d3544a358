"""Quantizers as torch custom ops, so an exported graph shows each quantizer as one named node.

`as_custom_ops(model)` temporarily swaps every calibrated quantizer's forward for a call to a
`torch.ops.repq.*` op with the frozen parameters as arguments (weights: precomputed uint8 codes).
The ops compute exactly what the quantizers compute, so the swapped model is the same function; the
exporters then map each op to the canonical form instead of tracing the rounding arithmetic.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import ReqError
from ..quant.quantizers import LogQuantizer, UniformQuantizer, log_codes, log_dequant, uniform_fake_quant
from ..quant.wrap import quantizers


@torch.library.custom_op("repq::fake_quant", mutates_args=())
def fake_quant(x: torch.Tensor, scale: float, zero_point: int, bits: int) -> torch.Tensor:
    """Layer-wise uniform fake quantization (an activation)."""
    return uniform_fake_quant(x, torch.tensor(scale, dtype=torch.float32), zero_point, bits)


@fake_quant.register_fake
def _(x, scale, zero_point, bits):
    return torch.empty_like(x)


@torch.library.custom_op("repq::dequantize_weight", mutates_args=())
def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Per-output-channel dequantization of uint8 weight codes: (codes − z[n])·s[n] along dim 0."""
    shape = [-1] + [1] * (codes.dim() - 1)
    return (codes.float() - zero_point.float().view(shape)) * scale.view(shape)


@dequantize_weight.register_fake
def _(codes, scale, zero_point):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


@torch.library.custom_op("repq::log_fake_quant", mutates_args=())
def log_fake_quant(x: torch.Tensor, scale: float, bits: int, sqrt2: bool) -> torch.Tensor:
    """Post-Softmax log√2 (sqrt2) or log2 fake quantization, one scale per layer."""
    s = torch.tensor(scale, dtype=torch.float32)
    codes, underflow = log_codes(x, s, bits, sqrt2)
    return log_dequant(codes, underflow, s, sqrt2)


@log_fake_quant.register_fake
def _(x, scale, bits, sqrt2):
    return torch.empty_like(x)


def _layerwise(name: str, q: UniformQuantizer) -> tuple[float, int]:
    """Scalar scale and integer uint8 zero point, or a ReqError saying why the canonical form cannot hold it."""
    if q.scale.numel() != 1:
        raise ReqError(f"quantizer {name} is channel-wise: the frontends export layer-wise activation quantizers only")
    zp = float(q.zero_point)
    if zp != round(zp) or not 0 <= zp <= 255:
        raise ReqError(f"quantizer {name} has zero point {zp}: the frontends need an integer in [0, 255]")
    return float(q.scale), int(zp)


def weight_codes(q: UniformQuantizer, weight: torch.Tensor) -> torch.Tensor:
    """uint8 codes clamp(round(W/s) + z, 0, 2^b − 1) of a per-channel weight quantizer."""
    codes = torch.clamp(torch.round(weight / q.scale) + q.zero_point, 0, 2 ** q.bits - 1)
    return codes.to(torch.uint8)


def _weight_forward(name: str, q: UniformQuantizer, weight: torch.Tensor):
    zp = q.zero_point.reshape(-1)
    if q.scale.dim() == 0 or q.scale.shape[0] != weight.shape[0] or q.scale.numel() != weight.shape[0]:
        raise ReqError(f"quantizer {name} is not per output channel")
    if torch.any(zp != torch.round(zp)) or zp.min() < 0 or zp.max() > 255:
        raise ReqError(f"quantizer {name} has zero points outside the integers 0..255")
    q.register_buffer("_repq_codes", weight_codes(q, weight.detach()), persistent=False)
    q.register_buffer("_repq_scale", q.scale.reshape(-1).float().clone(), persistent=False)
    q.register_buffer("_repq_zp", zp.to(torch.uint8), persistent=False)
    return lambda w: torch.ops.repq.dequantize_weight(q._repq_codes, q._repq_scale, q._repq_zp)


def _weight_owners(model: nn.Module) -> dict[int, torch.Tensor]:
    """id(weight quantizer) → the weight it quantizes (QuantLinear / QuantConv2d)."""
    return {id(m.weight_quantizer): m.weight for m in model.modules() if hasattr(m, "weight_quantizer")}


@contextlib.contextmanager
def as_custom_ops(model: nn.Module):
    """Inside the block every enabled quantizer of `model` calls a `torch.ops.repq` op; restored on exit."""
    owners = _weight_owners(model)
    swapped = []
    try:
        for name, q in quantizers(model).items():
            if not q.enabled:
                continue
            if not q.ready:
                raise ReqError(f"quantizer {name} is not calibrated")
            if isinstance(q, LogQuantizer):
                s, b, r2 = float(q.scale), q.bits, q.sqrt2
                fwd = lambda x, s=s, b=b, r2=r2: torch.ops.repq.log_fake_quant(x, s, b, r2)  # noqa: E731
            elif isinstance(q, UniformQuantizer) and id(q) in owners:
                fwd = _weight_forward(name, q, owners[id(q)])
            elif isinstance(q, UniformQuantizer):
                (s, z), b = _layerwise(name, q), q.bits
                fwd = lambda x, s=s, z=z, b=b: torch.ops.repq.fake_quant(x, s, z, b)  # noqa: E731
            else:
                raise ReqError(f"quantizer {name} ({type(q).__name__}) has no export form")
            q.forward = fwd
            swapped.append(q)
        yield model
    finally:
        for q in swapped:
            del q.forward
            for buf in ("_repq_codes", "_repq_scale", "_repq_zp"):
                q._buffers.pop(buf, None)
