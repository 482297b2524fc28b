"""One entry point for every dataset: MedMNIST 2D flags, ``cifar10`` and the ImageNet subsets."""

from __future__ import annotations

import os
from typing import Any

from .base import ImageSet
from .cifar import default_cifar_root, load_cifar10
from .imagenet import IMAGENET_SUBSETS, default_imagenet_root, load_imagenet_subset
from .medmnist import SIZES, SUPPORTED_TASKS, default_medmnist_root, load_medmnist, medmnist_info

__all__ = [
    "check_dataset",
    "dataset_attribution",
    "dataset_names",
    "default_data_root",
    "default_image_size",
    "load_dataset",
]

_MEDMNIST_CITATION = (
    "Jiancheng Yang, Rui Shi, Donglai Wei, Zequan Liu, Lin Zhao, Bilian Ke, Hanspeter Pfister, Bingbing Ni. "
    "MedMNIST v2 - A large-scale lightweight benchmark for 2D and 3D biomedical image classification. "
    "Scientific Data, 2023."
)
# primary sources that MedMNIST asks users to cite besides itself, for the sets handed over most often
_MEDMNIST_SOURCES = {
    "pathmnist": "Jakob Nikolas Kather et al. Predicting survival from colorectal cancer histology slides using deep "
    "learning: a retrospective multicenter study. PLOS Medicine, 2019 (NCT-CRC-HE-100K, CRC-VAL-HE-7K).",
    "retinamnist": "Ruhan Liu et al. DeepDRiD: Diabetic Retinopathy - Grading and Image Quality Estimation "
    "Challenge. Patterns, 2022.",
}


def _medmnist_2d_flags() -> list[str]:
    import medmnist

    return sorted(k for k, v in medmnist.INFO.items() if not k.endswith("3d") and v["task"] in SUPPORTED_TASKS)


def dataset_names() -> list[str]:
    """Every accepted ``dataset_flag``."""
    return [*_medmnist_2d_flags(), "cifar10", *IMAGENET_SUBSETS]


def default_image_size(flag: str) -> int:
    """28 for MedMNIST, 32 for CIFAR-10, 128 for the ImageNet subsets."""
    return 32 if flag == "cifar10" else 128 if flag in IMAGENET_SUBSETS else 28


def default_data_root(flag: str) -> str:
    """Where the data of ``flag`` are looked for by default."""
    if flag == "cifar10":
        return default_cifar_root()
    if flag in IMAGENET_SUBSETS:
        return default_imagenet_root()
    return default_medmnist_root()


def dataset_attribution(flag: str) -> dict[str, str]:
    """Licence and attribution of the source data of ``flag``, recorded in every shared package.

    A distilled set is derived from its source data, so whoever receives it must know the terms of that data.

    Returns:
        ``{"dataset", "licence", "attribution", "url"}``.
    """
    if flag == "cifar10":
        return {
            "dataset": "CIFAR-10",
            "licence": "no licence stated by the authors; see the dataset page",
            "attribution": "Alex Krizhevsky. Learning Multiple Layers of Features from Tiny Images. Technical report, "
            "University of Toronto, 2009.",
            "url": "https://www.cs.toronto.edu/~kriz/cifar.html",
        }
    if flag in IMAGENET_SUBSETS:
        return {
            "dataset": f"ImageNet ({flag} subset)",
            "licence": "ImageNet terms of access: non-commercial research and educational use",
            "attribution": "Olga Russakovsky et al. ImageNet Large Scale Visual Recognition Challenge. IJCV, 2015.",
            "url": "https://image-net.org/download",
        }
    info = medmnist_info(flag)
    attribution = " ".join(filter(None, [_MEDMNIST_CITATION, _MEDMNIST_SOURCES.get(flag)]))
    return {
        "dataset": f"MedMNIST {info['python_class']}",
        "licence": str(info.get("license", "see https://medmnist.com")),
        "attribution": attribution,
        "url": "https://medmnist.com",
    }


def check_dataset(flag: str, image_size: int | None = None) -> None:
    """Check a dataset name and image size without reading anything.

    Raises:
        ValueError: naming ``dataset_flag`` or ``image_size`` and what is accepted.
    """
    if flag == "cifar10":
        if image_size not in (None, 32):
            raise ValueError(f"'image_size' must be 32 for cifar10, got {image_size!r}")
    elif flag in IMAGENET_SUBSETS:
        if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
            raise ValueError(f"'image_size' must be an integer >= 8 for ImageNet subsets, got {image_size!r}")
    else:
        try:
            medmnist_info(flag)
        except ValueError as e:
            raise ValueError(f"{e}; or cifar10, or an ImageNet subset: {', '.join(IMAGENET_SUBSETS)}") from e
        if image_size not in (None, *SIZES):
            raise ValueError(f"'image_size' must be one of {list(SIZES)} for MedMNIST, got {image_size!r}")


def load_dataset(
    flag: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
    download: bool = True,
    **kwargs: Any,
) -> ImageSet:
    """Read one split of the dataset called ``flag`` (see :func:`dataset_names`).

    Args:
        flag: a MedMNIST 2D flag, ``cifar10`` or an ImageNet subset name.
        split: ``train``, ``val`` or ``test``.
        root: the data folder (default :func:`default_data_root`).
        image_size: default :func:`default_image_size`.
        download: fetch missing data where that is possible (MedMNIST, CIFAR-10).
        kwargs: loader-specific options (e.g. ``cache_dir`` for ImageNet subsets).

    Raises:
        ValueError: an unknown name or a size the dataset does not have.
    """
    check_dataset(flag, image_size)
    size = default_image_size(flag) if image_size is None else image_size
    if flag == "cifar10":
        return load_cifar10(split, root, download=download)
    if flag in IMAGENET_SUBSETS:
        return load_imagenet_subset(flag, split, root, image_size=size, download=download, **kwargs)
    return load_medmnist(flag, split, root, size=size, download=download)
