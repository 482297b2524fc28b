"""A site's own images through ``load_dataset("custom", ...)``: the four input forms, preprocessing, caching,
splits and every bad input with its message."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from monai_pld.data import load_dataset
from monai_pld.utils import ConfigError


def _npz(path, n=30, size=12, rgb=False, column_labels=False, splits=("train", "val", "test"), names=None, classes=3):
    rng = np.random.default_rng(0)
    arrays = {}
    for s in splits:
        shape = (n, size, size, 3) if rgb else (n, size, size)
        labels = np.arange(n) % classes
        arrays[f"{s}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{s}_labels"] = labels[:, None] if column_labels else labels
    if names is not None:
        arrays["class_names"] = np.array(names)
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("column_labels", [False, True])
@pytest.mark.parametrize("rgb", [False, True])
def test_npz_reads_every_split_as_stored(tmp_path, rgb, column_labels):
    arrays = _npz(tmp_path / "site.npz", rgb=rgb, column_labels=column_labels, names=["a", "b", "c"])
    for split in ("train", "val", "test"):
        data = load_dataset("custom", split, tmp_path / "site.npz", image_size=12)
        expected = arrays[f"{split}_images"]
        expected = expected.transpose(0, 3, 1, 2) if rgb else expected[:, None]
        assert torch.equal(data.images, torch.from_numpy(expected))
        assert data.labels.tolist() == (np.arange(30) % 3).tolist()
        assert data.class_names == ["a", "b", "c"] and data.name == "custom"


def test_npz_without_class_names_resized_and_converted(tmp_path):
    arrays = _npz(tmp_path / "x.npz", size=16, rgb=True)
    data = load_dataset("custom", "test", tmp_path / "x.npz", image_size=8, data_options={"channels": 1})
    assert data.images.shape == (30, 1, 8, 8) and data.class_names == ["0", "1", "2"]
    # area resize of the BT.601 grey image: the mean of a 2x2 block
    grey = arrays["test_images"].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    block = grey[0, :2, :2].mean()
    assert abs(int(data.images[0, 0, 0, 0]) - block) <= 1


def test_npz_train_only_gets_a_stratified_split_file_reused(tmp_path):
    _npz(tmp_path / "t.npz", n=60, splits=("train",))
    opts = {"val_fraction": 0.2, "test_fraction": 0.1, "cache_dir": str(tmp_path / "cache")}
    sets = {s: load_dataset("custom", s, tmp_path / "t.npz", image_size=12, data_options=opts) for s in ("train", "val", "test")}
    assert [len(sets[s]) for s in ("train", "val", "test")] == [42, 12, 6]
    assert torch.bincount(sets["val"].labels).tolist() == [4, 4, 4]
    files = list((tmp_path / "cache").glob("*split*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    assert len(record["heldout"]["val"]) == 12
    # the held-out images are disjoint from train: compare pixel rows
    train_rows = {bytes(x) for x in sets["train"].images.numpy()}
    assert not any(bytes(x) in train_rows for x in sets["test"].images.numpy())
    # a new seed in a hand-edited split file is not used; the same file is read again
    again = load_dataset("custom", "val", tmp_path / "t.npz", image_size=12, data_options=opts)
    assert torch.equal(again.images, sets["val"].images)


def test_npz_bad_inputs(tmp_path):
    np.savez(tmp_path / "nolabels.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="lacks train_images/train_labels"):
        load_dataset("custom", "train", tmp_path / "nolabels.npz")
    np.savez(
        tmp_path / "range.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.array([0, 5]),
        class_names=np.array(["a", "b"]),
    )
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        load_dataset("custom", "train", tmp_path / "range.npz")
    np.savez(
        tmp_path / "empty.npz", train_images=np.zeros((4, 4, 4), np.uint8), train_labels=np.array([0, 0, 2, 2]),
        val_images=np.zeros((1, 4, 4), np.uint8), val_labels=np.array([0]),
        test_images=np.zeros((1, 4, 4), np.uint8), test_labels=np.array([0]),
    )
    with pytest.raises(ValueError, match=r"class 1 \(1\) has no training images"):
        load_dataset("custom", "train", tmp_path / "empty.npz", image_size=4)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="broken.npz is not a readable npz"):
        load_dataset("custom", "train", tmp_path / "broken.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("custom", "train", tmp_path / "missing.npz")
    with pytest.raises(ConfigError, match="'channels' must be 1"):
        load_dataset("custom", "train", tmp_path / "range.npz", data_options={"channels": 2})
    with pytest.raises(ConfigError, match="unknown key"):
        load_dataset("custom", "train", tmp_path / "range.npz", data_options={"chanels": 1})
