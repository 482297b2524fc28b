"""A site's image files (an image folder, a MONAI datalist or a CSV) listed, decoded once and cached as uint8.

Listing gives every image a key (its path relative to the source's folder), a label and, where the source says so,
a split. Decoding runs in torch DataLoader workers; the result is one npz per source, size and channel count,
keyed by a fingerprint of the keys, file sizes, mtimes, labels and preprocessing options, so a changed file or
option rebuilds it and anything else reuses it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import ImageSet
from .cache import cache_folder, decode_into, fingerprint, load_or_build
from .preprocess import Preprocess
from .splits import Source, assign_splits, check_classes, split_file

__all__ = ["IMAGE_SUFFIXES", "list_csv", "list_datalist", "list_folder", "load_files", "read_image"]

logger = logging.getLogger("monai_pld")

_PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_MEDICAL_SUFFIXES = (".nii", ".nii.gz", ".dcm")
IMAGE_SUFFIXES = _PIL_SUFFIXES + _MEDICAL_SUFFIXES
_PIL_8BIT = {"1": "L", "L": "L", "LA": "LA", "P": "RGBA", "PA": "RGBA", "RGB": "RGB", "RGBA": "RGBA"}
_PIL_8BIT.update({m: "RGB" for m in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX")})
_SPLIT_NAMES = {"training": "train", "validation": "val", "test": "test"}
CACHE_VERSION = "1"


def _suffix(path: str) -> str:
    lower = path.lower()
    return ".nii.gz" if lower.endswith(".nii.gz") else os.path.splitext(lower)[1]


# ---------------------------------------------------------------------------------------------------------------
# reading one file


def read_image(path: str) -> np.ndarray:
    """One 2D image, channel-first ``(C, H, W)``, in its stored dtype, rows first as an image viewer shows them.

    Plain 8-bit PNG/JPEG/TIFF/BMP are decoded by PIL directly: MONAI's ``LoadImage`` costs ~1 ms per image in reader
    selection and metadata, which would dominate decoding a folder of small images, and yields the same array.
    Everything else (16-bit or float PNG/TIFF, NIfTI, DICOM) goes through ``LoadImage``.

    Raises:
        ValueError: the file is not a 2D image (names the shape) or DICOM is read without pydicom installed.
        Exception: whatever the reader raises for a corrupt file.
    """
    suffix = _suffix(path)
    if suffix in _PIL_SUFFIXES:
        from PIL import Image

        with Image.open(path) as im:
            mode = _PIL_8BIT.get(im.mode)
            if mode is not None and getattr(im, "n_frames", 1) == 1:
                if im.mode == "P" and "transparency" not in im.info:
                    mode = "RGB"
                array = np.asarray(im.convert(mode) if im.mode != mode else im)
                return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))
    return _load_with_monai(path, suffix)


def _load_with_monai(path: str, suffix: str) -> np.ndarray:
    from monai.transforms import LoadImage

    if suffix == ".dcm":
        from monai.utils import optional_import

        _, has_pydicom = optional_import("pydicom")
        if not has_pydicom:
            raise ValueError(
                f"{path} is DICOM, which needs pydicom: pip install 'monai_pld[dicom]' (or pip install pydicom)"
            )
        reader = "PydicomReader"
    else:
        reader = "NibabelReader" if suffix in (".nii", ".nii.gz") else "PILReader"
    image = LoadImage(image_only=True, ensure_channel_first=True, reader=reader, dtype=None)(path)
    array = np.asarray(image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image)
    while array.ndim > 3 and array.shape[-1] == 1:  # 2D NIfTI/DICOM come as (C, X, Y, 1)
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(f"{path} is not a 2D image: shape {tuple(array.shape)} after adding the channel")
    if reader == "PILReader":  # MONAI's PILReader reverses the axes (W, H); back to rows first like PIL
        array = array.transpose(0, 2, 1)
    return np.ascontiguousarray(array)


class _Decode:
    """``i -> (uint8 image, notes)`` or ``(None, error)``; module level so DataLoader workers can unpickle it."""

    def __init__(self, files: list[str], prep: Any) -> None:
        self.files, self.prep = files, prep

    def __call__(self, i: int) -> tuple[np.ndarray | None, list[str] | str]:
        try:
            return self.prep.apply(read_image(self.files[i]))
        except Exception as e:  # PIL, nibabel, pydicom and MONAI raise many types for a bad file; report them all
            return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"


# ---------------------------------------------------------------------------------------------------------------
# listing the sources


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _check_inside(files: list[str], where: list[str], root: Path, allow_outside: bool) -> None:
    """Refuse paths that leave ``root`` through ``..`` or a symlink: a datalist or CSV must not read arbitrary files."""
    if allow_outside:
        return
    real_root = os.path.realpath(root)
    real_dirs: dict[str, str] = {}  # a few folders hold many images: resolve each folder once, not every file
    for path, entry in zip(files, where, strict=True):
        folder, name = os.path.split(path)
        if folder not in real_dirs:
            real_dirs[folder] = os.path.realpath(folder)
        real = os.path.realpath(path) if os.path.islink(path) else os.path.join(real_dirs[folder], name)
        if not _inside(real, real_root):
            raise ValueError(
                f"{entry}: {path} lies outside {real_root} (through '..' or a symlink); move the image under that "
                "folder, or set data_options allow_outside_root: true if the source is trusted"
            )


# folder names that mean a split, not a class, in layouts found in the wild (Kaggle's Training/Testing, valid/)
_SPLIT_LIKE = {"training": "train", "validation": "val", "valid": "val", "testing": "test", "eval": "val"}


def _check_split_names(root: Path) -> None:
    """Refuse split folders spelt otherwise than ``train``/``val``/``test``: read as classes (or skipped beside a
    ``train/``), their images would silently become a class of their own or go unused."""
    names = [e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]
    odd = [n for n in names if n.lower() in _SPLIT_LIKE or (n.lower() in ("train", "val", "test") and n != n.lower())]
    if odd:
        renames = ", ".join(f"{n}/ -> {_SPLIT_LIKE.get(n.lower(), n.lower())}/" for n in sorted(odd))
        raise ValueError(
            f"{root} has folders named like splits ({', '.join(sorted(odd))}) that would be read as classes or "
            f"ignored: split folders must be called train/, val/ and test/ exactly; rename them ({renames})"
        )


def list_folder(root: Path, allow_outside: bool = False) -> tuple[Source, list[str]]:
    """An ImageFolder (``<root>/<class>/<images>``), or ``train/``, ``val/``, ``test/`` folders each laid out so."""
    split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    _check_split_names(root)
    if "train" not in split_dirs:
        split_dirs = {None: root}
    per_split: dict[str | None, dict[str, list[str]]] = {}
    real_root = os.path.realpath(root)
    for split, folder in split_dirs.items():
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith(".") and e.name)
        if split is None and not classes:
            raise ValueError(
                f"{folder} holds no class folders: an image folder needs one subfolder per class, e.g. "
                f"{folder}/normal/001.png, {folder}/tumour/002.png (optionally inside train/, val/, test/)"
            )
        per_split[split] = {}
        for name in classes:
            found = _images_under(str(folder / name), real_root, allow_outside)
            if not found:
                raise ValueError(
                    f"class folder {folder / name} holds no images ({', '.join(IMAGE_SUFFIXES)}); add images of "
                    f"class {name!r} or remove the folder"
                )
            per_split[split][name] = found
    class_names = sorted({name for by_class in per_split.values() for name in by_class})
    index = {name: c for c, name in enumerate(class_names)}
    files, labels, splits = [], [], []
    for split, by_class in per_split.items():
        for name, found in by_class.items():
            files += found
            labels += [index[name]] * len(found)
            splits += [split] * len(found)
    if not files:
        raise ValueError(f"{root} holds no images")
    return Source(_relative(files, root), np.asarray(labels, dtype=np.int64), splits, class_names), files


def _images_under(folder: str, real_root: str, allow_outside: bool) -> list[str]:
    """Image files under ``folder``, sorted, hidden entries skipped; a symlink leading outside ``real_root`` is
    refused unless ``allow_outside`` (``os.scandir`` knows which entries are links without another system call)."""
    found: list[str] = []
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_symlink() and not allow_outside and not _inside(os.path.realpath(entry.path), real_root):
            raise ValueError(
                f"{entry.path} lies outside {real_root} (through a symlink); move the image under that folder, or "
                "set data_options allow_outside_root: true if the source is trusted"
            )
        if entry.is_dir():
            found += _images_under(entry.path, real_root, allow_outside)
        elif entry.name.lower().endswith(IMAGE_SUFFIXES):
            found.append(entry.path)
    return found


def _relative(files: list[str], base: Path) -> list[str]:
    """Keys of the files: their paths relative to ``base`` (a prefix cut when they lie under it, which is most)."""
    prefix = os.path.join(os.path.abspath(base), "")
    return [f[len(prefix) :] if f.startswith(prefix) else os.path.relpath(f, base) for f in files]


def _label_indices(
    values: list[Any], where: list[str], mapping: dict | None, source: str
) -> tuple[list[int], list[str]]:
    """Labels (ints or class names) to indices and the class names.

    With a ``mapping`` (a datalist's ``labels``: index -> name, or name -> index) every label must be in it. Without
    one, integer labels name classes ``0..max`` and name labels are numbered in sorted order.
    """
    if mapping:
        try:
            by_index = {int(k): str(v) for k, v in mapping.items()}
        except (TypeError, ValueError):
            try:
                by_index = {int(v): str(k) for k, v in mapping.items()}
            except (TypeError, ValueError) as e:
                raise ValueError(f'{source}: \'labels\' must map class indices to names, e.g. {{"0": "normal"}}') from e
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"{source}: the 'labels' indices must be 0..{len(by_index) - 1}, got {sorted(by_index)}")
        names = [by_index[i] for i in range(len(by_index))]
        by_name = {n: i for i, n in enumerate(names)}
        out = []
        for value, entry in zip(values, where, strict=True):
            text = str(value).strip()
            label = by_name.get(text)
            if label is None and text.lstrip("-").isdigit() and int(text) in by_index:
                label = int(text)
            if label is None:
                raise ValueError(
                    f"{entry}: label {value!r} is not in the labels mapping of {source} ({by_index}); fix the entry or "
                    "add the class to 'labels'"
                )
            out.append(label)
        return out, names
    texts = [str(v).strip() for v in values]
    empty = [entry for t, entry in zip(texts, where, strict=True) if not t]
    if empty:
        raise ValueError(f"{empty[0]} has no label; every image needs a class")
    numeric = [t.lstrip("-").isdigit() for t in texts]
    if all(numeric):
        ints = [int(t) for t in texts]
        bad = [(v, entry) for v, entry in zip(ints, where, strict=True) if v < 0]
        if bad:
            raise ValueError(f"{bad[0][1]}: label {bad[0][0]} is negative; labels are class indices 0, 1, ...")
        return ints, [str(c) for c in range(max(ints) + 1)]
    if any(numeric):
        first = next(entry for n, entry in zip(numeric, where, strict=True) if n)
        raise ValueError(
            f"{source} mixes class indices and class names ({first} has a number); use one kind, or give a 'labels' "
            "mapping"
        )
    names = sorted(set(texts))
    index = {n: i for i, n in enumerate(names)}
    return [index[t] for t in texts], names


def _resolve(base: Path, image: str) -> str:
    return os.path.normpath(image if os.path.isabs(image) else os.path.join(base, image))


def _check_exist(files: list[str], where: list[str]) -> None:
    for path, entry in zip(files, where, strict=True):
        if not os.path.isfile(path):
            raise ValueError(
                f"{entry}: image {path} does not exist; fix the path (relative paths are relative to the "
                "list's folder) or remove the entry"
            )


def list_datalist(path: Path, allow_outside: bool = False) -> tuple[Source, list[str]]:
    """A MONAI (Decathlon) datalist: ``training`` / ``validation`` / ``test`` lists of ``{"image", "label"}``,
    read with ``monai.data.load_decathlon_datalist``; an optional top-level ``labels`` maps indices to names."""
    from monai.data import load_decathlon_datalist

    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not readable JSON ({type(e).__name__}: {e})") from e
    if not isinstance(document, dict) or not isinstance(document.get("training"), list) or not document["training"]:
        raise ValueError(
            f'{path} needs a non-empty \'training\' list of {{"image": path, "label": class}} entries (MONAI '
            "datalist convention), plus optional 'validation' and 'test' lists and a 'labels' mapping"
        )
    base = path.parent
    files, values, splits, where = [], [], [], []
    for key, split in _SPLIT_NAMES.items():
        if not document.get(key):
            continue
        entries = load_decathlon_datalist(str(path), is_segmentation=False, data_list_key=key, base_dir=str(base))
        for i, entry in enumerate(entries):
            name = f"{path.name} {key}[{i}]"
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise ValueError(f"{name} needs 'image' and 'label', got {entry!r}")
            image = entry["image"]
            if isinstance(image, list):  # load_decathlon_datalist keeps lists; a 2D image is one file
                raise ValueError(f"{name}: 'image' must be one file, got a list of {len(image)}")
            files.append(_resolve(base, str(image)))
            values.append(entry["label"])
            splits.append(split)
            where.append(name)
    labels, names = _label_indices(values, where, document.get("labels"), str(path))
    _check_exist(files, where)
    _check_inside(files, where, base, allow_outside)
    return Source(_relative(files, base), np.asarray(labels, dtype=np.int64), splits, names), files


def list_csv(path: Path, path_column: str, label_column: str, allow_outside: bool = False) -> tuple[Source, list[str]]:
    """A CSV with a path column and a label column (class indices or names); paths relative to the CSV's folder."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            columns = list(rows[0]) if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path} is not a readable CSV ({type(e).__name__}: {e})") from e
    if not rows:
        raise ValueError(f"{path} has no rows; it needs a header and one row per image")
    missing = [c for c in (path_column, label_column) if c not in columns]
    if missing:
        raise ValueError(
            f"{path} has no column {missing} (it has {columns}); set data_options csv_path_column / csv_label_column"
        )
    base = path.parent
    where = [f"{path.name} row {i + 2}" for i in range(len(rows))]
    blank = [w for w, row in zip(where, rows, strict=True) if not (row[path_column] or "").strip()]
    if blank:
        raise ValueError(f"{blank[0]} has an empty {path_column!r}")
    files = [_resolve(base, row[path_column].strip()) for row in rows]
    labels, names = _label_indices([row[label_column] or "" for row in rows], where, None, str(path))
    _check_exist(files, where)
    _check_inside(files, where, base, allow_outside)
    return Source(_relative(files, base), np.asarray(labels, dtype=np.int64), [None] * len(rows), names), files


# ---------------------------------------------------------------------------------------------------------------
# decoding, caching, splitting


def _first_channels(files: list[str]) -> int:
    """Channels of the first readable file (1 or 3): what ``channels: null`` resolves to."""
    for path in files[:50]:
        try:
            c = read_image(path).shape[0]
        except Exception:  # an unreadable first file is reported by the decoding pass; try the next one
            continue
        return 1 if c in (1, 2) else 3
    return 1


def _unreadable_message(failures: list[tuple[str, str]]) -> str:
    shown = "; ".join(f"{p} ({e})" for p, e in failures[:5])
    more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
    return (
        f"{len(failures)} image(s) cannot be read: {shown}{more}. Fix or remove them, or set data_options "
        "skip_unreadable: true to leave them out (the count is logged and recorded)"
    )


def _decode_all(files: list[str], size: int, channels: int, opts: dict[str, Any], what: str) -> dict:
    prep = Preprocess(size, channels, opts["intensity"])
    images = np.zeros((len(files), channels, size, size), dtype=np.uint8)
    readable = np.ones(len(files), dtype=bool)
    failures: list[tuple[str, str]] = []
    notes: Counter[str] = Counter()
    workers = opts["num_workers"] if opts["num_workers"] is not None else min(os.cpu_count() or 1, 8)
    logger.info(f"decoding {len(files)} images of {what} to {channels} x {size} x {size} with {workers} workers")
    for i, (image, info) in decode_into(len(files), _Decode(files, prep), workers, what):
        if image is None:
            readable[i] = False
            failures.append((files[i], info))
        else:
            images[i] = image
            notes.update(info)
    if failures and not opts["skip_unreadable"]:
        raise ValueError(_unreadable_message(failures))
    if failures:
        logger.warning(f"{what}: skipped {len(failures)} unreadable image(s): {_unreadable_message(failures)}")
    if notes:
        logger.info(f"{what}: converted {', '.join(f'{n} {k}' for k, n in sorted(notes.items()))}")
    record = {"converted": dict(notes), "skipped": [p for p, _ in failures]}
    return {"images": images, "readable": readable, "record": np.array(json.dumps(record))}


def load_files(path: Path, fmt: str, split: str, size: int, opts: dict[str, Any]) -> ImageSet:
    """One split of an image folder, datalist or CSV (see :func:`monai_pld.data.custom.load_custom`)."""
    allow = opts["allow_outside_root"]
    if fmt == "folder":
        if not path.is_dir():
            raise ValueError(f"dataset_dir {path} is not a folder, but data_options format is 'folder'")
        source, files = list_folder(path, allow)
        base = path
    elif fmt == "datalist":
        source, files = list_datalist(path, allow)
        base = path.parent
    else:
        source, files = list_csv(path, opts["csv_path_column"], opts["csv_label_column"], allow)
        base = path.parent
    channels = opts["channels"] or _first_channels(files)
    lines = [f"v{CACHE_VERSION} {fmt} {size} {channels} {opts['intensity']}", *source.class_names]
    for key, file, label in zip(source.keys, files, source.labels.tolist(), strict=True):
        st = os.stat(file)
        lines.append(f"{key}\t{st.st_size}\t{st.st_mtime_ns}\t{label}")
    folder = cache_folder(base, opts["cache_dir"])
    tag = fingerprint([str(path.resolve())])[:8]
    cache = folder / f"{path.stem or 'images'}_{tag}_{size}px_c{channels}_{fingerprint(lines)}.npz"
    arrays = load_or_build(cache, lambda: _decode_all(files, size, channels, opts, str(path)))
    record = json.loads(str(arrays["record"]))
    readable = arrays["readable"]
    if record["skipped"] and not opts["skip_unreadable"]:
        failures = [(p, "recorded as unreadable in the cache") for p in record["skipped"]]
        raise ValueError(_unreadable_message(failures))
    keep = np.flatnonzero(readable)
    source = Source(
        [source.keys[i] for i in keep], source.labels[keep], [source.splits[i] for i in keep], source.class_names
    )
    splits = assign_splits(source, opts, split_file(path, opts))
    pick = np.flatnonzero(splits == split)
    if not len(pick):
        raise ValueError(f"{path} gives no {split} images: add a {split} list/folder or set {split}_fraction > 0")
    if split == "train":
        check_classes(source.labels[pick], source.class_names, str(path))
    images = arrays["images"][keep[pick]]
    info = {"format": fmt, "cache": str(cache), "images": len(files), **record}
    return ImageSet(torch.from_numpy(images), torch.from_numpy(source.labels[pick]), source.class_names, "custom", info)
