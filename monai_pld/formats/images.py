"""``images.npz``: the distilled images of a set, with one writer and one validating reader.

Arrays: ``images`` uint8 ``(N, H, W, C)`` with C 1 or 3, ``labels`` int64 ``(N,)`` and ``class_names`` (strings).
No object arrays, so the file loads with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from monai_pld.utils import atomic_savez

__all__ = ["IMAGES_FILE", "ImagesFileError", "as_float_images", "read_images", "to_uint8_images", "write_images"]

IMAGES_FILE = "images.npz"


class ImagesFileError(ValueError):
    """An ``images.npz`` is unreadable or its arrays do not fit together; the message names the file."""


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """Float images ``(N, C, H, W)`` in ``[0, 1]`` as the file stores them: uint8 ``(N, H, W, C)``, rounded."""
    return (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def as_float_images(images: np.ndarray) -> torch.Tensor:
    """The stored uint8 ``(N, H, W, C)`` images as float ``(N, C, H, W)`` in ``[0, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)


def write_images(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> Path:
    """Write ``images.npz`` atomically (uint8 NHWC images, int64 labels, class names as strings)."""
    return atomic_savez(
        path,
        images=images,
        labels=np.asarray(labels).astype(np.int64),
        class_names=np.asarray(list(class_names), dtype=str),
    )


def read_images(
    source: bytes | str | os.PathLike, what: str | None = None, require_class_names: bool = True
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read and validate an ``images.npz`` (a path, or the file's bytes) without pickle.

    Args:
        source: the file, or its contents (a member of a package).
        what: how to name the file in messages (default: the path).
        require_class_names: refuse a file without ``class_names`` (every file this package writes has them);
            when false and they are missing, the labels are not checked against the class count.

    Returns:
        the uint8 ``(N, H, W, C)`` images, int64 labels ``(N,)`` and the class names (empty when absent).

    Raises:
        ImagesFileError: naming the file and what is wrong.
    """
    what = what if what is not None else str(source)
    needed = ("images", "labels", "class_names") if require_class_names else ("images", "labels")
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with np.load(stream, allow_pickle=False) as npz:
            missing = [k for k in needed if k not in npz.files]
            if missing:
                raise ImagesFileError(f"{what} lacks the arrays {missing} (it has {sorted(npz.files)})")
            images, labels = npz["images"], npz["labels"]
            names = [str(n) for n in npz["class_names"]] if "class_names" in npz.files else []
    except ImagesFileError:
        raise
    except Exception as e:  # a pickled object array, a truncated zip, not an npz at all
        raise ImagesFileError(f"{what} is not a plain images.npz ({type(e).__name__}: {e})") from e
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ImagesFileError(
            f"{what}: 'images' must be uint8 (N, H, W, C) with C 1 or 3, got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise ImagesFileError(
            f"{what}: 'labels' must be integers of shape ({len(images)},), got {labels.dtype} {labels.shape}"
        )
    if len(labels) and (names or require_class_names) and (labels.min() < 0 or labels.max() >= len(names)):
        raise ImagesFileError(f"{what}: labels must lie in [0, {len(names)}) for {len(names)} class names")
    return images, labels.astype(np.int64), names
