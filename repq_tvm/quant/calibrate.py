"""The RepQ-ViT calibration flow: wrap → one calibrating pass → reparameterize → one more pass.

Quantizers calibrate lazily in forward order, so each one sees the already-quantized outputs of the
layers before it (as the reference implementation does). No labels, no gradients.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from .config import QuantConfig
from .reparam import reparameterize
from .wrap import quantize_model, quantizers, set_quant_state


def _calibrating_pass(model: nn.Module, images: torch.Tensor, desc: str, progress: bool) -> None:
    """One forward pass with calibration on, ticking a progress bar as each quantizer is set."""
    pending = [q for q in quantizers(model).values() if not q.ready]
    bar = tqdm(total=len(pending), desc=desc, unit="quantizer", disable=not progress, leave=False)
    def tick(*_):  # a forward hook's non-None return value would replace the quantizer's output
        bar.update(1)

    hooks = [q.register_forward_hook(tick) for q in pending]
    set_quant_state(model, enabled=True, calibrating=True)
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in hooks:
            h.remove()
        bar.close()
        set_quant_state(model, enabled=True, calibrating=False)


def calibrate(model: nn.Module, images: torch.Tensor, cfg: QuantConfig, progress: bool = True) -> nn.Module:
    """Quantize `model` in place with `cfg` from a calibration batch and return it, ready for inference."""
    model.eval()
    quantize_model(model, cfg)
    _calibrating_pass(model, images, "calibrating", progress)
    if cfg.post_ln == "reparam":
        reparameterize(model, cfg.integer_zero_point)
        _calibrating_pass(model, images, "re-calibrating", progress)
    return model
