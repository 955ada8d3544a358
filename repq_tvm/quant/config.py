"""What to quantize how: bit widths and the choice of quantizer for post-LayerNorm and post-Softmax activations.

`METHODS` names the configurations the accuracy table compares: RepQ-ViT, a plain PTQ baseline, and
RepQ-ViT without each of its two ingredients.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..errors import ReqError
from .quantizers import SUPPORTED_BITS

POST_LN_CHOICES = ("reparam", "channel", "layer")
POST_SOFTMAX_CHOICES = ("log_sqrt2", "log2", "uniform")
SEARCH_CHOICES = ("percentile", "minmax")


@dataclass(frozen=True)
class QuantConfig:
    """`post_ln`: reparam = channel-wise calibration folded into a layer-wise quantizer (RepQ-ViT),
    channel = channel-wise kept at inference (not integer-friendly), layer = layer-wise from the start.
    `post_softmax`: log_sqrt2 (RepQ-ViT), log2, or uniform. `search`: percentile MSE search or plain min/max.
    `integer_zero_point`: round the reparameterized zero point (integer kernels need it; the reference keeps a float mean).
    """

    w_bits: int = 4
    a_bits: int = 4
    post_ln: str = "reparam"
    post_softmax: str = "log_sqrt2"
    search: str = "percentile"
    integer_zero_point: bool = True
    patch_embed_bits: int = 8

    def __post_init__(self):
        for what, bits in (("weight", self.w_bits), ("activation", self.a_bits)):
            if bits not in SUPPORTED_BITS:
                raise ReqError(f"{what} bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits}")
        for field, value, choices in (("post_ln", self.post_ln, POST_LN_CHOICES),
                                      ("post_softmax", self.post_softmax, POST_SOFTMAX_CHOICES),
                                      ("search", self.search, SEARCH_CHOICES)):
            if value not in choices:
                raise ReqError(f"{field} must be one of {', '.join(choices)}, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        return cls(**d)


METHODS = {
    "repq-vit": {},
    "ptq-baseline": {"post_ln": "layer", "post_softmax": "uniform", "search": "minmax"},
    "repq-no-ln-reparam": {"post_ln": "layer"},
    "repq-no-log-sqrt2": {"post_softmax": "uniform"},
    "repq-float-zero-point": {"integer_zero_point": False},
}


def method_config(method: str, w_bits: int, a_bits: int) -> QuantConfig:
    if method not in METHODS:
        raise ReqError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
    return replace(QuantConfig(w_bits=w_bits, a_bits=a_bits), **METHODS[method])
