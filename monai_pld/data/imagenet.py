"""Ten-class ImageNet subsets (ImageNet A-E, ImageNette, ImageWoof, Birds, Fruits, Cats) at a fixed resolution.

Read from the user's copy of ImageNet: either a full root (``train/`` and ``val/`` with the 1,000 WordNet-id
folders) or a folder holding only the subset. Images are decoded once with torchvision (shorter side resized to
``image_size``, centre crop) and cached as an npz, since decoding ~13,000 JPEGs takes minutes on a CPU.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import torch

from .base import ImageSet
from .cache import cache_folder, decode_into, fingerprint, load_or_build
from .medmnist import DatasetNotFoundError

__all__ = ["IMAGENET_SUBSETS", "default_imagenet_root", "load_imagenet_subset"]

logger = logging.getLogger("monai_pld")

# ImageNet class ids of each subset (the class lists of the GLaD reference); label k is the k-th id of the list
IMAGENET_SUBSETS: dict[str, list[int]] = {
    "imagenet_a": [255, 376, 984, 364, 500, 986, 333, 576, 148, 135],
    "imagenet_b": [129, 916, 90, 275, 995, 874, 102, 259, 685, 139],
    "imagenet_c": [565, 94, 554, 535, 92, 392, 291, 136, 324, 11],
    "imagenet_d": [9, 258, 13, 262, 19, 339, 321, 24, 93, 322],
    "imagenet_e": [816, 96, 100, 145, 739, 713, 783, 76, 688, 326],
    "imagenette": [0, 217, 482, 491, 497, 566, 569, 571, 574, 701],
    "imagewoof": [193, 182, 258, 162, 155, 167, 159, 273, 207, 229],
    "imagenet_birds": [84, 130, 88, 144, 145, 22, 96, 9, 100, 89],
    "imagenet_fruits": [953, 954, 949, 950, 951, 957, 952, 945, 943, 948],
    "imagenet_cats": [281, 282, 283, 284, 285, 291, 292, 290, 289, 287],
}
VAL_PER_CLASS = 50
_WNID = re.compile(r"^n\d{8}$")


def default_imagenet_root() -> str:
    """``~/.monai_pld/data/imagenet``: where an ImageNet root (or a subset folder) is looked for by default."""
    return str(Path("~/.monai_pld/data/imagenet").expanduser())


def _split_folder(root: Path, split: str) -> Path:
    names = ["train"] if split in ("train", "val") else ["val", "test"]
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DatasetNotFoundError(
        f"{root} has no {' or '.join(n + '/' for n in names)} folder. ImageNet cannot be downloaded automatically: "
        "get ILSVRC-2012 from https://image-net.org (or the fast.ai ImageNette/ImageWoof archives) and point "
        "dataset_dir at a folder with train/ and val/, each holding WordNet-id class folders (n01440764, ...): "
        "either all 1,000 classes or just the 10 of the subset"
    )


def _class_folders(folder: Path, ids: list[int]) -> list[Path]:
    """The class folders of the subset, in label order (label k = k-th id of the subset's list)."""
    found = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(found) == 1000:
        # a full ImageNet split: class id i is the i-th WordNet id in sorted order (torchvision's convention)
        return [found[i] for i in ids]
    if len(found) == len(ids):
        # only the subset: sorting WordNet ids sorts ImageNet ids, so the k-th folder has the k-th smallest id
        by_id = dict(zip(sorted(ids), found, strict=True))
        return [by_id[i] for i in ids]
    raise ValueError(
        f"{folder} has {len(found)} class folders; expected 1000 (a full ImageNet split) or {len(ids)} (just the "
        f"subset, one WordNet-id folder per class)"
    )


def _readable_names(root: Path, folders: list[Path]) -> list[str]:
    """Class names from the Kaggle ``LOC_synset_mapping.txt`` when present, else the WordNet ids."""
    names = {p.name: p.name for p in folders}
    mapping = root / "LOC_synset_mapping.txt"
    if mapping.is_file():
        for line in mapping.read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, text = line.partition(" ")
            if wnid in names and text:
                names[wnid] = text.split(",")[0].strip()
    return [names[p.name] for p in folders]


class _DecodeRGB:
    """Decode, resize (shorter side) and centre-crop one file with torchvision (module level for DataLoader workers)."""

    def __init__(self, files: list[str], image_size: int) -> None:
        from torchvision.transforms import v2

        self.files = files
        self.transform = v2.Compose([v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])

    def __call__(self, i: int) -> np.ndarray:
        from torchvision.io import ImageReadMode, decode_image

        return self.transform(decode_image(self.files[i], mode=ImageReadMode.RGB)).numpy()


def _decode(files: list[str], image_size: int, num_workers: int) -> dict[str, np.ndarray]:
    out = np.empty((len(files), 3, image_size, image_size), dtype=np.uint8)
    for i, image in decode_into(len(files), _DecodeRGB(files, image_size), num_workers, "ImageNet images"):
        out[i] = image
    return {"images": out}


def load_imagenet_subset(
    subset: str = "imagenette",
    split: str = "train",
    root: str | os.PathLike | None = None,
    image_size: int = 128,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    num_workers: int | None = None,
) -> ImageSet:
    """One split of a 10-class ImageNet subset as an :class:`ImageSet` (uint8, 3 x size x size).

    Args:
        subset: a key of :data:`IMAGENET_SUBSETS`.
        split: ``train`` (ImageNet train images, what is distilled), ``test`` (the ``val/`` folder, the test set of
            the papers; ``test/`` is accepted too), or ``val``: a fixed 50-per-class part of the training images
            (overlaps ``train``; for watching curves only).
        root: an ImageNet root or a folder holding just the subset; default :func:`default_imagenet_root`.
        image_size: side after resizing the shorter side and centre-cropping.
        cache_dir: where decoded arrays are cached (default ``<root>/.monai_pld_cache``, or
            ``~/.cache/monai_pld`` when the data folder is read-only).
        download: accepted for symmetry with the other loaders; ImageNet cannot be downloaded automatically.
        num_workers: decoding processes (default: all cores).

    Raises:
        DatasetNotFoundError: the folder or its split is missing (says where to get the data and the layout).
        ValueError: an unknown subset or split, or a folder with the wrong number of class folders.
    """
    if subset not in IMAGENET_SUBSETS:
        raise ValueError(f"unknown ImageNet subset {subset!r}; known: {sorted(IMAGENET_SUBSETS)}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"'image_size' must be an integer >= 8, got {image_size!r}")
    base = Path(root if root is not None else default_imagenet_root()).expanduser()
    if not base.is_dir():
        raise DatasetNotFoundError(
            f"the ImageNet folder {base} does not exist (ImageNet cannot be downloaded automatically). Get ILSVRC-2012 "
            "from https://image-net.org (or the fast.ai ImageNette/ImageWoof archives) and point dataset_dir at it, "
            "e.g. --dataset_dir /data/imagenet"
        )
    ids = IMAGENET_SUBSETS[subset]
    folders = _class_folders(_split_folder(base, split), ids)
    from torchvision.datasets.folder import IMG_EXTENSIONS

    files, labels = [], []
    for label, folder in enumerate(folders):
        found = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        if not found:
            raise ValueError(f"class folder {folder} (label {label}) holds no images")
        files += found
        labels += [label] * len(found)
    cache = (
        cache_folder(base, cache_dir)
        / f"{subset}_{'train' if split == 'val' else split}_{image_size}px_{fingerprint(files)}.npz"
    )
    if not cache.is_file():
        logger.info(f"decoding {len(files)} {subset} {split} images to {image_size} px (cached in {cache})")
    workers = os.cpu_count() or 1 if num_workers is None else num_workers
    images = load_or_build(cache, lambda: _decode(files, image_size, workers))["images"]
    labels_np = np.asarray(labels, dtype=np.int64)
    if split == "val":
        gen = torch.Generator().manual_seed(0)
        keep = []
        for c in range(len(ids)):
            index = np.flatnonzero(labels_np == c)
            keep.append(index[torch.randperm(len(index), generator=gen)[:VAL_PER_CLASS].numpy()])
        order = np.sort(np.concatenate(keep))
        images, labels_np = images[order], labels_np[order]
    return ImageSet(
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.from_numpy(labels_np),
        _readable_names(base, folders),
        subset,
    )
