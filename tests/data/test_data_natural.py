"""CIFAR-10 (torchvision layout, restricted unpickling) and ImageNet subsets (folder layouts, crop, cache)."""

import os
import pickle

import numpy as np
import pytest
import torch
from helpers import WNIDS, write_cifar, write_subset
from PIL import Image

from monai_pld.data import (
    IMAGENET_SUBSETS,
    DatasetNotFoundError,
    check_dataset,
    load_cifar10,
    load_dataset,
    load_imagenet_subset,
)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_cifar_round_trip(tmp_path):
    batches = write_cifar(tmp_path)
    train = load_cifar10("train", tmp_path, download=False)
    expected = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert train.images.shape == (100, 3, 32, 32) and np.array_equal(train.images.numpy(), expected)
    assert train.labels.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train.class_names[0] == "airplane" and train.name == "cifar10"
    test = load_cifar10("test", tmp_path, download=False)
    assert np.array_equal(test.images.numpy(), batches["test_batch"][0].reshape(-1, 3, 32, 32))
    val = load_cifar10("val", tmp_path, download=False)  # at most 500 per class: all 10 per class here
    assert len(val) == 100
    assert load_dataset("cifar10", "test", tmp_path, download=False).images.shape == (20, 3, 32, 32)


def test_cifar_refuses_code_in_a_pickle(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match="not allowed") as err:
        load_cifar10("test", tmp_path, download=False)
    assert "test_batch" in str(err.value)


def test_cifar_bad_arrays_are_named(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(ValueError, match="3072"):
        load_cifar10("test", tmp_path, download=False)


def test_cifar_missing_offline(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_cifar10("train", tmp_path / "nothing", download=False)
    message = str(err.value)
    assert str(tmp_path / "nothing" / "cifar-10-batches-py") in message and "dataset_dir" in message


def test_imagenet_subset_folder(tmp_path):
    write_subset(tmp_path)
    train = load_imagenet_subset("imagenette", "train", tmp_path, image_size=32, num_workers=0)
    assert train.images.shape == (20, 3, 32, 32) and train.images.dtype == torch.uint8
    # imagenette's list is already in ascending id order, so label k is the k-th folder
    assert train.labels.tolist() == [k for k in range(10) for _ in range(2)]
    assert train.class_names == WNIDS
    # resize the 40-px side to 32 then centre-crop the wider side: left columns stay red, right columns green
    image = train.images[2 * 7].float()
    assert image[0, :, :8].mean() > 240 and image[1, :, :8].mean() < 5
    assert abs(image[1, :, -8:].mean() - 140) < 3 and image[0, :, -8:].mean() < 5
    caches = list((tmp_path / ".monai_pld_cache").glob("imagenette_train_32px_*.npz"))
    assert len(caches) == 1
    again = load_imagenet_subset("imagenette", "train", tmp_path, image_size=32, num_workers=0)
    assert torch.equal(again.images, train.images)
    test = load_imagenet_subset("imagenette", "test", tmp_path, image_size=32, num_workers=0)
    assert len(test) == 20


def test_subset_label_order_follows_the_reference_list(tmp_path):
    # imagewoof's list is not sorted: folder k (sorted) holds the k-th smallest id
    ids = IMAGENET_SUBSETS["imagewoof"]
    wnids = [f"n{1000 + i:08d}" for i in sorted(ids)]
    for wnid in wnids:
        (tmp_path / "train" / wnid).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / wnid / "a.png")
    data = load_imagenet_subset("imagewoof", "train", tmp_path, image_size=8, num_workers=0)
    expected = [wnids[sorted(ids).index(i)] for i in ids]
    assert data.class_names == expected


def test_full_imagenet_layout_maps_ids(tmp_path):
    for i in range(1000):
        (tmp_path / "train" / f"n{i:08d}").mkdir(parents=True)
    for i in IMAGENET_SUBSETS["imagenet_cats"]:
        Image.fromarray(np.full((8, 8, 3), i % 256, np.uint8)).save(tmp_path / "train" / f"n{i:08d}" / "a.png")
    data = load_imagenet_subset("imagenet_cats", "train", tmp_path, image_size=8, num_workers=0)
    assert data.class_names == [f"n{i:08d}" for i in IMAGENET_SUBSETS["imagenet_cats"]]
    assert data.images[:, 0, 0, 0].tolist() == [i % 256 for i in IMAGENET_SUBSETS["imagenet_cats"]]


def test_imagenet_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="image-net.org"):
        load_imagenet_subset("imagenette", "train", tmp_path / "missing")
    for wnid in WNIDS[:7]:
        (tmp_path / "train" / wnid).mkdir(parents=True)
    with pytest.raises(ValueError, match="7 class folders"):
        load_imagenet_subset("imagenette", "train", tmp_path)
    with pytest.raises(ValueError, match="unknown ImageNet subset"):
        load_imagenet_subset("imagenet_z", "train", tmp_path)


def test_dispatch_and_checks():
    check_dataset("pathmnist", 64)
    check_dataset("imagenette", 128)
    with pytest.raises(ValueError, match="'image_size'"):
        check_dataset("cifar10", 64)
    with pytest.raises(ValueError, match="'dataset_flag'"):
        load_dataset("mnist")
