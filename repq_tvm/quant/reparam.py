"""RepQ-ViT scale reparameterization: a channel-wise post-LayerNorm quantizer becomes a layer-wise one.

With channel scales s, zero points z: s̃ = mean(s), z̃ = mean(z) (rounded when integer kernels need it),
r = s/s̃, b = (−z·s)/r − (−z̃·s̃). LayerNorm: γ' = γ/r, β' = β/r − b. Next linear: W' = W·r (per input
column), bias' = bias + W'·b. The FP function is unchanged; with an integer z̃ the quantized codes are
unchanged too (x'/s̃ + z̃ = x/s + z per channel), so only the re-calibrated weight quantizer moves.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import QuantLinear
from .quantizers import UniformQuantizer
from .wrap import norm_pairs


@torch.no_grad()
def reparameterize_pair(norm: nn.LayerNorm, linear: QuantLinear, integer_zero_point: bool = True) -> None:
    aq: UniformQuantizer = linear.input_quantizer
    if not (aq.ready and aq.channel_wise):
        raise RuntimeError("reparameterization needs a calibrated channel-wise input quantizer")
    s, z = aq.scale.reshape(-1), aq.zero_point.reshape(-1)
    s_t, z_t = s.mean(), z.mean()
    if integer_zero_point:
        z_t = torch.round(z_t)
    r = s / s_t
    b = (-z * s) / r - (-z_t * s_t)

    norm.weight.copy_(norm.weight / r)
    norm.bias.copy_(norm.bias / r - b)
    linear.weight.copy_(linear.weight * r[None, :])
    shift = linear.weight @ b
    if linear.bias is None:
        linear.bias = nn.Parameter(shift)
    else:
        linear.bias.copy_(linear.bias + shift)
    aq.set_layerwise(s_t, z_t)
    linear.weight_quantizer.reset()


def reparameterize(model: nn.Module, integer_zero_point: bool = True) -> list[tuple[str, str]]:
    """Reparameterize every post-LayerNorm pair; the weight quantizers of the changed linears must then be
    re-calibrated (the next calibrating forward pass does it)."""
    pairs = norm_pairs(model)
    for norm_name, lin_name in pairs:
        reparameterize_pair(model.get_submodule(norm_name), model.get_submodule(lin_name), integer_zero_point)
    return pairs
