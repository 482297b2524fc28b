"""Expert trajectories for trajectory matching (MTT): networks trained on the real data, with their parameters
recorded after every epoch.

Each expert is trained by MONAI's ``SupervisedTrainer`` (SGD, per-sample DSA on every batch) and saved as one file,
``expert_NNN.pt``, written atomically in the format of :mod:`monai_pld.formats.experts` (which also reads a folder
back for the matcher). Finished experts are never retrained: a rerun or a run after a crash trains only the missing
ones.
"""

from __future__ import annotations

import logging
import math
import os
import time
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
from monai_pld.formats.experts import (
    EXPERT_FORMAT,
    ExpertBuffer,
    ExpertFileError,
    expert_file,
    expert_settings,
    read_expert,
    write_expert,
    write_expert_index,
)
from monai_pld.networks.classifiers import get_classifier
from monai_pld.utils import (
    derive_seed,
    format_duration,
    library_versions,
    mlflow_run,
    resolve_device,
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

logger = logging.getLogger("monai_pld")

# derive_seed(seed, expert) initialises; a third part keeps batch order and augmentation draws apart
_ORDER_STREAM, _AUGMENT_STREAM = 1, 2


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
    files = [expert_file(out, i) for i in range(num_experts)]
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
        write_expert(record, files[i])  # each expert is safe on disk as soon as it is finished
        logger.info(f"{distributed.rank_note()}expert {i + 1}/{num_experts} saved to {files[i]}")
    if distributed.world_size() > 1:
        results = {i: r for part in distributed.gather(results) for i, r in part.items()}
        if not distributed.is_main():  # rank 0 writes the index and the MLflow run
            distributed.barrier()
            return files
    write_expert_index(out, settings, files, time.perf_counter() - start_all)
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
    with mlflow_run(tracking_uri, experiment_name, run_name, settings) as (client, run_id):
        for i, values in sorted(results.items()):
            for key, value in values.items():
                client.log_metric(run_id, f"expert_{key}", float(value), step=i)
