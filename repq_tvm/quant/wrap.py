"""Turn a timm ViT / DeiT / Swin into its fake-quantized twin, and name what the reparameterization touches.

Every nn.Linear and the patch-embedding Conv2d get an input quantizer (A bits; patch embedding 8 bits)
and a per-output-channel weight quantizer; both attention matmuls become `QuantMatMul`s. The inputs
of the linears that follow a LayerNorm (`norm_pairs`) are calibrated channel-wise unless the config
says layer-wise. Anything else that computes (another conv, an unknown attention) is refused by name.
"""

from __future__ import annotations

from torch import nn

from ..errors import ReqError
from .attention import QuantAttention, QuantWindowAttention
from .config import QuantConfig
from .layers import QuantConv2d, QuantLinear, QuantMatMul
from .quantizers import LogQuantizer, Quantizer, UniformQuantizer


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def norm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(LayerNorm, following Linear) pairs whose LayerNorm output is quantized channel-wise and reparameterized:
    norm1 → attn.qkv and norm2 → mlp.fc1 in every block, Swin's patch-merging norm → reduction."""
    from timm.models.swin_transformer import PatchMerging

    pairs = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if hasattr(m, "norm1") and hasattr(m, "attn") and hasattr(m, "norm2") and hasattr(m, "mlp"):
            pairs += [(prefix + "norm1", prefix + "attn.qkv"), (prefix + "norm2", prefix + "mlp.fc1")]
        elif isinstance(m, PatchMerging):
            pairs.append((prefix + "norm", prefix + "reduction"))
    return pairs


def _check_blocks(model: nn.Module) -> None:
    """Only pre-norm blocks keep `norm → linear` adjacent, which the reparameterization relies on."""
    from timm.models.swin_transformer import SwinTransformerBlock
    from timm.models.vision_transformer import Block

    for name, m in model.named_modules():
        if hasattr(m, "norm1") and hasattr(m, "attn") and not isinstance(m, (Block, SwinTransformerBlock)):
            raise ReqError(f"unsupported layer {name} ({type(m).__name__}): only pre-norm ViT/Swin blocks are supported")
        if isinstance(m, (nn.LayerNorm,)) and not m.elementwise_affine:
            raise ReqError(f"unsupported layer {name}: LayerNorm without affine parameters")


def _uniform_act(cfg: QuantConfig, channel_wise: bool = False, bits: int | None = None) -> UniformQuantizer:
    return UniformQuantizer(bits or cfg.a_bits, channel_wise=channel_wise, channel_dim=-1, search=cfg.search)


def _softmax_act(cfg: QuantConfig) -> Quantizer:
    if cfg.post_softmax == "uniform":
        return _uniform_act(cfg)
    return LogQuantizer(cfg.a_bits, sqrt2=cfg.post_softmax == "log_sqrt2")


def _weight(cfg: QuantConfig) -> UniformQuantizer:
    return UniformQuantizer(cfg.w_bits, channel_wise=True, channel_dim=0, search=cfg.search)


def quantize_model(model: nn.Module, cfg: QuantConfig) -> nn.Module:
    """Replace layers in place with quantized ones (quantizers uncalibrated) and return the model."""
    from timm.layers import Attention
    from timm.models.swin_transformer import WindowAttention

    _check_blocks(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, Attention) and type(m) is Attention:
            if m.gate is not None:
                raise ReqError(f"unsupported layer {name}: gated attention")
            _set(model, name, QuantAttention(m, QuantMatMul(_uniform_act(cfg), _uniform_act(cfg)),
                                             QuantMatMul(_softmax_act(cfg), _uniform_act(cfg))))
        elif isinstance(m, WindowAttention) and type(m) is WindowAttention:
            _set(model, name, QuantWindowAttention(m, QuantMatMul(_uniform_act(cfg), _uniform_act(cfg)),
                                                   QuantMatMul(_softmax_act(cfg), _uniform_act(cfg))))
        elif "attention" in type(m).__name__.lower() or isinstance(m, nn.MultiheadAttention):
            raise ReqError(f"unsupported layer {name} ({type(m).__name__})")

    channel_inputs = {lin for _, lin in norm_pairs(model)} if cfg.post_ln != "layer" else set()
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear:
            _set(model, name, QuantLinear.wrap(m, _uniform_act(cfg, name in channel_inputs), _weight(cfg)))
        elif type(m) is nn.Conv2d:
            if not name.endswith("patch_embed.proj"):
                raise ReqError(f"unsupported layer {name} (Conv2d outside the patch embedding)")
            _set(model, name, QuantConv2d.wrap(m, _uniform_act(cfg, bits=cfg.patch_embed_bits), _weight(cfg)))
    return model


def quantizers(model: nn.Module) -> dict[str, Quantizer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Quantizer)}


def set_quant_state(model: nn.Module, enabled: bool = True, calibrating: bool = False) -> None:
    """Switch every quantizer on/off and in/out of calibration."""
    for q in quantizers(model).values():
        q.enabled, q.calibrating = enabled, calibrating
