"""Quantized layers: an input (activation) quantizer and a weight quantizer around the float op.

QuantLinear / QuantConv2d subclass the torch layers so parameter names (and checkpoints) are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import Quantizer


def _adopt(cls, layer: nn.Module, attrs: tuple[str, ...], input_quantizer: Quantizer, weight_quantizer: Quantizer):
    """An instance of `cls` sharing `layer`'s parameters and configuration (no copy, same state-dict names)."""
    q = cls.__new__(cls)
    nn.Module.__init__(q)
    for attr in attrs:
        setattr(q, attr, getattr(layer, attr))
    q.weight, q.bias = layer.weight, layer.bias
    q.input_quantizer, q.weight_quantizer = input_quantizer, weight_quantizer
    return q


class QuantLinear(nn.Linear):
    """y = Q_a(x) · Q_w(W)ᵀ + b, weights per output channel."""

    input_quantizer: Quantizer
    weight_quantizer: Quantizer

    @classmethod
    def wrap(cls, linear: nn.Linear, input_quantizer: Quantizer, weight_quantizer: Quantizer) -> "QuantLinear":
        return _adopt(cls, linear, ("in_features", "out_features"), input_quantizer, weight_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(nn.Conv2d):
    """Patch embedding: y = conv(Q_a(x), Q_w(W)) + b, weights per output channel."""

    input_quantizer: Quantizer
    weight_quantizer: Quantizer

    @classmethod
    def wrap(cls, conv: nn.Conv2d, input_quantizer: Quantizer, weight_quantizer: Quantizer) -> "QuantConv2d":
        attrs = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode", "output_padding", "transposed", "_reversed_padding_repeated_twice")
        return _adopt(cls, conv, attrs, input_quantizer, weight_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.weight_quantizer(self.weight), self.bias)


class QuantMatMul(nn.Module):
    """a @ b with both operands quantized: `q @ kᵀ` (uniform, uniform) or `attn @ v` (log, uniform)."""

    def __init__(self, a_quantizer: Quantizer, b_quantizer: Quantizer):
        super().__init__()
        self.a_quantizer, self.b_quantizer = a_quantizer, b_quantizer

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a_quantizer(a) @ self.b_quantizer(b)
