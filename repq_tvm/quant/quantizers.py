"""Fake quantizers used during calibration: uniform (layer-/channel-wise) and logarithmic (log√2, log2).

Each quantizer calibrates itself from the first tensor it sees while `calibrating` is set (one forward
pass over the calibration batch), then simulates quantization in float. The integer compiler reads the
frozen scale / zero point / bits, never this code.
"""

from __future__ import annotations

import math

import torch
from torch import nn

PERCENTILES = (0.999, 0.9999, 0.99999)
SUPPORTED_BITS = (4, 6, 8)


def quantiles_rows(x: torch.Tensor, qs) -> list[torch.Tensor]:
    """Quantiles of every row of a 2-D tensor, with torch.quantile's linear interpolation (no size limit)."""
    srt = torch.sort(x, dim=1).values
    n, out = x.shape[1], []
    for q in qs:
        pos = q * (n - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, n - 1)
        out.append(srt[:, lo] + (srt[:, hi] - srt[:, lo]) * (pos - lo))
    return out


def uniform_fake_quant(x, scale, zero_point, bits):
    """x̂ = (clamp(round(x/s) + z, 0, 2^b − 1) − z)·s."""
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 2 ** bits - 1)
    return (q - zero_point) * scale


def uniform_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point mapping [lo, hi] onto [0, 2^b − 1]."""
    scale = torch.clamp((hi - lo) / (2 ** bits - 1), min=1e-8)
    return scale, torch.round(-lo / scale)


def log_codes(x: torch.Tensor, scale, bits: int, sqrt2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes of the log quantizer and the mask of inputs that underflow to 0 (code > 2^b − 1)."""
    mult = 2.0 if sqrt2 else 1.0
    raw = torch.round(-mult * torch.log2(x / scale))
    underflow = raw > 2 ** bits - 1  # also x <= 0: log2 gives -inf / nan
    underflow |= torch.isnan(raw)
    return torch.clamp(torch.nan_to_num(raw, nan=0.0), 0, 2 ** bits - 1), underflow


def log_dequant(codes: torch.Tensor, underflow: torch.Tensor, scale, sqrt2: bool) -> torch.Tensor:
    """log√2: s·2^(−⌈q/2⌉)·(1 + (√2 − 1)·(q mod 2)); log2: s·2^(−q)."""
    if sqrt2:
        odd = torch.remainder(codes, 2)
        val = torch.pow(2.0, -torch.ceil(codes / 2)) * (1 + (math.sqrt(2) - 1) * odd) * scale
    else:
        val = torch.pow(2.0, -codes) * scale
    return torch.where(underflow, torch.zeros_like(val), val)


def split_log_sqrt2(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterize log√2 codes to log2 form: (shift = ⌈q/2⌉, odd = q mod 2), x̂ = s·2^(−shift)·√2^odd."""
    codes = codes.to(torch.int64)
    return (codes + 1) // 2, codes % 2


class Quantizer(nn.Module):
    """Common state: bit width, calibration switch, on/off switch."""

    kind = "none"

    def __init__(self, bits: int):
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
        self.bits = bits
        self.calibrating = False
        self.enabled = True
        self.register_buffer("scale", None)

    @property
    def ready(self) -> bool:
        return self.scale is not None

    def reset(self) -> None:
        """Forget the calibrated parameters so the next calibrating pass sets them again."""
        self.scale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if not self.ready:
            if not self.calibrating:
                raise RuntimeError(f"{type(self).__name__} used before calibration")
            self.calibrate(x.detach())
        return self.fake_quant(x)

    def calibrate(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind, "bits": self.bits}


class UniformQuantizer(Quantizer):
    """Asymmetric uniform quantizer, layer-wise or per channel, with percentile or min/max calibration.

    `channel_dim` is the channel axis: -1 for token activations, 0 for weights.
    """

    kind = "uniform"

    def __init__(self, bits: int, channel_wise: bool = False, channel_dim: int = -1, search: str = "percentile"):
        super().__init__(bits)
        if search not in ("percentile", "minmax"):
            raise ValueError(f"unknown search {search!r}")
        self.channel_wise, self.channel_dim, self.search = channel_wise, channel_dim, search
        self.register_buffer("zero_point", None)

    def reset(self) -> None:
        super().reset()
        self.zero_point = None

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """Calibration data as [channels, samples] (one row for layer-wise)."""
        if not self.channel_wise:
            return x.reshape(1, -1)
        return x.movedim(self.channel_dim, 0).reshape(x.shape[self.channel_dim], -1)

    def _shape(self, x: torch.Tensor) -> list[int]:
        """Broadcast shape of per-channel parameters against x."""
        shape = [1] * x.dim()
        shape[self.channel_dim] = x.shape[self.channel_dim]
        return shape

    def calibrate(self, x: torch.Tensor) -> None:
        rows = self._rows(x.float())
        if self.search == "minmax":
            scale, zp = uniform_params(rows.min(1).values, rows.max(1).values, self.bits)
        else:
            best = None
            qs = quantiles_rows(rows, [1 - p for p in PERCENTILES] + list(PERCENTILES))
            for lo, hi in zip(qs[:len(PERCENTILES)], qs[len(PERCENTILES):]):
                s, z = uniform_params(lo, hi, self.bits)
                err = (uniform_fake_quant(rows, s[:, None], z[:, None], self.bits) - rows).pow(2).sum(1)
                if best is None:
                    best = (err, s, z)
                else:  # per row, keep the candidate with least squared error (ties keep the earlier one)
                    better = err < best[0]
                    best = (torch.where(better, err, best[0]), torch.where(better, s, best[1]),
                            torch.where(better, z, best[2]))
            _, scale, zp = best
        if self.channel_wise:
            shape = self._shape(x)
            self.scale, self.zero_point = scale.reshape(shape), zp.reshape(shape)
        else:
            self.scale, self.zero_point = scale.reshape(()), zp.reshape(())

    def set_layerwise(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.channel_wise = False
        self.scale, self.zero_point = scale.reshape(()).clone(), zero_point.reshape(()).clone()

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return uniform_fake_quant(x, self.scale, self.zero_point, self.bits)

    def describe(self) -> dict:
        return {**super().describe(), "channel_wise": self.channel_wise, "channel_dim": self.channel_dim,
                "search": self.search}


class LogQuantizer(Quantizer):
    """Post-Softmax quantizer: log√2 (RepQ-ViT calibration) or plain log2. One scale per layer.

    `q = clamp(round(−m·log2(x/s)), 0, 2^b − 1)` with m = 2 for log√2 and 1 for log2; codes past
    2^b − 1 dequantize to 0. At inference a log√2 code q is a right shift by ⌈q/2⌉ and, for odd q,
    one √2 multiply (`split_log_sqrt2`).
    """

    def __init__(self, bits: int, sqrt2: bool = True):
        super().__init__(bits)
        self.sqrt2 = sqrt2

    @property
    def kind(self) -> str:
        return "log_sqrt2" if self.sqrt2 else "log2"

    def calibrate(self, x: torch.Tensor) -> None:
        flat = x.float().reshape(1, -1)
        best = None
        for q in quantiles_rows(flat, PERCENTILES):
            s = q[0].clamp(min=1e-8)
            err = (self._quant(flat, s) - flat).pow(2).sum()
            if best is None or err < best[0]:
                best = (err, s)
        self.scale = best[1].reshape(())

    def _quant(self, x, scale):
        codes, underflow = log_codes(x, scale, self.bits, self.sqrt2)
        return log_dequant(codes, underflow, scale, self.sqrt2)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        return self._quant(x, self.scale)

    def codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return log_codes(x, self.scale, self.bits, self.sqrt2)
