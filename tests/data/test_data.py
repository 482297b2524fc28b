import time

import numpy as np
import pytest
import torch
from helpers import shared_data_dir, write_medmnist_npz
from medmnist import INFO

from monai_pld.data import ClassBalancedBatches, DatasetNotFoundError, ImageSet, load_medmnist, medmnist_filename


def test_reads_synthetic_npz(fake_medmnist):
    data = load_medmnist("pathmnist", "train", fake_medmnist, download=False)
    raw = np.load(fake_medmnist / "pathmnist.npz")
    assert data.images.shape == (90, 3, 28, 28) and data.images.dtype == torch.uint8
    assert np.array_equal(data.images.permute(0, 2, 3, 1).numpy(), raw["train_images"])
    assert np.array_equal(data.labels.numpy(), raw["train_labels"][:, 0])
    assert data.class_names == [INFO["pathmnist"]["label"][str(i)] for i in range(9)]
    assert data.class_names[0] == "adipose" and data.num_classes == 9 and data.image_size == 28
    val = load_medmnist("pathmnist", "val", fake_medmnist, download=False)
    assert len(val) == 27


def test_grayscale_keeps_one_channel_and_size_64(tmp_path):
    write_medmnist_npz(tmp_path / "pneumoniamnist_64.npz", size=64, channels=1, num_classes=2)
    data = load_medmnist("pneumoniamnist", "test", tmp_path, size=64, download=False)
    assert data.images.shape == (27, 1, 64, 64) and data.num_classes == 2
    assert medmnist_filename("pneumoniamnist", 64) == "pneumoniamnist_64.npz"


def test_real_retinamnist_loads_unchanged():
    folder = shared_data_dir()
    if folder is None or not (folder / "retinamnist.npz").is_file():
        pytest.skip("retinamnist.npz not available (set MONAI_PLD_DATA)")
    data = load_medmnist("retinamnist", "train", folder, download=False)
    assert data.images.shape == (1080, 3, 28, 28) and data.num_classes == 5
    with np.load(folder / "retinamnist.npz") as raw:
        assert np.array_equal(data.images[5].permute(1, 2, 0).numpy(), raw["train_images"][5])
        assert np.array_equal(data.labels.numpy(), raw["train_labels"][:, 0].astype(np.int64))


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"train_labels": None}, r"lacks \['train_labels'\]"),
        ({"train_images": np.zeros((90, 28, 28), np.uint8)}, r"must be uint8 of shape \(N, 28, 28, 3\)"),
        ({"train_images": np.zeros((90, 28, 28, 3), np.float32)}, "must be uint8"),
        ({"train_labels": np.full((90, 1), 9, np.uint8)}, r"must lie in \[0, 9\)"),
        ({"train_labels": np.zeros((80, 1), np.uint8)}, r"labels must be integers of shape \(90, 1\)"),
        (
            {"train_labels": (np.arange(90) % 8)[:, None]},
            r"class 8 \(.*\) has no training images.*not the official pathmnist file",
        ),
    ],
)
def test_rejects_malformed_files(tmp_path, overrides, match):
    write_medmnist_npz(tmp_path / "pathmnist.npz", **overrides)
    with pytest.raises(ValueError, match=match):
        load_medmnist("pathmnist", "train", tmp_path, download=False)


def test_rejects_non_npz(tmp_path):
    (tmp_path / "pathmnist.npz").write_bytes(b"this is not a zip archive")
    with pytest.raises(ValueError, match="pathmnist.npz is not a readable npz"):
        load_medmnist("pathmnist", "train", tmp_path, download=False)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"flag": "nosuchmnist"}, "not a MedMNIST 2D dataset"),
        ({"flag": "organmnist3d"}, "not a MedMNIST 2D dataset"),
        ({"flag": "chestmnist"}, "multi-label"),
        ({"split": "training"}, "split must be one of"),
        ({"size": 32}, "'image_size' must be one of"),
    ],
)
def test_rejects_bad_arguments(fake_medmnist, kwargs, match):
    args = {"flag": "pathmnist", "split": "train", "root": fake_medmnist, "download": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        load_medmnist(**args)


def test_missing_file_without_download(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_medmnist("pathmnist", "train", tmp_path / "nothing", download=False)
    message = str(info.value)
    assert "pathmnist.npz" in message and str(tmp_path / "nothing") in message
    assert "download: false" in message and "dataset_dir" in message and "--download true" in message


def test_missing_file_offline_download_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(DatasetNotFoundError, match="download failed"):
        load_medmnist("pathmnist", "train", tmp_path, download=True)
    assert time.perf_counter() - start < 60  # a generous bound: a hang would be minutes


def _labelled_set(counts, size=4):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    images = (20 * labels).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, size, size).contiguous()
    return ImageSet(images, labels, [f"c{c}" for c in range(len(counts))], "toy")


def test_balanced_batches_pair_images_with_labels():
    data = _labelled_set([30, 12, 50])
    batches = ClassBalancedBatches(data, batch_per_class=8, seed=3)
    batch = next(iter(batches))
    assert batch["image"].shape == (24, 1, 4, 4) and batch["image"].dtype == torch.float32
    assert torch.equal(batch["label"], torch.tensor([0] * 8 + [1] * 8 + [2] * 8))
    assert torch.allclose(batch["image"][:, 0, 0, 0] * 255, 20.0 * batch["label"].float())


def test_balanced_batches_are_deterministic_and_resumable():
    data = _labelled_set([40, 40])
    data.images[:, 0, 0, 0] = torch.arange(80, dtype=torch.uint8)  # make every image distinguishable
    stream = iter(ClassBalancedBatches(data, 5, seed=1))
    first = [next(stream)["image"] for _ in range(4)]
    again = iter(ClassBalancedBatches(data, 5, seed=1))
    assert all(torch.equal(a, next(again)["image"]) for a in first)
    assert not torch.equal(first[0], first[1])
    other_seed = next(iter(ClassBalancedBatches(data, 5, seed=2)))["image"]
    assert not torch.equal(first[0], other_seed)
    batches = ClassBalancedBatches(data, 5, seed=1)
    it = iter(batches)
    next(it), next(it)
    state = batches.state_dict()
    assert state == {"position": 2}
    resumed = ClassBalancedBatches(data, 5, seed=1)
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed))["image"], first[2])


def test_without_replacement_for_large_classes_and_with_for_tiny():
    data = _labelled_set([20, 2])
    data.images[:, 0, 0, 0] = torch.arange(22, dtype=torch.uint8)
    batch = ClassBalancedBatches(data, 10).batch(0)
    ids = batch["image"][:, 0, 0, 0].mul(255).round().long()
    assert len(set(ids[:10].tolist())) == 10  # distinct picks from class 0
    assert set(ids[10:].tolist()) <= {20, 21}  # tiny class repeats its two images


def test_empty_class_and_bad_batch_rejected():
    data = _labelled_set([5, 0, 5])
    with pytest.raises(ValueError, match=r"classes 1 \(c1\) have no training images"):
        ClassBalancedBatches(data, 2)
    with pytest.raises(ValueError, match="batch_real_per_class"):
        ClassBalancedBatches(_labelled_set([3, 3]), 0)


def test_global_rng_untouched():
    state = torch.get_rng_state()
    next(iter(ClassBalancedBatches(_labelled_set([5, 5]), 3)))
    assert torch.equal(state, torch.get_rng_state())


def test_image_set_helpers():
    data = _labelled_set([3, 2])
    idx = data.class_indices()
    assert [i.tolist() for i in idx] == [[0, 1, 2], [3, 4]]
    x = data.float_images().numpy().transpose(1, 0, 2, 3).reshape(1, -1)
    mean, std = data.channel_stats()
    assert np.allclose(mean, x.mean(1)) and np.allclose(std, x.std(1))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        ImageSet(data.images, data.labels + 1, ["a", "b"])
    with pytest.raises(ValueError, match="uint8 tensor"):
        ImageSet(data.images.float(), data.labels, ["a", "b"])


def test_the_ranks_shares_of_a_batch_make_up_the_whole_batch():
    data = _labelled_set([40, 25, 33])
    data.images[:, 0, 0, 0] = torch.arange(98, dtype=torch.uint8)  # every image distinguishable
    whole = ClassBalancedBatches(data, 5, seed=4).batch(7)
    shares = []
    for rank in range(3):
        batches = ClassBalancedBatches(data, 5, seed=4)
        batches.take_share(rank, 3)
        shares.append(batches.batch(7))
    for rank, share in enumerate(shares):
        assert torch.equal(share["image"], whole["image"][rank::3])
        assert torch.equal(share["label"], whole["label"][rank::3])
    assert sum(len(s["label"]) for s in shares) == 15
