"""The image set an evaluation trains on, named by a config value: a run folder, an ``images.npz``, a
``distribution.pt``, a shared package, or the ``random`` / ``full`` real-image baselines."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from monai_pld.data import EVAL_MODES, ImageSet, ImageSource, select_initial_indices
from monai_pld.formats.distribution import load_distribution
from monai_pld.formats.images import as_float_images, read_images
from monai_pld.formats.package import is_package, load_distilled
from monai_pld.networks.generators import load_generator
from monai_pld.utils import resolve_device

__all__ = ["EVAL_MODES", "ImageSource", "default_evaluation_dir", "load_image_source"]


def load_image_source(
    distilled: str | os.PathLike,
    train: ImageSet,
    ipc: int = 10,
    seed: int = 0,
    mode: str = "mean",
    generator_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> ImageSource:
    """The image set named by ``distilled``.

    Args:
        distilled: ``random`` (``ipc`` seeded real images per class, the same choice that initialises distillation),
            ``full`` (the training split), a run folder (``<run>`` or ``<run>/distilled``), an ``images.npz``, a
            ``distribution.pt``, or a shared package (folder or ``.zip``, verified by
            :func:`monai_pld.formats.load_distilled`).
        train: the real training split (baselines, and the class count and image shape to check against).
        ipc: images per class of ``random``.
        seed: seed of ``random`` and of sampled distributions.
        mode: for a distribution: ``mean`` (the images of ``images.npz``), ``sample`` (one fixed-seed sample) or
            ``resample`` (fresh samples every epoch).
        generator_path: generator of a distribution (default: the one recorded in its manifest).
        device: where the generator renders.

    Raises:
        ValueError: unknown mode, an unreadable set, or one whose classes or image shape do not match ``train``
            (``PackageError``, a ``ValueError``, for a package that fails verification).
    """
    if mode not in EVAL_MODES:
        raise ValueError(f"'mode' must be one of {list(EVAL_MODES)}, got {mode!r}")
    if str(distilled) == "random":
        order, labels = select_initial_indices(train, ipc, seed)
        return ImageSource(train.float_images(order), labels, {"kind": "random", "ipc": ipc, "seed": seed})
    if str(distilled) == "full":
        return ImageSource(train.float_images(), train.labels, {"kind": "full", "images": len(train)})
    path = Path(distilled)
    if is_package(path):  # verified (manifest, checksums, labels) before anything is parsed
        package = load_distilled(path, map_location=resolve_device(device), load_generator=mode != "mean")
        source = package.image_source(mode, seed)
        _check_against(source, train, path, package.class_names)
        return source
    if path.is_dir():
        path = path / "distilled" if (path / "distilled").is_dir() else path
        wants_distribution = mode != "mean" and (path / "distribution.pt").is_file()
        path = path / ("distribution.pt" if wants_distribution else "images.npz")
    if not path.is_file():
        raise ValueError(
            f"no image set at {path}; give a run folder, an images.npz, a distribution.pt, 'random' or 'full'"
        )
    description: dict[str, Any] = {"kind": "file", "path": str(path), "mode": mode}
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    if manifest:
        description["manifest"] = {k: manifest.get(k) for k in ("ipc", "parameterization", "matcher", "config")}
    class_names = list(manifest.get("class_names") or [])
    if path.suffix == ".npz":
        images, labels, names = read_images(path, require_class_names=False)
        class_names = list(names) or class_names
        source = ImageSource(as_float_images(images), torch.from_numpy(labels), description)
    else:
        generator_file = generator_path or (manifest.get("generator") or {}).get("path")
        if not generator_file:
            raise ValueError(f"{path}: give generator_path (the manifest names no generator)")
        dev = resolve_device(device)
        param = load_distribution(path, map_location=dev)
        generator = load_generator(
            generator_file, map_location=dev, latent_layer=param.hyper_parameters.get("latent_layer", 0)
        )
        source = ImageSource.from_distribution(param, generator, description, mode, seed)
    _check_against(source, train, path, class_names)
    return source


def _check_against(source: ImageSource, train: ImageSet, path: Path, class_names: list[str]) -> None:
    """The set must be of the data it is tested on: same image shape, and, when it names its classes (every set
    this package writes does), the same classes in the same order; otherwise the accuracy would be meaningless."""
    if class_names and [str(n) for n in class_names] != [str(n) for n in train.class_names]:
        shown = [str(n) for n in train.class_names]
        raise ValueError(
            f"{path} was distilled from {len(class_names)} classes {_few(class_names)}, but the data have "
            f"{len(shown)} classes {_few(shown)}; evaluate it with the dataset (dataset_flag, dataset_dir) it was "
            "distilled from"
        )
    shape = (train.channels, train.image_size, train.image_size)
    if tuple(source.images.shape[1:]) != shape:
        raise ValueError(
            f"{path} holds images of shape {tuple(source.images.shape[1:])} but the test data are {shape}; evaluate it "
            "with the dataset_flag and image_size it was distilled from"
        )
    if source.labels.numel() and int(source.labels.max()) >= train.num_classes:
        raise ValueError(
            f"{path} has labels up to {int(source.labels.max())} but the data have {train.num_classes} classes; "
            "evaluate it with the dataset it was distilled from"
        )


def _few(names: list[str], limit: int = 10) -> str:
    names = [str(n) for n in names]
    return str(names) if len(names) <= limit else str(names[:limit])[:-1] + ", ...]"


def default_evaluation_dir(distilled: str | os.PathLike, dataset_flag: str, image_size: int, mode: str) -> str:
    """Where the evaluation of ``distilled`` is written by default: ``<run>/evaluation_<mode>`` for a run folder,
    ``<package>_evaluation_<mode>`` beside a package or a file (a package must stay exactly as exported), and
    ``results/baseline_<flag>_<size>px_<name>/evaluation_<mode>`` for ``random``/``full``."""
    name = str(distilled)
    if name in ("random", "full"):
        return os.path.join("results", f"baseline_{dataset_flag}_{image_size}px_{name}", f"evaluation_{mode}")
    path = Path(name)
    if (path.is_dir() and not is_package(path)) or path.name in ("images.npz", "distribution.pt"):
        folder = path if path.is_dir() else path.parent  # a run, or a file of its distilled/ folder
        return str(folder / f"evaluation_{mode}")
    return str(path.parent / f"{path.name if path.is_dir() else path.stem}_evaluation_{mode}")
