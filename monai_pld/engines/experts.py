"""Expert trajectories for trajectory matching (MTT): networks trained on the real data, with their parameters
recorded after every epoch.

Each expert is trained by MONAI's ``SupervisedTrainer`` (SGD, per-sample DSA on every batch) and saved as one file,
``expert_NNN.pt``, written atomically: plain tensors and Python values, loadable with
``torch.load(weights_only=True)``. Its keys:

* the settings (:func:`expert_settings`): ``format`` (``"monai_pld.expert/1"``), ``dataset``, ``train_images``,
  ``in_channels``, ``num_classes``, ``image_size``, ``model``, ``model_kwargs``, ``epochs``, ``lr``, ``momentum``,
  ``weight_decay``, ``batch_size``, ``dsa_strategy``, ``mean``, ``std``, ``seed``;
* ``expert`` (its index), ``param_names`` and ``param_shapes`` (``named_parameters`` order), ``num_parameters``;
* ``trajectory``: ``float32`` tensor ``(epochs + 1, num_parameters)``, the initial parameters and then one row after
  every epoch, each the concatenation of the flattened parameters (the compact format: one tensor, no per-layer
  dictionaries);
* ``final_train_loss``, ``final_train_accuracy`` (last epoch, on the augmented batches), ``train_seconds``,
  ``versions``.

``experts.json`` indexes the folder (settings, file names and SHA-256). Finished experts are never retrained: a rerun
or a run after a crash trains only the missing ones. :class:`ExpertBuffer` reads a folder back for the matcher.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from monai_pld import distributed
from monai_pld.augment import DiffSiameseAugment
from monai_pld.data import ImageSet
from monai_pld.handlers.progress import format_duration
from monai_pld.networks.classifiers import get_classifier
from monai_pld.utils import (
    atomic_save_json,
    atomic_save_torch,
    derive_seed,
    library_versions,
    resolve_device,
    sha256_file,
)

__all__ = [
    "EXPERT_FORMAT",
    "ExpertBuffer",
    "ExpertFileError",
    "TrajectoryRecorder",
    "expert_settings",
    "flat_parameters",
    "read_expert",
    "train_experts",
]

EXPERT_FORMAT = "monai_pld.expert/1"
logger = logging.getLogger("monai_pld")

# derive_seed(seed, expert) initialises; a third part keeps batch order and augmentation draws apart
_ORDER_STREAM, _AUGMENT_STREAM = 1, 2
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
_RUN_HINT = "python -m monai.bundle run --config_file bundles/<set>/train_experts.yaml"


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
            f"train_experts.yaml again to retrain it ({_RUN_HINT})"
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


def flat_parameters(network: nn.Module) -> torch.Tensor:
    """The network's parameters, flattened and concatenated in ``named_parameters`` order, float32 on the CPU."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in network.parameters()])


class TrajectoryRecorder:
    """Ignite handler recording a network's flattened parameters when the run starts and after every epoch.

    Args:
        network: the network being trained.

    Attributes:
        snapshots: one ``float32`` CPU vector per record.
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network
        self.snapshots: list[torch.Tensor] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.record)

    def record(self, engine: Engine | None = None) -> None:  # noqa: ARG002 - ignite passes the engine
        self.snapshots.append(flat_parameters(self.network))

    def trajectory(self) -> torch.Tensor:
        """The records stacked, ``(records, num_parameters)``."""
        return torch.stack(self.snapshots)


class _EpochStats:
    """Ignite handler: mean loss and accuracy of the epoch's batches and a progress line per ``interval`` epochs."""

    def __init__(self, label: str, interval: int, experts_after: int) -> None:
        self.label, self.interval, self.experts_after = label, max(int(interval), 1), experts_after
        self.loss = self.correct = self.seen = 0
        self.last: dict[str, float] = {}
        self.start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch)

    def started(self, engine: Engine) -> None:  # noqa: ARG002
        self.start = time.perf_counter()

    def iteration(self, engine: Engine) -> None:
        output = engine.state.output
        n = len(output["label"])
        self.loss += float(output["loss"].detach()) * n
        self.correct += int((output["pred"].argmax(1) == output["label"]).sum())
        self.seen += n

    def epoch(self, engine: Engine) -> None:
        epoch, epochs = engine.state.epoch, engine.state.max_epochs
        self.last = {"train_loss": self.loss / max(self.seen, 1), "train_accuracy": self.correct / max(self.seen, 1)}
        self.loss = self.correct = self.seen = 0
        if not math.isfinite(self.last["train_loss"]):
            raise FloatingPointError(
                f"{self.label} diverged at epoch {epoch} (loss {self.last['train_loss']}); lower expert_lr"
            )
        if epoch % self.interval == 0 or epoch == epochs:
            rate = (time.perf_counter() - self.start) / epoch
            eta = rate * (epochs - epoch) + rate * epochs * self.experts_after
            logger.info(
                f"{self.label} epoch {epoch}/{epochs} loss {self.last['train_loss']:.4f} accuracy "
                f"{self.last['train_accuracy']:.3f} | {rate:.2f} s/epoch | ETA {format_duration(eta)}"
            )


def train_experts(
    dataset: ImageSet,
    output_dir: str | os.PathLike,
    num_experts: int = 5,
    epochs: int = 15,
    lr: float = 0.01,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    model: str = "convnet",
    model_kwargs: dict[str, Any] | None = None,
    dsa_strategy: str | None = "color_crop_cutout_flip_scale_rotate",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    log_interval: int = 1,
    tracking_uri: str | None = None,
    experiment_name: str = "monai_pld",
) -> list[Path]:
    """Train ``num_experts`` networks on ``dataset`` and save their per-epoch parameters in ``output_dir``.

    Expert ``i`` is initialised from ``derive_seed(seed, i)``, shuffled from ``derive_seed(seed, i, 1)`` and
    augmented per sample from ``derive_seed(seed, i, 2, iteration)``, so a rerun reproduces it exactly (on one
    device and library version).

    Args:
        dataset: the real training split.
        output_dir: folder for ``expert_NNN.pt`` and the index ``experts.json``.
        num_experts: networks to train.
        epochs: epochs per network (the trajectory has ``epochs + 1`` rows).
        lr, momentum, weight_decay: SGD settings (the reference: 0.01, 0, 0).
        batch_size: training batch size.
        model, model_kwargs: classifier registry name and arguments (the matching network of the bundle).
        dsa_strategy: per-sample DSA applied to every batch; ``None``/``""`` disables it.
        mean, std: per-channel normalisation; default ``dataset.normalization()`` (the channel statistics, with
            std 1 for a constant channel), which is what the matchers are given. Stored in every file; the MTT
            matcher normalises with these.
        seed: base seed of every expert's initialisation, batch order and augmentation.
        device: ``auto``, ``cpu`` or ``cuda[:i]``.
        log_interval: epochs between progress lines.
        tracking_uri: MLflow store; when given and something was trained, one run ``experts_<dataset>`` records
            the settings and every expert's final loss, accuracy and time.
        experiment_name: MLflow experiment.

    Returns:
        The expert files, in order.

    Raises:
        ExpertFileError: an existing expert file is unreadable or was trained with other settings (names it).
        FloatingPointError: an expert's loss became non-finite (lower ``lr``).
        ValueError: bad counts or learning rate.
    """
    if min(num_experts, epochs, batch_size, log_interval) < 1:
        raise ValueError(
            "'num_experts', 'expert_train_epochs', 'expert_batch_size' and 'log_interval' must be >= 1, got "
            f"{num_experts}, {epochs}, {batch_size}, {log_interval}"
        )
    if not lr > 0:
        raise ValueError(f"'expert_lr' must be > 0, got {lr}")
    if len(dataset) == 0:
        raise ValueError(f"{dataset.name or 'the dataset'} has no images to train experts on")
    dev = resolve_device(device)
    if mean is None or std is None:
        mean, std = dataset.normalization()
    settings = expert_settings(
        dataset, epochs, lr, momentum, weight_decay, batch_size, model, model_kwargs, dsa_strategy, mean, std, seed
    )
    # fail on a bad model name or argument before anything is written
    get_classifier(model, dataset.channels, dataset.num_classes, dataset.image_size, **settings["model_kwargs"])
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"expert_{i:03d}.pt" for i in range(num_experts)]
    todo = []
    for i, path in enumerate(files):
        if not path.exists():
            todo.append(i)
            continue
        record = read_expert(path, mmap=True)
        changed = {k: (record.get(k), v) for k, v in settings.items() if record.get(k) != v}
        if changed:
            raise ExpertFileError(
                f"{path} was trained with other settings {changed} (in the file, requested); delete it (or the whole "
                f"folder {out}) to retrain, or choose another expert_dir"
            )
        logger.info(f"expert {i + 1}/{num_experts}: {path.name} exists, kept")
    results: dict[int, dict[str, float]] = {}
    start_all = time.perf_counter()
    distributed.barrier()  # every rank has listed the missing experts before any rank writes one
    mine = distributed.shard(todo)  # under torchrun every rank trains its share, into the same folder
    for n_done, i in enumerate(mine):
        record = _train_one(dataset, i, settings, dev, log_interval, num_experts, len(mine) - n_done - 1)
        results[i] = {k: record[k] for k in ("final_train_loss", "final_train_accuracy", "train_seconds")}
        atomic_save_torch(record, files[i])  # each expert is safe on disk as soon as it is finished
        logger.info(f"{distributed.rank_note()}expert {i + 1}/{num_experts} saved to {files[i]}")
    if distributed.world_size() > 1:
        results = {i: r for part in distributed.gather(results) for i, r in part.items()}
        if not distributed.is_main():  # rank 0 writes the index and the MLflow run
            distributed.barrier()
            return files
    index = {
        **settings,
        "num_experts": num_experts,
        "files": {p.name: sha256_file(p) for p in files},
        "train_seconds_this_process": round(time.perf_counter() - start_all, 2),
        "versions": library_versions(),
    }
    atomic_save_json(index, out / "experts.json")
    if tracking_uri and results:
        _log_mlflow(tracking_uri, experiment_name, f"experts_{dataset.name or 'dataset'}", settings, results)
    logger.info(f"{num_experts} experts in {out} ({len(todo)} trained now)")
    distributed.barrier()
    return files


def _train_one(
    dataset: ImageSet,
    i: int,
    settings: dict[str, Any],
    dev: torch.device,
    log_interval: int,
    num_experts: int,
    experts_after: int,
) -> dict[str, Any]:
    """Train expert ``i`` with MONAI's SupervisedTrainer and return its file record."""
    seed = settings["seed"]
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(derive_seed(seed, i))
        net = get_classifier(
            settings["model"], dataset.channels, dataset.num_classes, dataset.image_size, **settings["model_kwargs"]
        )
    net = net.to(dev)
    loader = DataLoader(
        TensorDataset(dataset.images, dataset.labels),
        batch_size=settings["batch_size"],
        shuffle=True,
        generator=torch.Generator().manual_seed(derive_seed(seed, i, _ORDER_STREAM)),
    )
    augment = DiffSiameseAugment(settings["dsa_strategy"]) if settings["dsa_strategy"] else None
    mean = torch.tensor(settings["mean"], device=dev).view(1, -1, 1, 1)
    std = torch.tensor(settings["std"], device=dev).view(1, -1, 1, 1)
    batches = 0

    def prepare_batch(batch, device=None, non_blocking=False, **kwargs):  # noqa: ARG001 - MONAI's signature
        nonlocal batches
        images, labels = batch
        x = (images.to(dev, non_blocking=non_blocking).float() / 255.0 - mean) / std
        batches += 1
        if augment is not None:  # a new per-sample draw for every batch, reproducible from (seed, expert, batch)
            x = augment(x, derive_seed(seed, i, _AUGMENT_STREAM, batches))
        return x, labels.to(dev, non_blocking=non_blocking)

    recorder = TrajectoryRecorder(net)
    stats = _EpochStats(f"expert {i + 1}/{num_experts}", log_interval, experts_after)
    trainer = SupervisedTrainer(
        device=dev,
        max_epochs=settings["epochs"],
        train_data_loader=loader,
        network=net,
        optimizer=torch.optim.SGD(
            net.parameters(), lr=settings["lr"], momentum=settings["momentum"], weight_decay=settings["weight_decay"]
        ),
        loss_function=nn.CrossEntropyLoss(),
        prepare_batch=prepare_batch,
        decollate=False,
        train_handlers=[recorder, stats],
    )
    trainer.logger.setLevel(logging.WARNING)
    start = time.perf_counter()
    trainer.run()
    trajectory = recorder.trajectory()
    if not torch.isfinite(trajectory).all():
        raise FloatingPointError(f"expert {i} has non-finite parameters; lower expert_lr")
    return {
        **settings,
        "expert": i,
        "param_names": [name for name, _ in net.named_parameters()],
        "param_shapes": [list(p.shape) for p in net.parameters()],
        "num_parameters": int(trajectory.shape[1]),
        "trajectory": trajectory,
        "final_train_loss": float(stats.last["train_loss"]),
        "final_train_accuracy": float(stats.last["train_accuracy"]),
        "train_seconds": round(time.perf_counter() - start, 3),
        "versions": library_versions(),
    }


def _log_mlflow(
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    settings: dict[str, Any],
    results: dict[int, dict[str, float]],
) -> None:
    """One MLflow run with the settings as params and every expert's results as metrics stepped by its index."""
    import mlflow

    from monai_pld.utils import flatten_params, mlflow_experiment

    exp_id = mlflow_experiment(tracking_uri, experiment_name)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    run_id = client.create_run(exp_id, run_name=run_name).info.run_id
    try:
        for key, value in flatten_params(settings).items():
            client.log_param(run_id, key, value)
        for i, values in sorted(results.items()):
            for key, value in values.items():
                client.log_metric(run_id, f"expert_{key}", float(value), step=i)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)


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
                f"({_RUN_HINT}) with the same dataset, image size and matching network, or point expert_dir at the "
                "folder it wrote"
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
