"""One entry point for every dataset: MedMNIST 2D flags, ``cifar10``, the ImageNet subsets and ``custom`` (a site's
own images: a folder, a MONAI datalist, a CSV or an npz)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from monai_pld import distributed

from .base import ImageSet
from .cifar import default_cifar_root, load_cifar10
from .custom import check_data_options, custom_attribution, load_custom, source_format
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
    return [*_medmnist_2d_flags(), "cifar10", *IMAGENET_SUBSETS, "custom"]


def default_image_size(flag: str) -> int:
    """28 for MedMNIST and custom data, 32 for CIFAR-10, 128 for the ImageNet subsets."""
    return 32 if flag == "cifar10" else 128 if flag in IMAGENET_SUBSETS else 28


def default_data_root(flag: str) -> str | None:
    """Where the data of ``flag`` are looked for by default (``custom`` has no default: set ``dataset_dir``)."""
    if flag == "custom":
        return None
    if flag == "cifar10":
        return default_cifar_root()
    if flag in IMAGENET_SUBSETS:
        return default_imagenet_root()
    return default_medmnist_root()


def dataset_attribution(flag: str, data_options: dict[str, Any] | None = None) -> dict[str, str]:
    """Licence and attribution of the source data of ``flag``, recorded in every shared package.

    A distilled set is derived from its source data, so whoever receives it must know the terms of that data.
    For ``custom`` data they are the site's own ``data_options`` ``description`` and ``licence``.

    Returns:
        ``{"dataset", "licence", "attribution", "url"}``.
    """
    if flag == "custom":
        return custom_attribution(data_options)
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


def check_dataset(
    flag: str,
    image_size: int | None = None,
    root: str | os.PathLike | None = None,
    data_options: dict[str, Any] | None = None,
) -> None:
    """Check a dataset name and image size without reading images; for ``custom``, also that ``root`` exists and
    the ``data_options`` are valid.

    Raises:
        ValueError: naming ``dataset_flag``, ``image_size``, ``dataset_dir`` or the data option and what is accepted.
    """
    if flag == "custom":
        opts = check_data_options(data_options)
        if image_size is not None and (
            isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8
        ):
            raise ValueError(f"'image_size' must be an integer >= 8 for custom data, got {image_size!r}")
        if root is None or not os.path.exists(os.path.expanduser(str(root))):
            problem = "is not set" if root is None else f"{str(root)!r} does not exist"
            raise ValueError(
                f"'dataset_dir' {problem}; with dataset_flag custom it must be an image folder, a .json datalist, a "
                ".csv or an .npz, e.g. --dataset_dir /data/site_images"
            )
        source_format(Path(os.path.expanduser(str(root))), opts["format"])
        return
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
            raise ValueError(
                f"{e}; or cifar10, or an ImageNet subset: {', '.join(IMAGENET_SUBSETS)}, or custom (a site's own "
                "images in dataset_dir)"
            ) from e
        if image_size not in (None, *SIZES):
            raise ValueError(f"'image_size' must be one of {list(SIZES)} for MedMNIST, got {image_size!r}")


def load_dataset(
    flag: str,
    split: str = "train",
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
    download: bool = True,
    data_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> ImageSet:
    """Read one split of the dataset called ``flag`` (see :func:`dataset_names`).

    Args:
        flag: a MedMNIST 2D flag, ``cifar10``, an ImageNet subset name or ``custom``.
        split: ``train``, ``val`` or ``test``.
        root: the data folder (default :func:`default_data_root`); for ``custom`` an image folder, a MONAI
            datalist (.json), a CSV or an npz.
        image_size: default :func:`default_image_size`.
        download: fetch missing data where that is possible (MedMNIST, CIFAR-10).
        data_options: options of ``custom`` data (see :func:`monai_pld.data.custom.load_custom`); ImageNet subsets
            use its ``cache_dir`` and ``num_workers``; other datasets ignore it.
        kwargs: loader-specific options (e.g. ``cache_dir`` for ImageNet subsets), merged over ``data_options``.

    Raises:
        ValueError: an unknown name or a size the dataset does not have.
    """
    if download and distributed.world_size() > 1:
        # under torchrun rank 0 fetches first, so that no two processes write the same download
        if not distributed.is_main():
            distributed.barrier()
        try:
            return _load(flag, split, root, image_size, download, data_options, **kwargs)
        finally:
            if distributed.is_main():
                distributed.barrier()
    return _load(flag, split, root, image_size, download, data_options, **kwargs)


def _load(
    flag: str,
    split: str,
    root: str | os.PathLike | None,
    image_size: int | None,
    download: bool,
    data_options: dict[str, Any] | None,
    **kwargs: Any,
) -> ImageSet:
    if flag == "custom":
        return load_custom(split, root, image_size, **{**(data_options or {}), **kwargs})
    check_dataset(flag, image_size)
    size = default_image_size(flag) if image_size is None else image_size
    if flag == "cifar10":
        return load_cifar10(split, root, download=download)
    if flag in IMAGENET_SUBSETS:
        shared = {k: v for k, v in (data_options or {}).items() if k in ("cache_dir", "num_workers")}
        return load_imagenet_subset(flag, split, root, image_size=size, download=download, **{**shared, **kwargs})
    return load_medmnist(flag, split, root, size=size, download=download)
