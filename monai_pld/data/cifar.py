"""CIFAR-10 from the torchvision on-disk layout (``cifar-10-batches-py``), read without trusting pickle.

The batches are Python pickles. They are read with a restricted unpickler that accepts only the few globals numpy
arrays need, so a tampered file cannot run code. torchvision is used only to download when asked.
"""

from __future__ import annotations

import io
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import torch

from .base import ImageSet
from .medmnist import DatasetNotFoundError

__all__ = ["CIFAR10_CLASSES", "default_cifar_root", "load_cifar10"]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
VAL_PER_CLASS = 500

# (module, name) pairs a CIFAR batch may reference: numpy array reconstruction, nothing else
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")


def _read_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} is not a plain CIFAR-10 batch and was not loaded: {e}") from e
    except (EOFError, OSError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(
            f"{path} cannot be read as a CIFAR-10 batch ({type(e).__name__}: {e}); download it again"
        ) from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch (a {type(obj).__name__}, not a dict)")
    # batches pickled by Python 2 have bytes keys, torchvision's reader sees them as str with latin1
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def default_cifar_root() -> str:
    """``~/.monai_pld/data``: where CIFAR-10 is looked for (and downloaded to) by default."""
    return str(Path("~/.monai_pld/data").expanduser())


def _download(root: Path) -> None:
    from torchvision.datasets import CIFAR10

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # fail fast without network instead of hanging
    try:
        CIFAR10(str(root), train=True, download=True)
    finally:
        socket.setdefaulttimeout(previous)


def _images_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_batch(path)
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path} lacks 'data' or 'labels' (has {sorted(batch)}); is it a CIFAR-10 batch?")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: 'labels' must be {data.shape[0]} integers, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must lie in [0, 10), found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(split: str = "train", root: str | os.PathLike | None = None, download: bool = True) -> ImageSet:
    """One split of CIFAR-10 as an :class:`ImageSet` (uint8, 3 x 32 x 32).

    Args:
        split: ``train`` (all 50,000 training images, the set every paper distils), ``test`` (10,000), or ``val``:
            a fixed 5,000-image part of the training set (500 per class). CIFAR-10 has no validation split, so
            ``val`` overlaps ``train``: use it to watch curves, never to report results.
        root: folder holding ``cifar-10-batches-py/``; default :func:`default_cifar_root`.
        download: download through torchvision when the folder is missing.

    Raises:
        DatasetNotFoundError: the files are missing and could not be downloaded (names the folder and the fixes).
        ValueError: an unknown split, or a file that is not a valid CIFAR-10 batch (names the file).
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    base = Path(root if root is not None else default_cifar_root()).expanduser()
    folder = base / FOLDER
    wanted = TRAIN_FILES if split in ("train", "val") else ["test_batch"]
    if not all((folder / name).is_file() for name in wanted):
        reason = "downloading is switched off (download: false)"
        if download:
            try:
                _download(base)
            except Exception as e:  # torchvision raises URLError, socket errors, RuntimeError...
                reason = f"the download failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]})"
        missing = [name for name in wanted if not (folder / name).is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"CIFAR-10 files {missing} are not in {folder} and {reason}. Fix it in one of these ways: "
                f"(1) extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into {base}, "
                f"so that {folder} holds data_batch_1..5 and test_batch; "
                "(2) point dataset_dir at the folder that holds cifar-10-batches-py, e.g. --dataset_dir /data; "
                "(3) allow the download (--download true) on a machine with network access."
            )
    parts = [_images_labels(folder / name) for name in wanted]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if split == "val":
        gen = torch.Generator().manual_seed(0)
        keep = []
        for c in range(10):
            index = np.flatnonzero(labels == c)
            keep.append(index[torch.randperm(len(index), generator=gen)[:VAL_PER_CLASS].numpy()])
        order = np.sort(np.concatenate(keep))
        images, labels = images[order], labels[order]
    names = CIFAR10_CLASSES
    meta = folder / "batches.meta"
    if meta.is_file():
        record = _read_batch(meta)
        found = record.get("label_names")
        if isinstance(found, list) and len(found) == 10:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in found]
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), names, "cifar10")
