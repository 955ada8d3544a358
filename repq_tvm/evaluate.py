"""Top-1 / top-5 accuracy of anything that maps a batch of preprocessed images to logits."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from . import data
from .errors import ReqError


def check_data_config(data_cfg, where: str) -> dict:
    """`data_cfg` if it is a preprocessing config `make_transform` can use; a ReqError naming `where` (the file
    it came from: a calibrated model's metadata or an artifact's manifest) if not."""
    def numbers(v, n):
        return isinstance(v, list) and len(v) == n and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                           for x in v)

    problem = None
    if not isinstance(data_cfg, dict):
        problem = "is not an object"
    elif not (numbers(data_cfg.get("input_size"), 3) and all(isinstance(x, int) and x > 0
                                                                for x in data_cfg["input_size"])):
        problem = f"input_size must be three positive integers [C, H, W], got {data_cfg.get('input_size')!r}"
    elif not all(numbers(data_cfg.get(k), data_cfg["input_size"][0]) for k in ("mean", "std")):
        problem = "mean and std must hold one number per channel"
    elif any(s == 0 for s in data_cfg["std"]):
        problem = "std must not be 0"
    elif not isinstance(data_cfg.get("crop_pct", 1.0), (int, float)) or not data_cfg.get("crop_pct", 1.0) > 0:
        problem = f"crop_pct must be a positive number, got {data_cfg.get('crop_pct')!r}"
    elif not all(isinstance(data_cfg.get(k, ""), str) for k in ("interpolation", "crop_mode")):
        problem = "interpolation and crop_mode must be strings"
    if problem:
        raise ReqError(f"{where}: the preprocessing config {problem}")
    return data_cfg


def make_transform(data_cfg: dict):
    """The model's eval preprocessing (timm's transform from its data config)."""
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data_cfg.items() if k in keys},
                            is_training=False)


def load_batch(source: data.ImageSource, indices, transform) -> tuple[torch.Tensor, np.ndarray]:
    ds = data.TransformedImages(source.subset(indices), transform)
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), np.array(ys)


def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], source: data.ImageSource, transform,
             limit: int | None = None, batch_size: int = 100, num_classes: int | None = None,
             progress: bool = True) -> dict:
    """Run `predict` over (a fixed random subset of) the images; returns top1/top5 in percent, the image count and
    per-image top-1 correctness (`correct`, same image order for every model, for paired comparisons)."""
    if num_classes is not None and len(source.classes) > num_classes:
        raise ReqError(f"the data has {len(source.classes)} classes but the model predicts {num_classes}")
    indices = data.sample_indices(len(source), limit)
    top5 = 0
    correct = []
    t0 = time.time()
    with tqdm(total=len(indices), desc="evaluating", unit="img", disable=not progress, leave=False) as bar:
        for i in range(0, len(indices), batch_size):
            x, y = load_batch(source, indices[i:i + batch_size], transform)
            with torch.no_grad():
                logits = predict(x)
            k = min(5, logits.shape[-1])
            top = logits.topk(k, dim=-1).indices.numpy()
            top5 += int((top == y[:, None]).any(1).sum())
            correct.append(top[:, 0] == y)
            bar.update(len(y))
    n, hits = len(indices), np.concatenate(correct)
    return {"top1": 100.0 * int(hits.sum()) / n, "top5": 100.0 * top5 / n, "images": n,
            "seconds": round(time.time() - t0, 3), "correct": hits.tolist()}


def paired_margin(correct_a, correct_b, rounds: int = 10000, seed: int = 0) -> dict:
    """Top-1 of model a minus top-1 of model b in points, with a 95% paired-bootstrap interval.

    `correct_a` / `correct_b` are `accuracy()`'s per-image `correct` lists for the same images in the same
    order. Both models see the same images, so the per-image difference is resampled (rounds x N draws of
    images with replacement): much tighter than two separate binomial errors, and "a beats b beyond the noise
    of this sample" is the statement `ci95[0] > 0`. Fixed `seed`: the same inputs give the same interval.
    """
    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"need two per-image results over the same images, got shapes {a.shape} and {b.shape}")
    diff = a - b
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(rounds, len(diff)))
    boot = 100.0 * diff[idx].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"points": round(float(100.0 * diff.mean()), 2), "ci95": [round(float(lo), 2), round(float(hi), 2)],
            "images": len(diff)}
