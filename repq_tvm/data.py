"""Image data: ImageFolder directories, tar files of that layout, and the project's .npz image packs.

One rule for every source: an image's class is the name of the folder that holds it, and class
indices follow the sorted class names (the ImageNet convention for synset folders).
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ReqError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass
class ImageSource:
    """A list of (location, class index) pairs plus a way to open one location as an RGB PIL image."""

    path: str
    classes: list[str]
    items: list[tuple[object, int]]
    _tar: tarfile.TarFile | None = field(default=None, repr=False)
    _arrays: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.items)

    def labels(self) -> np.ndarray:
        return np.array([label for _, label in self.items], dtype=np.int64)

    def open(self, index: int) -> Image.Image:
        loc, _ = self.items[index]
        try:
            if self._arrays is not None:
                return Image.fromarray(self._arrays[loc])
            if self._tar is not None:
                data = self._tar.extractfile(loc).read()
                return Image.open(io.BytesIO(data)).convert("RGB")
            return Image.open(loc).convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            name = loc if self._arrays is None else f"#{loc}"
            raise ReqError(f"cannot read image {name} in {self.path}: {exc}") from None

    def subset(self, indices) -> "ImageSource":
        return ImageSource(self.path, self.classes, [self.items[i] for i in indices], self._tar, self._arrays)


def _from_pairs(path: str, pairs: list[tuple[object, str]], **kw) -> ImageSource:
    if not pairs:
        raise ReqError(f"no images found in {path} (expected <class>/<image> files)")
    classes = sorted({c for _, c in pairs})
    index = {c: i for i, c in enumerate(classes)}
    pairs = sorted(pairs, key=lambda p: (p[1], str(p[0].name if hasattr(p[0], "name") else p[0])))
    return ImageSource(path, classes, [(loc, index[c]) for loc, c in pairs], **kw)


def _open_dir(path: str) -> ImageSource:
    pairs = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            if _is_image(f):
                pairs.append((os.path.join(root, f), os.path.basename(root)))
    return _from_pairs(path, pairs)


def _open_tar(path: str) -> ImageSource:
    try:
        tar = tarfile.open(path, "r:*")
        members = [m for m in tar.getmembers() if m.isfile() and _is_image(m.name)]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ReqError(f"cannot read tar file {path}: {exc}") from None
    pairs = [(m, os.path.basename(os.path.dirname(m.name))) for m in members]
    return _from_pairs(path, pairs, _tar=tar)


def _open_npz(path: str) -> ImageSource:
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels, classes = z["images"], z["labels"], [str(c) for c in z["classes"]]
    except (OSError, ValueError, KeyError) as exc:
        raise ReqError(f"cannot read image pack {path} (need arrays images, labels, classes): {exc}") from None
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8 or len(images) != len(labels):
        raise ReqError(f"image pack {path} must hold uint8 images [N,H,W,3] and N labels")
    if len(images) == 0:
        raise ReqError(f"no images found in {path}")
    items = [(i, int(labels[i])) for i in range(len(images))]
    return ImageSource(path, classes, items, _arrays=images)


def open_images(path: str) -> ImageSource:
    """Open an ImageFolder directory, a tar of that layout, or a .npz image pack."""
    if not path:
        raise ReqError("data path is empty")
    if not os.path.exists(path):
        raise ReqError(f"data path does not exist: {path}")
    if os.path.isdir(path):
        return _open_dir(path)
    if path.endswith(".npz"):
        return _open_npz(path)
    if tarfile.is_tarfile(path):
        return _open_tar(path)
    raise ReqError(f"unsupported data path {path}: expected a folder, a .tar or a .npz image pack")


def sample_indices(n: int, count: int | None, seed: int = 0) -> np.ndarray:
    """A fixed random subset (stable across runs), so limits and calibration sets do not follow class order."""
    order = np.random.default_rng(seed).permutation(n)
    return order if count is None or count >= n else order[:count]


class TransformedImages:
    """A torch-style dataset: (preprocessed tensor, label) from an ImageSource and a transform."""

    def __init__(self, source: ImageSource, transform):
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        return self.transform(self.source.open(i)), self.source.items[i][1]


def decode_all(source: ImageSource, size: int | None = None) -> np.ndarray:
    """Decode every image into one uint8 [N,H,W,3] array (training and image packs)."""
    out = []
    for i in range(len(source)):
        img = source.open(i)
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        out.append(np.asarray(img, dtype=np.uint8))
    return np.stack(out)
