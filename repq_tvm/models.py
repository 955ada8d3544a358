"""Model registry: timm names as users know them, plus the project's bundled CIFAR-10 fixtures.

A model is described by a small JSON-able `arch` dict so a calibrated file can rebuild it without
pickling code: either {"timm_name": ..., "overrides": {...}} or {"family": ..., "kwargs": {...}}.
"""

from __future__ import annotations

import os
from importlib import resources

import torch

from .errors import ReqError

FIXTURE_DIR = resources.files("repq_tvm") / "fixtures"

# The CIFAR-10 normalisation the fixtures were trained with.
_CIFAR_DATA = {
    "input_size": [3, 32, 32],
    "interpolation": "bicubic",
    "mean": [0.4914, 0.4822, 0.4465],
    "std": [0.2470, 0.2435, 0.2616],
    "crop_pct": 1.0,
    "crop_mode": "center",
}

FIXTURES = {
    "vit_cifar10": {
        "family": "vit",
        "kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 128, "depth": 6, "num_heads": 4,
                   "mlp_ratio": 4.0, "num_classes": 10},
    },
    # 8x8 windows: 64 tokens per softmax row, like Swin-T's 7x7 = 49. With 4x4 windows (16 tokens) any 4-bit
    # post-Softmax quantizer was nearly lossless, so the fixture could not tell the methods apart.
    "swin_cifar10": {
        "family": "swin",
        "kwargs": {"img_size": 32, "patch_size": 2, "window_size": 8, "embed_dim": 48, "depths": [2, 2, 2],
                   "num_heads": [3, 6, 12], "mlp_ratio": 4.0, "num_classes": 10},
    },
}

# The held-out evaluation images and the calibration images (from the training split) shipped with the fixtures.
FIXTURE_EVAL_DATA = "cifar10_heldout_1k.npz"
FIXTURE_CALIB_DATA = "cifar10_calib_256.npz"

SUPPORTED_TIMM_PREFIXES = ("vit_", "deit_", "deit3_", "swin_")


def fixture_file(name: str) -> str:
    return str(FIXTURE_DIR / name)


def _family_class(family: str):
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    return {"vit": VisionTransformer, "swin": SwinTransformer}[family]


def arch_for(name: str) -> dict:
    """The arch description of a fixture or timm model name; unknown or unsupported names are errors."""
    if name in FIXTURES:
        spec = FIXTURES[name]
        return {"name": name, "family": spec["family"], "kwargs": dict(spec["kwargs"]), "data": dict(_CIFAR_DATA)}
    import timm

    if not timm.is_model(name):
        raise ReqError(f"unknown model '{name}': use a bundled fixture ({', '.join(FIXTURES)}) or a timm model name")
    if not name.startswith(SUPPORTED_TIMM_PREFIXES):
        raise ReqError(f"unsupported architecture '{name}': repq-tvm quantizes timm ViT, DeiT and Swin models")
    return {"name": name, "timm_name": name, "overrides": {}}


def build(arch: dict) -> torch.nn.Module:
    """Instantiate the (randomly initialised) FP32 model an arch dict describes, in eval mode."""
    if "timm_name" in arch:
        import timm

        model = timm.create_model(arch["timm_name"], pretrained=False, **arch.get("overrides", {}))
    else:
        model = _family_class(arch["family"])(**arch["kwargs"])
    check_supported(model)
    return model.eval()


def check_supported(model: torch.nn.Module) -> None:
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, (VisionTransformer, SwinTransformer)):
        raise ReqError(f"unsupported architecture {type(model).__name__}: expected a timm VisionTransformer or SwinTransformer")


def data_config(arch: dict, model: torch.nn.Module) -> dict:
    """The model's input preprocessing (timm data config), as plain JSON-able values."""
    if "data" in arch:
        return dict(arch["data"])
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def load_state_dict(path: str) -> dict:
    """Read a checkpoint safely (safetensors, or torch.load with weights_only=True)."""
    if not path:
        raise ReqError("checkpoint not found: the path is empty")
    if os.path.isdir(path):
        raise ReqError(f"checkpoint {path} is a folder, expected a weights file")
    if not os.path.isfile(path):
        raise ReqError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt files raise many different types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        kind = "safetensors" if path.endswith(".safetensors") else "PyTorch"
        raise ReqError(f"cannot read checkpoint {path}: not a valid {kind} checkpoint "
                       f"({type(exc).__name__}: {first[:120]})") from None
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReqError(f"checkpoint {path} does not hold a state dict of tensors")
    return state


def _head_classes(state: dict) -> int | None:
    for key in ("head.weight", "head.fc.weight"):
        if key in state:
            return int(state[key].shape[0])
    return None


def load_model(name: str, checkpoint: str | None = None) -> tuple[torch.nn.Module, dict]:
    """Build `name` and load weights: the user's checkpoint, else the fixture's shipped weights, else random init."""
    arch = arch_for(name)
    if checkpoint is None and name in FIXTURES:
        checkpoint = fixture_file(f"{name}.safetensors")
    state = load_state_dict(checkpoint) if checkpoint is not None else None  # an empty path is an error
    if state is not None and "timm_name" in arch:
        classes = _head_classes(state)
        if classes is not None:
            arch["overrides"]["num_classes"] = classes
    model = build(arch)
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise ReqError(f"checkpoint {checkpoint} does not fit {name}: {what}")
    arch["data"] = data_config(arch, model)
    return model, arch
