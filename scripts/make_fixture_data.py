"""Write the image packs shipped with the fixtures, from the CIFAR-10 training tar and the fixed split.

- cifar10_heldout_1k.npz: 100 held-out images per class (never trained on), for evaluation;
- cifar10_calib_256.npz: 256 training-split images, from which calibration draws its 32.

    python scripts/make_fixture_data.py --data cifar10-train.tar
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train_fixture import load_cifar, split_indices  # noqa: E402

from repq_tvm import models  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--work-dir", default="runs")
    ap.add_argument("--out-dir", default=str(models.FIXTURE_DIR))
    args = ap.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    images, labels, classes = load_cifar(args.data, os.path.join(args.work_dir, "cifar10_decoded.npz"))
    train_idx, held_idx = split_indices(labels)
    rng = np.random.default_rng(2024)
    eval_idx = np.concatenate([rng.choice(held_idx[labels[held_idx] == c], 100, replace=False)
                               for c in range(len(classes))])
    calib_idx = rng.choice(train_idx, 256, replace=False)
    for name, idx in ((models.FIXTURE_EVAL_DATA, eval_idx), (models.FIXTURE_CALIB_DATA, calib_idx)):
        path = os.path.join(args.out_dir, name)
        np.savez_compressed(path, images=images[idx], labels=labels[idx], classes=np.array(classes))
        print(f"wrote {path}: {len(idx)} images, {os.path.getsize(path) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
