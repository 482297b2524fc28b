"""Expert trajectories on disk, for trajectory matching (MTT): one ``expert_NNN.pt`` per expert and the index
``experts.json``.

Each expert file holds plain tensors and Python values, loadable with ``torch.load(weights_only=True)``. Its keys:

* the settings (:func:`expert_settings`): ``format`` (``"monai_pld.expert/1"``), ``dataset``, ``train_images``,
  ``in_channels``, ``num_classes``, ``image_size``, ``model``, ``model_kwargs``, ``epochs``, ``lr``, ``momentum``,
  ``weight_decay``, ``batch_size``, ``dsa_strategy``, ``mean``, ``std``, ``seed``;
* ``expert`` (its index), ``param_names`` and ``param_shapes`` (``named_parameters`` order), ``num_parameters``;
* ``trajectory``: ``float32`` tensor ``(epochs + 1, num_parameters)``, the initial parameters and then one row after
  every epoch, each the concatenation of the flattened parameters (the compact format: one tensor, no per-layer
  dictionaries);
* ``final_train_loss``, ``final_train_accuracy`` (last epoch, on the augmented batches), ``train_seconds``,
  ``versions``.

``experts.json`` indexes the folder (settings, file names and SHA-256). :func:`read_expert` validates one file and
:class:`ExpertBuffer` reads a folder back for the matcher; :mod:`monai_pld.engines.experts` trains and writes them.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from monai_pld.data import ImageSet
from monai_pld.utils import atomic_save_json, atomic_save_torch, library_versions, sha256_file

__all__ = [
    "EXPERT_FORMAT",
    "EXPERTS_INDEX",
    "ExpertBuffer",
    "ExpertFileError",
    "expert_file",
    "expert_settings",
    "read_expert",
    "write_expert",
    "write_expert_index",
]

EXPERTS_INDEX = "experts.json"
EXPERT_FORMAT = "monai_pld.expert/1"
# the keys every expert file must carry, and those that must agree between the experts of one folder
_REQUIRED = ("format", "epochs", "param_names", "param_shapes", "trajectory", "mean", "std", "model", "model_kwargs")
_SAME_IN_FOLDER = (
    "dataset",
    "in_channels",
    "num_classes",
    "image_size",
    "model",
    "model_kwargs",
    "mean",
    "std",
    "param_names",
    "param_shapes",
)
# the command that writes expert trajectories, named wherever they are missing
TRAIN_EXPERTS_COMMAND = "python -m monai.bundle run --config_file bundles/<set>/train_experts.yaml"


class ExpertFileError(ValueError):
    """An expert file or folder is missing, unreadable or does not fit; the message names it and the fix."""


def expert_settings(
    dataset: ImageSet,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    model: str,
    model_kwargs: dict[str, Any] | None,
    dsa_strategy: str | None,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int,
) -> dict[str, Any]:
    """Everything that determines an expert besides its index: stored in every file and compared on resume.

    Returns:
        plain Python values (JSON- and ``weights_only``-safe).
    """
    return {
        "format": EXPERT_FORMAT,
        "dataset": dataset.name,
        "train_images": len(dataset),
        "in_channels": dataset.channels,
        "num_classes": dataset.num_classes,
        "image_size": dataset.image_size,
        "model": str(model),
        "model_kwargs": dict(model_kwargs or {}),
        "epochs": int(epochs),
        "lr": float(lr),
        "momentum": float(momentum),
        "weight_decay": float(weight_decay),
        "batch_size": int(batch_size),
        "dsa_strategy": dsa_strategy or "",
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "seed": int(seed),
    }


def read_expert(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Load and validate one expert file with ``torch.load(weights_only=True)``.

    Args:
        path: an ``expert_NNN.pt``.
        mmap: memory-map the tensors instead of reading them (cheap validation of large files).

    Returns:
        the record, with the trajectory on the CPU.

    Raises:
        ExpertFileError: naming the file, what is wrong with it and the fix.
    """
    path = Path(path)
    try:
        record = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated zip, foreign pickle, ...: all mean "not a usable expert file"
        raise ExpertFileError(
            f"{path} cannot be read as an expert trajectory ({type(e).__name__}: {e}); delete it and run "
            f"train_experts.yaml again to retrain it ({TRAIN_EXPERTS_COMMAND})"
        ) from e
    if not isinstance(record, dict) or record.get("format") != EXPERT_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ExpertFileError(
            f"{path} is not a {EXPERT_FORMAT} expert file (format {found!r}); delete it or point expert_dir at a "
            "folder written by train_experts.yaml"
        )
    missing = [key for key in _REQUIRED if key not in record]
    if missing:
        raise ExpertFileError(f"{path} lacks the fields {missing}; delete it and retrain it with train_experts.yaml")
    trajectory = record["trajectory"]
    count = sum(math.prod(shape) for shape in record["param_shapes"])
    expected = (int(record["epochs"]) + 1, count)
    if (
        not isinstance(trajectory, torch.Tensor)
        or trajectory.dtype != torch.float32
        or tuple(trajectory.shape) != expected
    ):
        got = (getattr(trajectory, "dtype", type(trajectory)), tuple(getattr(trajectory, "shape", ())))
        raise ExpertFileError(
            f"{path}: trajectory is {got}, expected float32 of shape {expected} (epochs + 1, parameters); delete "
            "the file and retrain it"
        )
    if len(record["param_names"]) != len(record["param_shapes"]):
        raise ExpertFileError(f"{path}: param_names and param_shapes differ in length; delete the file and retrain it")
    return record


def expert_file(folder: str | os.PathLike, index: int) -> Path:
    """The file of expert ``index`` in ``folder``: ``expert_NNN.pt``."""
    return Path(folder) / f"expert_{index:03d}.pt"


def write_expert(record: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write one expert's record atomically (a finished expert is safe on disk as soon as it is written)."""
    return atomic_save_torch(record, path)


def write_expert_index(
    folder: str | os.PathLike, settings: dict[str, Any], files: Sequence[Path], train_seconds: float
) -> Path:
    """Write ``experts.json``: the settings, the expert count, every file's SHA-256, the training time of this
    process and the library versions."""
    index = {
        **settings,
        "num_experts": len(files),
        "files": {p.name: sha256_file(p) for p in files},
        "train_seconds_this_process": round(train_seconds, 2),
        "versions": library_versions(),
    }
    return atomic_save_json(index, Path(folder) / EXPERTS_INDEX)


class ExpertBuffer:
    """The expert files of a folder: validated on opening, trajectories loaded on demand (a few kept in memory).

    Opening memory-maps every file to check its format, fields and shapes without reading the trajectories, and
    checks that all the experts describe one architecture, dataset and normalisation. :meth:`trajectory` then
    reads one expert fully and keeps the ``cache_size`` most recently used (100 experts of 51 epochs of a
    0.3 M-parameter ConvNet would take 6 GB).

    Args:
        expert_dir: folder written by :func:`train_experts`.
        cache_size: trajectories kept in memory.

    Attributes:
        files: the ``expert_*.pt`` files, sorted.
        meta: the settings and parameter layout of the first file (no trajectory).
        epochs: the fewest epochs of any expert (rows ``0..epochs`` exist in every trajectory).

    Raises:
        ExpertFileError: a missing or empty folder (says to run ``train_experts.yaml``), an unreadable or foreign
            file, or experts that disagree (names the file and the field).
    """

    def __init__(self, expert_dir: str | os.PathLike, cache_size: int = 4) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.dir = Path(expert_dir)
        self.files = sorted(self.dir.glob("expert_*.pt")) if self.dir.is_dir() else []
        if not self.files:
            state = "is empty" if self.dir.is_dir() else "does not exist"
            raise ExpertFileError(
                f"no expert trajectories: {self.dir} {state}; run train_experts.yaml of the bundle first "
                f"({TRAIN_EXPERTS_COMMAND}) with the same dataset, image size and matching network, or point "
                "expert_dir at the folder it wrote"
            )
        first = read_expert(self.files[0], mmap=True)
        self.meta = {k: v for k, v in first.items() if k != "trajectory"}
        epochs = [int(first["epochs"])]
        for path in self.files[1:]:
            record = read_expert(path, mmap=True)
            for key in _SAME_IN_FOLDER:
                if record.get(key) != self.meta.get(key):
                    raise ExpertFileError(
                        f"{path} differs from {self.files[0].name} in '{key}' ({record.get(key)!r} vs "
                        f"{self.meta.get(key)!r}); keep the experts of one dataset and network per folder"
                    )
            epochs.append(int(record["epochs"]))
        self.epochs = min(epochs)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.meta["param_shapes"])

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.dir)!r}, experts={len(self)}, epochs={self.epochs})"

    def trajectory(self, index: int) -> torch.Tensor:
        """Expert ``index``'s parameters per epoch, ``(its epochs + 1, num_parameters)`` float32 on the CPU.

        Raises:
            IndexError: for an index outside ``0..len(self) - 1``.
            ExpertFileError: when the file changed into an unusable one since opening.
        """
        if not 0 <= index < len(self.files):
            raise IndexError(f"expert index {index} out of range for {len(self.files)} experts in {self.dir}")
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        trajectory = read_expert(self.files[index])["trajectory"]
        if trajectory.shape[1] != self.num_parameters:
            raise ExpertFileError(f"{self.files[index]} changed since the folder was opened; reopen it")
        self._cache[index] = trajectory
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return trajectory
