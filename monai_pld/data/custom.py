"""A site's own labelled 2D images as :class:`ImageSet` splits: an image folder, a MONAI datalist, a CSV or an npz.

``load_custom(split, path, image_size, **options)`` reads one split; the options are the keys of ``data_options``
(docs/configuration.md). Image files are decoded once (channels converted, 16-bit and float intensities scaled to
uint8, centre-cropped to square, resized) into one uint8 npz per source and size, keyed by a fingerprint of the
file list, sizes, mtimes and options, and reused until a file changes. A source with training data only gets a
stratified, seeded val/test split written to a JSON split file beside the cache, so the same images stay held out
on every run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_pld.utils import ConfigError, as_bool

from .base import ImageSet
from .files import load_files
from .medmnist import DatasetNotFoundError, npz_array, open_npz
from .preprocess import Preprocess
from .splits import Source, assign_splits, check_classes, split_file

__all__ = [
    "CUSTOM_FORMATS",
    "DEFAULT_DATA_OPTIONS",
    "check_data_options",
    "custom_attribution",
    "load_custom",
    "source_summary",
]

logger = logging.getLogger("monai_pld")

CUSTOM_FORMATS = ("auto", "folder", "datalist", "csv", "npz")
SPLITS = ("train", "val", "test")
DEFAULT_DATA_OPTIONS: dict[str, Any] = {
    "format": "auto",
    "channels": None,
    "intensity": "minmax",
    "csv_path_column": "image",
    "csv_label_column": "label",
    "val_fraction": 0.1,
    "test_fraction": 0.1,
    "split_seed": 0,
    "skip_unreadable": False,
    "allow_outside_root": False,
    "num_workers": None,
    "cache_dir": None,
    "description": "site data",
    "licence": "site data, not for redistribution",
}


def _fail(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"data_options '{key}' must be {expected}, got {value!r} (bundles/custom: --{key} <value>)")


def check_data_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """Every ``data_options`` key checked and completed with its default.

    Raises:
        ConfigError: an unknown key (with the known ones), or a value of the wrong kind (naming key and value).
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(DEFAULT_DATA_OPTIONS))
    if unknown:
        _fail(unknown[0], options[unknown[0]], f"one of the known keys {sorted(DEFAULT_DATA_OPTIONS)} (unknown key)")
    opts = {**DEFAULT_DATA_OPTIONS, **{k: v for k, v in options.items() if v is not None}}
    if opts["format"] not in CUSTOM_FORMATS:
        _fail("format", opts["format"], f"one of {list(CUSTOM_FORMATS)}")
    if opts["channels"] not in (None, 1, 3):
        _fail("channels", opts["channels"], "1 (grey), 3 (RGB) or null (as the first image)")
    intensity = opts["intensity"]
    if isinstance(intensity, (list, tuple)):
        ok = len(intensity) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in intensity)
        if not ok or not intensity[0] < intensity[1]:
            _fail("intensity", intensity, "'minmax' or a window [low, high] with low < high")
        opts["intensity"] = [float(intensity[0]), float(intensity[1])]
    elif intensity != "minmax":
        _fail("intensity", intensity, "'minmax' or a window [low, high] with low < high")
    for key in ("val_fraction", "test_fraction"):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            _fail(key, v, "a number in [0, 1)")
    if opts["val_fraction"] + opts["test_fraction"] >= 1:
        _fail("val_fraction", opts["val_fraction"], "such that val_fraction + test_fraction < 1")
    if isinstance(opts["split_seed"], bool) or not isinstance(opts["split_seed"], int) or opts["split_seed"] < 0:
        _fail("split_seed", opts["split_seed"], "an integer >= 0")
    nw = opts["num_workers"]
    if nw is not None and (isinstance(nw, bool) or not isinstance(nw, int) or nw < 0):
        _fail("num_workers", nw, "an integer >= 0 or null (all cores)")
    for key in ("skip_unreadable", "allow_outside_root"):
        opts[key] = as_bool(opts[key], key)
    for key in ("csv_path_column", "csv_label_column", "description", "licence"):
        if not isinstance(opts[key], str) or not opts[key]:
            _fail(key, opts[key], "a non-empty string")
    return opts


def source_format(path: Path, fmt: str = "auto") -> str:
    """The input form of ``path``: ``fmt`` when given, else from the path (a folder, .json, .csv, .npz)."""
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "folder"
    by_suffix = {".json": "datalist", ".csv": "csv", ".npz": "npz"}
    if path.suffix.lower() in by_suffix:
        return by_suffix[path.suffix.lower()]
    raise ConfigError(
        f"cannot tell the input form of dataset_dir {str(path)!r}: give an image folder, a .json datalist, a .csv "
        "or an .npz, or set data_options format to folder | datalist | csv | npz"
    )


def custom_attribution(options: dict[str, Any] | None = None) -> dict[str, str]:
    """The site's own description and licence (``data_options`` keys ``description``, ``licence``)."""
    opts = {**DEFAULT_DATA_OPTIONS, **{k: v for k, v in (options or {}).items() if v is not None}}
    return {
        "dataset": str(opts["description"]),
        "licence": str(opts["licence"]),
        "attribution": str(opts["description"]),
        "url": "",
    }


def source_summary(data: ImageSet) -> dict[str, Any]:
    """How a split was read, without local paths (which may name patients): the input form, the images listed,
    the conversions made and how many unreadable images were left out. Empty for the public datasets."""
    info = data.source_info
    if not info:
        return {}
    return {
        "format": info.get("format"),
        "images_listed": info.get("images"),
        "converted": dict(info.get("converted") or {}),
        "skipped_unreadable": len(info.get("skipped") or []),
    }


# ---------------------------------------------------------------------------------------------------------------
# npz in the MedMNIST layout


def _read_npz(path: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str] | None]:
    advice = "write it again (e.g. with numpy.savez_compressed) or copy it over again"
    with open_npz(path, advice) as npz:
        if "train_images" not in npz.files or "train_labels" not in npz.files:
            raise ValueError(
                f"{path} lacks train_images/train_labels (it has {sorted(npz.files)}); an npz source needs the "
                "MedMNIST layout: train_images, train_labels and optionally val_* and test_*, class_names"
            )
        parts = {}
        for split in SPLITS:
            if f"{split}_images" in npz.files:
                if f"{split}_labels" not in npz.files:
                    raise ValueError(f"{path} has {split}_images but no {split}_labels")
                parts[split] = tuple(npz_array(npz, f"{split}_{k}", path, advice) for k in ("images", "labels"))
        names = None
        if "class_names" in npz.files:
            names = [str(n) for n in np.atleast_1d(npz_array(npz, "class_names", path, advice)).tolist()]
    for split, (images, labels) in parts.items():
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"{path}: {split}_labels must be {len(images)} integers of shape (N,) or (N, 1), got "
                f"{labels.dtype} {labels.shape}"
            )
        grey, rgb = images.ndim == 3, images.ndim == 4 and images.shape[-1] in (1, 3, 4)
        if not (grey or rgb) or images.shape[1] < 1 or images.shape[2] < 1:
            raise ValueError(
                f"{path}: {split}_images must be grey (N, H, W) or colour (N, H, W, 3), got {images.shape}"
            )
        if images.dtype.kind == "f" and len(images):
            finite = np.isfinite(images).reshape(len(images), -1).all(1)
            if not finite.all():
                bad = np.flatnonzero(~finite)
                raise ValueError(
                    f"{path}: {len(bad)} of {len(images)} {split}_images hold NaN or infinite values (the first at "
                    f"index {bad[0]}); replace them in the file (e.g. numpy.nan_to_num(images, nan=background)) or "
                    "remove those images and their labels"
                )
        parts[split] = (images if rgb else images[..., None], labels.astype(np.int64))
    return parts, names


def _load_npz(path: Path, split: str, image_size: int | None, opts: dict[str, Any]) -> ImageSet:
    parts, names = _read_npz(path)
    high = max((int(labels.max()) for _, labels in parts.values() if len(labels)), default=-1)
    names = names if names is not None else [str(c) for c in range(high + 1)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{path}: class_names repeats {repeated}; give every class a name of its own")
    for s, (_, labels) in parts.items():
        if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
            raise ValueError(
                f"{path}: {s}_labels must lie in [0, {len(names)}) for the {len(names)} entries of class_names, "
                f"found {labels.min()}..{labels.max()}"
            )
    own = [s for s, (_, labels) in parts.items() for _ in range(len(labels))]
    source = Source(
        [f"{s}:{i}" for s, (_, labels) in parts.items() for i in range(len(labels))],
        np.concatenate([labels for _, labels in parts.values()]),
        own,
        names,
    )
    splits = assign_splits(source, opts, split_file(path, opts))
    pick = np.flatnonzero(splits == split)
    if not len(pick):
        raise ValueError(f"{path} has no {split}_images and {split}_fraction is 0, so there is no {split} split")
    own_np = np.asarray(own, dtype=object)
    start = int(np.flatnonzero(own_np == own[pick[0]])[0])
    part_images = parts[own[pick[0]]][0]
    if np.all(own_np[pick] == own[pick[0]]):
        # one part of the file (the usual case): index it without concatenating the others
        local = pick - start
        images = part_images if len(local) == len(part_images) else part_images[local]
    else:
        images = np.concatenate([im for im, _ in parts.values()])[pick]
    # every split gets the training part's channels (a grey test split of a colour file would not fit the network)
    train_channels = parts["train"][0].shape[-1]
    opts = {**opts, "channels": opts["channels"] or (3 if train_channels == 4 else train_channels)}
    return _to_imageset(images, source.labels[pick], names, path, split, image_size, opts)


def _to_imageset(
    images: np.ndarray, labels: np.ndarray, names: list[str], path: Path, split: str, size: int | None, opts: dict
) -> ImageSet:
    """NHWC arrays to an ImageSet; uint8 at the asked size and channels go straight through (no per-image work)."""
    if split == "train":
        check_classes(labels, names, str(path))
    native = 3 if images.shape[-1] == 4 else images.shape[-1]
    channels = opts["channels"] or native
    size = size or images.shape[1]
    converted: dict[str, int] = {}
    if images.dtype == np.uint8 and images.shape[1] == images.shape[2] == size and images.shape[-1] == channels:
        tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    else:
        array, converted = _preprocess_array(images, size, channels, opts, f"{path} {split}")
        tensor = torch.from_numpy(array)
    info = {"format": "npz", "images": len(images), "converted": converted, "skipped": []}
    return ImageSet(tensor, torch.from_numpy(labels), names, "custom", info)


def _preprocess_array(
    images: np.ndarray, size: int, channels: int, opts: dict, what: str
) -> tuple[np.ndarray, dict[str, int]]:
    prep = Preprocess(size, channels, opts["intensity"])
    out = np.empty((len(images), channels, size, size), dtype=np.uint8)
    for i in range(len(images)):
        out[i] = prep(np.moveaxis(images[i], -1, 0))
    if prep.converted:
        logger.info(f"{what}: converted {prep.summary()}")
    return out, dict(prep.converted)


# ---------------------------------------------------------------------------------------------------------------


def load_custom(
    split: str = "train",
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
    **options: Any,
) -> ImageSet:
    """One split of a site's own images as an :class:`ImageSet` named ``custom``.

    Args:
        split: ``train``, ``val`` or ``test``.
        root: an image folder, a MONAI datalist (.json), a CSV or an npz in the MedMNIST layout.
        image_size: side of the square images (default: the npz's own size; 28 for image files).
        options: the ``data_options`` keys (see :data:`DEFAULT_DATA_OPTIONS` and docs/configuration.md).

    Raises:
        DatasetNotFoundError: ``root`` is not given or does not exist.
        ConfigError: an invalid option.
        ValueError: a source that cannot be read (names the file or entry and the fix).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    opts = check_data_options(options)
    if root is None or not Path(root).expanduser().exists():
        raise DatasetNotFoundError(
            f"dataset_dir {str(root)!r} does not exist; with dataset_flag custom, point dataset_dir at an image "
            "folder, a .json datalist, a .csv or an .npz, e.g. --dataset_dir /data/site_images"
        )
    path = Path(root).expanduser()
    fmt = source_format(path, opts["format"])
    if fmt == "npz":
        return _load_npz(path, split, image_size, opts)
    return load_files(path, fmt, split, image_size or 28, opts)
