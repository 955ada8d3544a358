"""Image sources: folders, tars and .npz packs give the same classes, labels and pixels."""

import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from repq_tvm import data, models
from repq_tvm.errors import ReqError


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "val"
    for cls in ("n02", "n01"):
        os.makedirs(root / cls)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "n01" / "notes.txt").write_text("not an image")
    return root


def test_folder_classes_sorted(folder):
    src = data.open_images(str(folder))
    assert src.classes == ["n01", "n02"]
    assert len(src) == 6 and src.labels().tolist() == [0, 0, 0, 1, 1, 1]
    assert src.open(0).size == (8, 8)


def test_tar_equals_folder(folder, tmp_path):
    tpath = tmp_path / "val.tar"
    with tarfile.open(tpath, "w") as t:
        t.add(folder, arcname="imagenet/val")
    a, b = data.open_images(str(folder)), data.open_images(str(tpath))
    assert a.classes == b.classes and a.labels().tolist() == b.labels().tolist()
    for i in range(len(a)):
        assert np.array_equal(np.asarray(a.open(i)), np.asarray(b.open(i)))


def test_npz_pack_shipped_with_fixtures():
    src = data.open_images(models.fixture_file(models.FIXTURE_EVAL_DATA))
    assert len(src) == 1000 and len(src.classes) == 10
    assert np.bincount(src.labels()).tolist() == [100] * 10
    assert src.open(0).size == (32, 32)


def test_missing_path(tmp_path):
    with pytest.raises(ReqError, match="does not exist"):
        data.open_images(str(tmp_path / "nothing"))


def test_empty_folder(tmp_path):
    with pytest.raises(ReqError, match="no images found"):
        data.open_images(str(tmp_path))


def test_corrupt_image(folder):
    (folder / "n01" / "0.png").write_bytes(b"garbage")
    src = data.open_images(str(folder))
    with pytest.raises(ReqError, match="cannot read image"):
        src.open(0)


def test_sample_indices_stable_and_limited():
    a, b = data.sample_indices(100, 10), data.sample_indices(100, 10)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 10
    assert sorted(data.sample_indices(5, None).tolist()) == [0, 1, 2, 3, 4]
