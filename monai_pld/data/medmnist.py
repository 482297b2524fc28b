"""MedMNIST 2D sets: read the official npz files with numpy, download them through ``medmnist`` when allowed.

The ``medmnist`` dataset classes assert the official sample counts, so they cannot read a subset or a test file;
the arrays are therefore read here with ``numpy.load(allow_pickle=False)`` and validated, and ``medmnist`` is used
for what it is needed for: its ``INFO`` table (class names, channels, URLs) and its downloader.
"""

from __future__ import annotations

import os
import socket
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from monai_pld.data.base import ImageSet
from monai_pld.data.splits import check_classes

__all__ = ["DatasetNotFoundError", "medmnist_filename", "default_medmnist_root", "medmnist_info", "load_medmnist"]

SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
SUPPORTED_TASKS = ("multi-class", "binary-class", "ordinal-regression")
DOWNLOAD_TIMEOUT_S = 20


class DatasetNotFoundError(FileNotFoundError):
    """The dataset file is not on disk and could not be downloaded."""


def medmnist_filename(flag: str, size: int = 28) -> str:
    """``pathmnist.npz`` at 28 px, ``pathmnist_64.npz`` at 64 px (medmnist's own naming)."""
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def default_medmnist_root() -> str:
    """medmnist's default data folder (``~/.medmnist``), without importing medmnist (which creates it)."""
    return os.path.join(os.path.expanduser("~"), ".medmnist")


def medmnist_info(flag: str) -> dict:
    """``medmnist.INFO[flag]`` for a supported 2D flag.

    Raises:
        ValueError: unknown flag, a 3D flag, or a multi-label task (no single class per image to distil).
    """
    from medmnist import INFO

    flags_2d = sorted(f for f, info in INFO.items() if not f.endswith("3d") and info["task"] in SUPPORTED_TASKS)
    if flag not in INFO or flag.endswith("3d"):
        raise ValueError(f"'dataset_flag' {flag!r} is not a MedMNIST 2D dataset; use one of {flags_2d}")
    info = INFO[flag]
    if info["task"] not in SUPPORTED_TASKS:
        raise ValueError(
            f"'dataset_flag' {flag!r} is a {info['task']} task: distillation needs one class per image; "
            f"use one of {flags_2d}"
        )
    return info


def _download(flag: str, info: dict, root: Path, size: int) -> None:
    import medmnist

    root.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # without network, fail in seconds rather than hang
    try:
        getattr(medmnist, info["python_class"])(split="train", root=str(root), download=True, size=size)
    finally:
        socket.setdefaulttimeout(previous)


def load_medmnist(
    flag: str = "pathmnist",
    split: str = "train",
    root: str | os.PathLike | None = None,
    size: int = 28,
    download: bool = True,
) -> ImageSet:
    """Read one split of a MedMNIST 2D set as an :class:`ImageSet` (uint8, channel-first).

    Args:
        flag: MedMNIST flag, e.g. ``pathmnist`` or ``retinamnist``.
        split: ``train``, ``val`` or ``test``.
        root: folder holding the npz file; default medmnist's ``~/.medmnist``.
        size: 28, 64, 128 or 224.
        download: download the file through ``medmnist`` when it is missing.

    Raises:
        DatasetNotFoundError: the file is missing and could not be downloaded (names the folder, file and fixes).
        ValueError: bad arguments or a file that is not a valid MedMNIST npz (names the file and the problem).
    """
    info = medmnist_info(flag)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if size not in SIZES:
        raise ValueError(f"'image_size' must be one of {list(SIZES)} for MedMNIST, got {size!r}")
    folder = Path(root if root is not None else default_medmnist_root()).expanduser()
    filename = medmnist_filename(flag, size)
    path = folder / filename
    if not path.is_file():
        reason = "downloading is switched off (download: false)"
        if download:
            try:
                _download(flag, info, folder, size)
            except Exception as e:  # medmnist wraps every failure in a bare RuntimeError
                reason = f"the download failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:160]})"
        if not path.is_file():
            url = info.get("url" if size == 28 else f"url_{size}", "https://medmnist.com")
            raise DatasetNotFoundError(
                f"{filename} is not in {folder} and {reason}. Fix it in one of these ways: "
                f"(1) put {filename} into {folder} (from {url}); "
                f"(2) point dataset_dir at the folder that holds it, e.g. --dataset_dir /data/medmnist; "
                f"(3) allow the download (--download true) on a machine with network access."
            )
    return _read_split(path, flag, split, size, info)


# what np.load and reading a member raise for a damaged or foreign file (zlib.error derives from Exception alone)
_UNREADABLE = (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError)


def open_npz(path: Path, advice: str) -> np.lib.npyio.NpzFile:
    """``np.load`` of an npz (no pickle), with a ``ValueError`` naming the file and ``advice`` when it is not one."""
    try:
        npz = np.load(path, allow_pickle=False)
    except _UNREADABLE as e:
        raise ValueError(f"{path} is not a readable npz file ({type(e).__name__}: {e}); {advice}") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):  # an .npy renamed: np.load hands back one bare array
        raise ValueError(f"{path} holds a single .npy array, not an npz archive of named arrays; {advice}")
    return npz


def npz_array(npz: np.lib.npyio.NpzFile, key: str, path: Path, advice: str) -> np.ndarray:
    """Member ``key`` of an open npz; a damaged member (bad compressed data, truncated) is a ``ValueError``."""
    try:
        return npz[key]
    except _UNREADABLE as e:
        raise ValueError(
            f"{path}: {key} cannot be read ({type(e).__name__}: {e}); the file is damaged: {advice}"
        ) from e


def _read_split(path: Path, flag: str, split: str, size: int, info: dict) -> ImageSet:
    advice = "download it again (delete it and run with --download true)"
    with open_npz(path, advice) as npz:
        wanted = [f"{split}_images", f"{split}_labels"]
        missing = [k for k in wanted if k not in npz.files]
        if missing:
            raise ValueError(f"{path} lacks {missing} (it has {sorted(npz.files)}); is it a MedMNIST file?")
        images, labels = (npz_array(npz, key, path, advice) for key in wanted)
    channels = int(info["n_channels"])
    expected = (size, size) if channels == 1 else (size, size, channels)
    if images.dtype != np.uint8 or images.shape[1:] != expected:
        raise ValueError(
            f"{path}: {split}_images must be uint8 of shape (N, {', '.join(map(str, expected))}) for {flag} at "
            f"{size} px, got {images.dtype} {images.shape}"
        )
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: {split}_labels must be integers of shape ({images.shape[0]}, 1), got {labels.dtype} "
            f"{labels.shape}"
        )
    class_names = [info["label"][k] for k in sorted(info["label"], key=int)]
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(
            f"{path}: {split}_labels must lie in [0, {len(class_names)}) for the {len(class_names)} classes of "
            f"{flag}, found {labels.min()}..{labels.max()}"
        )
    if split == "train":  # the official files hold every class; a missing one means a cut or altered file
        remedy = f"this is not the official {flag} file, so {advice}, or use the custom bundle for a subset of classes"
        check_classes(labels, class_names, str(path), remedy)
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    tensor = tensor.unsqueeze(1) if channels == 1 else tensor.permute(0, 3, 1, 2).contiguous()
    return ImageSet(tensor, torch.from_numpy(labels.astype(np.int64)), class_names, flag)
