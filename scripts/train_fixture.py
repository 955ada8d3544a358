"""Train a bundled CIFAR-10 fixture (FP32 weights) from the CIFAR-10 training tar.

The split is fixed: for every class, images are sorted by file name and the last 500 are held out
(never trained on); the shipped evaluation pack is 100 of them per class. Resumable: a checkpoint is
written every epoch to --work-dir and picked up again on restart.

    python scripts/train_fixture.py --model vit_cifar10 --data cifar10-train.tar --epochs 15
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from repq_tvm import data, models  # noqa: E402

HELD_OUT_PER_CLASS = 500


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Train/held-out indices; sources are sorted by (class, file name) so this is the last 500 files per class."""
    train, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        train.extend(idx[:-HELD_OUT_PER_CLASS])
        held.extend(idx[-HELD_OUT_PER_CLASS:])
    return np.array(train), np.array(held)


def load_cifar(path: str, cache: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if os.path.exists(cache):
        z = np.load(cache)
        return z["images"], z["labels"], [str(c) for c in z["classes"]]
    src = data.open_images(path)
    print(f"decoding {len(src)} images from {path} ...", flush=True)
    images = data.decode_all(src, size=32)
    labels = src.labels()
    np.savez(cache, images=images, labels=labels, classes=np.array(src.classes))
    return images, labels, src.classes


def to_tensor(batch: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255)
    return (x - mean) / std


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel reflect padding and horizontal flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx = torch.randint(0, 9, (n,), generator=gen)
    dy = torch.randint(0, 9, (n,), generator=gen)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model, images, labels, mean, std, bs=500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), bs):
        logits = model(to_tensor(images[i:i + bs], mean, std))
        correct += (logits.argmax(-1).numpy() == labels[i:i + bs]).sum()
    return float(100.0 * correct / len(images))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=sorted(models.FIXTURES))
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--work-dir", default="runs")
    ap.add_argument("--out-dir", default=str(models.FIXTURE_DIR))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (10x slower than fp32 with torch 2.14.1 here)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    os.makedirs(args.work_dir, exist_ok=True)

    images, labels, classes = load_cifar(args.data, os.path.join(args.work_dir, "cifar10_decoded.npz"))
    train_idx, held_idx = split_indices(labels)
    arch = models.arch_for(args.model)
    model = models.build(arch).train()
    cfg = arch["data"]
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)

    steps_per_epoch = len(train_idx) // args.batch_size
    total = steps_per_epoch * args.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warmup = steps_per_epoch

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    ckpt_path = os.path.join(args.work_dir, f"{args.model}.ckpt.pt")
    start_epoch, history = 0, []
    if os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        start_epoch, history = ck["epoch"], ck["history"]
        print(f"resumed {args.model} at epoch {start_epoch}", flush=True)

    gen = torch.Generator().manual_seed(1234)
    for epoch in range(start_epoch, args.epochs):
        model.train()
        order = np.random.default_rng(epoch).permutation(train_idx)
        t0, loss_sum = time.time(), 0.0
        for s in range(steps_per_epoch):
            step = epoch * steps_per_epoch + s
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            idx = order[s * args.batch_size:(s + 1) * args.batch_size]
            x = augment(to_tensor(images[idx], mean, std), gen)
            y = torch.from_numpy(labels[idx])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = F.cross_entropy(model(x).float(), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss_sum += loss.item()
            if s % 50 == 0:
                print(f"epoch {epoch + 1}/{args.epochs} step {s}/{steps_per_epoch} loss {loss.item():.3f}", flush=True)
        acc = evaluate(model, images[held_idx], labels[held_idx], mean, std)
        history.append({"epoch": epoch + 1, "loss": loss_sum / steps_per_epoch, "held_out_top1": acc,
                        "seconds": time.time() - t0})
        print(json.dumps(history[-1]), flush=True)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1, "history": history},
                   ckpt_path)

    from safetensors.torch import save_file

    os.makedirs(args.out_dir, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(args.out_dir, f"{args.model}.safetensors"))
    with open(os.path.join(args.out_dir, f"{args.model}.train.json"), "w") as f:
        json.dump({"model": args.model, "arch": arch["kwargs"], "epochs": args.epochs, "batch_size": args.batch_size,
                   "lr": args.lr, "held_out_per_class": HELD_OUT_PER_CLASS, "history": history}, f, indent=1)
    print(f"wrote {args.model}.safetensors (held-out top-1 {history[-1]['held_out_top1']:.2f}%)", flush=True)


if __name__ == "__main__":
    main()
