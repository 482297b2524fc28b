"""Shared test helpers: synthetic data in the MedMNIST npz layout and the location of the real shared data."""

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def write_medmnist_npz(path, n_per_split=None, size=28, channels=3, num_classes=9, seed=0, **overrides):
    """Write a small file with the keys, dtypes and shapes of an official MedMNIST npz.

    Every class appears in every split (labels cycle through the classes). Each image's pixels encode its label
    (mean brightness ``20 * label + noise``), so tests can check that images and labels stay paired.
    ``overrides`` replace arrays by key (e.g. ``train_labels=...``), or drop them when the value is None.
    """
    n_per_split = n_per_split or {"train": 90, "val": 27, "test": 27}
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in n_per_split.items():
        labels = (np.arange(n) % num_classes).astype(np.uint8)
        shape = (n, size, size) if channels == 1 else (n, size, size, channels)
        noise = rng.integers(0, 10, size=shape)
        base = (20 * labels).reshape((n,) + (1,) * (len(shape) - 1))
        arrays[f"{split}_images"] = (base + noise).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None]
    for key, value in overrides.items():
        if value is None:
            arrays.pop(key, None)
        else:
            arrays[key] = value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture
def fake_medmnist(tmp_path):
    """A folder with a small synthetic ``pathmnist.npz`` (9 classes, 28 px RGB)."""
    write_medmnist_npz(tmp_path / "pathmnist.npz")
    return tmp_path


def shared_data_dir():
    """Folder of the real development data: ``$MONAI_PLD_DATA`` or ``../shared/data`` beside the repository."""
    env = os.environ.get("MONAI_PLD_DATA")
    folder = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return folder if folder.is_dir() else None
