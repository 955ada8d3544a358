"""The calibrated-model file (`.repq`): what `repq-tvm calibrate` writes and the compiler reads.

A safetensors file, so loading never unpickles code: tensors are the reparameterized FP weights and
every quantizer's scale / zero point (`<quantizer>.scale`, `<quantizer>.zero_point`); the metadata
holds JSON: the format tag and version, the architecture, the input preprocessing, the quantization
config and a table of every quantizer (kind, bits, layer- or channel-wise).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from . import __version__
from .atomic import atomic_file
from .errors import ReqError

FORMAT = "repq-tvm-calibrated"
VERSION = 1


@dataclass
class CalibratedModel:
    model: torch.nn.Module
    arch: dict
    config: "QuantConfig"  # noqa: F821
    info: dict  # free-form provenance: calibration data, image count, method

    @property
    def preprocessing(self) -> dict:
        return self.arch["data"]


def save(path: str, cm: CalibratedModel) -> None:
    from safetensors.torch import save_file

    from .quant.wrap import quantizers

    tensors = {k: v.detach().contiguous() for k, v in cm.model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "repq_tvm": __version__,
        "arch": json.dumps(cm.arch),
        "quant_config": json.dumps(cm.config.to_dict()),
        "quantizers": json.dumps({n: q.describe() for n, q in quantizers(cm.model).items()}),
        "info": json.dumps(cm.info),
    }
    with atomic_file(path) as tmp:  # an interrupted save keeps the previous file
        save_file(tensors, tmp, metadata=meta)


def _read(path: str) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise ReqError(f"calibrated model not found: {path}")
    try:  # safetensors reports an unreadable file as "No such file or directory": ask the OS first
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ReqError(f"cannot read the calibrated model {path}: {exc.strerror or exc}") from None
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ReqError(f"{path} is not a repq-tvm calibrated model (no '{FORMAT}' tag)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ReqError(f"{path} is not a readable repq-tvm calibrated model: {str(exc).splitlines()[0]}") from None
    if meta.get("version") != str(VERSION):
        raise ReqError(f"{path} has calibrated-model format version {meta.get('version')}; "
                       f"this repq-tvm reads version {VERSION}")
    try:
        parsed = {k: json.loads(meta[k]) for k in ("arch", "quant_config", "quantizers", "info")}
    except (KeyError, json.JSONDecodeError) as exc:
        raise ReqError(f"{path} has corrupt metadata: {exc}") from None
    for key, value in parsed.items():
        if not isinstance(value, dict) or (key == "quantizers"
                                           and not all(isinstance(d, dict) for d in value.values())):
            raise ReqError(f"{path} has corrupt metadata: {key} is not an object")
    return parsed, tensors


def load(path: str) -> CalibratedModel:
    """Rebuild the quantized model exactly as calibrated (quantizers frozen, calibration off)."""
    from . import models
    from .quant.config import QuantConfig
    from .quant.wrap import quantize_model, quantizers, set_quant_state

    from .evaluate import check_data_config

    meta, tensors = _read(path)
    try:  # the metadata is the user's file: a wrong key or type in it is bad input, not a bug here
        cfg = QuantConfig.from_dict(meta["quant_config"])
    except TypeError as exc:
        raise ReqError(f"{path} has a quantization config this repq-tvm cannot read: {exc}") from None
    check_data_config(meta["arch"].get("data"), f"{path}")
    try:
        net = models.build(meta["arch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ReqError(f"{path} describes an architecture repq-tvm cannot build: {type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    model = quantize_model(net, cfg)
    for name, q in quantizers(model).items():
        desc = meta["quantizers"].get(name)
        if desc is None or desc.get("kind") != q.kind:
            raise ReqError(f"{path} does not match its architecture: quantizer {name} is missing or differs")
        if hasattr(q, "channel_wise"):
            if not isinstance(desc.get("channel_wise"), bool):
                raise ReqError(f"{path} has corrupt metadata: quantizer {name} has no channel_wise flag")
            q.channel_wise = desc["channel_wise"]
        for buf in ("scale", "zero_point"):
            if hasattr(q, buf):
                if f"{name}.{buf}" not in tensors:
                    raise ReqError(f"{path} is incomplete: no {name}.{buf}")
                setattr(q, buf, tensors[f"{name}.{buf}"])
    for name, m in model.named_modules():  # reparameterization may have given a bias-free linear a bias
        if isinstance(m, torch.nn.Linear) and m.bias is None and f"{name}.bias" in tensors:
            m.bias = torch.nn.Parameter(torch.empty_like(tensors[f"{name}.bias"]))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise ReqError(f"{path} does not match its architecture: {str(exc).splitlines()[0]}") from None
    set_quant_state(model, enabled=True, calibrating=False)
    return CalibratedModel(model.eval(), meta["arch"], cfg, meta["info"])


def read_metadata(path: str) -> dict:
    """Metadata only (architecture, config, quantizer table): what a compiler needs before it builds."""
    return _read(path)[0]
