"""Expert trajectories for trajectory matching (MTT): networks trained on the real data, with their parameters
recorded after every epoch.

Each expert is trained by MONAI's ``SupervisedTrainer`` (SGD, per-sample DSA on every batch) and saved as one file,
``expert_NNN.pt``: plain tensors and Python values, loadable with ``torch.load(weights_only=True)``, holding the
trajectory as one ``float32`` tensor ``(epochs + 1, num_parameters)`` (the initial parameters, then one row per
epoch). Finished experts are never retrained: an interrupted run continues with the next missing one.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from torch.utils.data import DataLoader, TensorDataset

from monai_pld.augment import DiffSiameseAugment
from monai_pld.data import ImageSet
from monai_pld.handlers.progress import format_duration
from monai_pld.networks.classifiers import get_classifier
from monai_pld.utils import atomic_save_json, atomic_save_torch, derive_seed, resolve_device, sha256_file

__all__ = ["EXPERT_FORMAT", "ExpertBuffer", "ExpertFileError", "train_experts"]

EXPERT_FORMAT = "monai_pld.expert/1"
logger = logging.getLogger("monai_pld")


class ExpertFileError(ValueError):
    """An expert file is missing, unreadable or does not fit; the message names the file and the fix."""


def _settings(
    dataset: ImageSet, epochs, lr, momentum, weight_decay, batch_size, model, model_kwargs, dsa, mean, std, seed
) -> dict[str, Any]:
    return {
        "format": EXPERT_FORMAT,
        "dataset": dataset.name,
        "train_images": len(dataset),
        "in_channels": dataset.channels,
        "num_classes": dataset.num_classes,
        "image_size": dataset.image_size,
        "model": model,
        "model_kwargs": dict(model_kwargs or {}),
        "epochs": int(epochs),
        "lr": float(lr),
        "momentum": float(momentum),
        "weight_decay": float(weight_decay),
        "batch_size": int(batch_size),
        "dsa_strategy": dsa or "",
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "seed": int(seed),
    }


def _read_expert(path: Path) -> dict[str, Any]:
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...: all mean "not a usable expert file"
        raise ExpertFileError(
            f"{path} cannot be read as an expert trajectory ({type(e).__name__}); delete it and run "
            "train_experts.yaml again to retrain it"
        ) from e
    if not isinstance(record, dict) or record.get("format") != EXPERT_FORMAT or "trajectory" not in record:
        raise ExpertFileError(f"{path} is not a {EXPERT_FORMAT} expert file; delete it or point expert_dir elsewhere")
    trajectory = record["trajectory"]
    count = sum(int(torch.Size(s).numel()) for s in record["param_shapes"])
    if trajectory.ndim != 2 or trajectory.shape[1] != count or trajectory.shape[0] != record["epochs"] + 1:
        raise ExpertFileError(
            f"{path}: trajectory has shape {tuple(trajectory.shape)}, expected ({record['epochs'] + 1}, {count}); "
            "delete the file and retrain it"
        )
    return record


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
    mean: list[float] | None = None,
    std: list[float] | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    log_interval: int = 1,
    tracking_uri: str | None = None,
    experiment_name: str = "monai_pld",
) -> list[Path]:
    """Train ``num_experts`` networks on ``dataset`` and save their per-epoch parameters in ``output_dir``.

    Args:
        dataset: the real training split.
        output_dir: folder for ``expert_NNN.pt`` and the index ``experts.json``.
        num_experts: networks to train.
        epochs: epochs per network (the trajectory has ``epochs + 1`` rows).
        lr, momentum, weight_decay: SGD settings (the reference: 0.01, 0, 0).
        batch_size: training batch size.
        model, model_kwargs: classifier registry name and arguments (the matching network of the bundle).
        dsa_strategy: per-sample DSA applied to every batch; ``None``/``""`` disables it.
        mean, std: per-channel normalisation (default: ``dataset.normalization()``, as the matchers use).
        seed: seeds every expert's initialisation, batch order and augmentation.
        device: ``auto``, ``cpu`` or ``cuda[:i]``.
        log_interval: epochs between progress lines.
        tracking_uri: MLflow store; when given, one run ``experts_<dataset>`` records the settings and per-expert
            final loss and accuracy.
        experiment_name: MLflow experiment.

    Returns:
        The expert files, in order.

    Raises:
        ExpertFileError: an existing expert file is unreadable or was trained with other settings (names it).
        ValueError: bad counts.
    """
    if num_experts < 1 or epochs < 1 or batch_size < 1:
        raise ValueError(
            f"'num_experts', 'expert_train_epochs' and 'expert_batch_size' must be >= 1, got {num_experts}, {epochs}, "
            f"{batch_size}"
        )
    dev = resolve_device(device)
    if mean is None or std is None:
        mean, std = dataset.normalization()
    settings = _settings(
        dataset, epochs, lr, momentum, weight_decay, batch_size, model, model_kwargs, dsa_strategy, mean, std, seed
    )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    augment = DiffSiameseAugment(dsa_strategy) if dsa_strategy else None
    mean_t = torch.tensor(settings["mean"], device=dev).view(1, -1, 1, 1)
    std_t = torch.tensor(settings["std"], device=dev).view(1, -1, 1, 1)
    files = [out / f"expert_{i:03d}.pt" for i in range(num_experts)]
    results: dict[int, dict[str, float]] = {}
    todo = []
    for i, path in enumerate(files):
        if path.exists():
            record = _read_expert(path)
            changed = {k: (record.get(k), v) for k, v in settings.items() if record.get(k) != v}
            if changed:
                raise ExpertFileError(
                    f"{path} was trained with other settings {changed} (existing, requested); delete the folder "
                    "or choose another expert_dir"
                )
            logger.info(f"expert {i + 1}/{num_experts}: {path.name} exists, kept")
        else:
            todo.append(i)
    start_all = time.perf_counter()
    for n_done, i in enumerate(todo):
        names, shapes, snapshots, results[i] = _train_one(
            dataset, i, settings, augment, mean_t, std_t, dev, log_interval, num_experts, len(todo) - n_done - 1
        )
        atomic_save_torch(
            {
                **settings,
                "expert": i,
                "param_names": names,
                "param_shapes": shapes,
                "trajectory": torch.stack(snapshots).float(),
                "final_train_accuracy": results[i]["train_accuracy"],
            },
            files[i],
        )
    index = {
        **settings,
        "num_experts": num_experts,
        "files": {p.name: sha256_file(p) for p in files},
        "train_seconds_this_process": round(time.perf_counter() - start_all, 2),
    }
    atomic_save_json(index, out / "experts.json")
    if tracking_uri and results:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name)
        exp_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
        run = client.create_run(exp_id, run_name=f"experts_{dataset.name or 'dataset'}")
        for key, value in settings.items():
            client.log_param(run.info.run_id, key, str(value))
        for i, values in sorted(results.items()):
            for key, value in values.items():
                client.log_metric(run.info.run_id, f"expert_{key}", value, step=i)
        client.set_terminated(run.info.run_id)
    logger.info(f"{num_experts} experts in {out}")
    return files


def _train_one(
    dataset: ImageSet,
    i: int,
    settings: dict[str, Any],
    augment: DiffSiameseAugment | None,
    mean_t: torch.Tensor,
    std_t: torch.Tensor,
    dev: torch.device,
    log_interval: int,
    num_experts: int,
    experts_after: int,
) -> tuple[list[str], list[list[int]], list[torch.Tensor], dict[str, float]]:
    """Train expert ``i`` with MONAI's SupervisedTrainer; returns parameter names, shapes, per-epoch snapshots and
    the last epoch's loss and accuracy."""
    seed, epochs = settings["seed"], settings["epochs"]
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(derive_seed(seed, i))
        net = get_classifier(
            settings["model"], dataset.channels, dataset.num_classes, dataset.image_size, **settings["model_kwargs"]
        )
    net = net.to(dev)
    names = [n for n, _ in net.named_parameters()]
    shapes = [list(p.shape) for _, p in net.named_parameters()]
    snapshots = [torch.cat([p.detach().reshape(-1).cpu() for p in net.parameters()])]
    loader = DataLoader(
        TensorDataset(dataset.images, dataset.labels),
        batch_size=settings["batch_size"],
        shuffle=True,
        generator=torch.Generator().manual_seed(derive_seed(seed, i, 1)),
    )
    counter = {"batches": 0}
    stats = {"loss": 0.0, "correct": 0, "seen": 0}
    result: dict[str, float] = {}

    def prepare_batch(batch, device=None, non_blocking=False, **kwargs):  # noqa: ARG001 - MONAI's signature
        images, labels = batch
        x = (images.to(dev).float() / 255.0 - mean_t) / std_t
        counter["batches"] += 1
        if augment is not None:  # a new per-sample draw for every batch, reproducible from (seed, expert, batch)
            x = augment(x, derive_seed(seed, i, 2, counter["batches"]))
        return x, labels.to(dev)

    trainer = SupervisedTrainer(
        device=dev,
        max_epochs=int(epochs),
        train_data_loader=loader,
        network=net,
        optimizer=torch.optim.SGD(
            net.parameters(), lr=settings["lr"], momentum=settings["momentum"], weight_decay=settings["weight_decay"]
        ),
        loss_function=torch.nn.CrossEntropyLoss(),
        prepare_batch=prepare_batch,
        decollate=False,
    )
    trainer.logger.setLevel(logging.WARNING)
    start = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _accumulate(engine):
        output = engine.state.output
        stats["loss"] += float(output["loss"].detach()) * len(output["label"])
        stats["correct"] += int((output["pred"].argmax(1) == output["label"]).sum())
        stats["seen"] += len(output["label"])

    @trainer.on(Events.EPOCH_COMPLETED)
    def _snapshot(engine):
        snapshots.append(torch.cat([p.detach().reshape(-1).cpu() for p in net.parameters()]))
        epoch = engine.state.epoch
        result.update(
            loss=stats["loss"] / max(stats["seen"], 1), train_accuracy=stats["correct"] / max(stats["seen"], 1)
        )
        if epoch % log_interval == 0 or epoch == epochs:
            rate = (time.perf_counter() - start) / epoch
            left = rate * (epochs - epoch) + rate * epochs * experts_after
            logger.info(
                f"expert {i + 1}/{num_experts} epoch {epoch}/{epochs} loss {result['loss']:.4f} accuracy "
                f"{result['train_accuracy']:.3f} | {rate:.2f} s/epoch | ETA {format_duration(left)}"
            )
        stats.update(loss=0.0, correct=0, seen=0)

    trainer.run()
    return names, shapes, snapshots, result


class ExpertBuffer:
    """The expert files of a folder: validated on opening, trajectories loaded on demand (a few kept in memory).

    Args:
        expert_dir: folder written by :func:`train_experts`.
        cache_size: trajectories kept in memory (100 experts of a 128-px ConvNet would not fit).

    Raises:
        ExpertFileError: a missing or empty folder (says to run ``train_experts.yaml``) or a bad file (names it).
    """

    def __init__(self, expert_dir: str | os.PathLike, cache_size: int = 4) -> None:
        self.dir = Path(expert_dir)
        self.files = sorted(self.dir.glob("expert_*.pt")) if self.dir.is_dir() else []
        if not self.files:
            raise ExpertFileError(
                f"no expert trajectories in {self.dir}; run train_experts.yaml of the bundle first "
                "(python -m monai.bundle run --config_file bundles/<set>/train_experts.yaml), or point expert_dir "
                "at the folder it wrote"
            )
        first = _read_expert(self.files[0])
        self.meta = {k: v for k, v in first.items() if k != "trajectory"}
        self.epochs = (
            min(int(first["epochs"]), *(self._epochs(p) for p in self.files[1:]))
            if len(self.files) > 1
            else int(first["epochs"])
        )
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict({0: first["trajectory"]})

    def _epochs(self, path: Path) -> int:
        record = _read_expert(path)
        for key in ("model", "model_kwargs", "in_channels", "num_classes", "image_size", "param_shapes"):
            if record[key] != self.meta[key]:
                raise ExpertFileError(f"{path} differs from {self.files[0].name} in {key}; keep one kind per folder")
        return int(record["epochs"])

    def __len__(self) -> int:
        return len(self.files)

    def trajectory(self, index: int) -> torch.Tensor:
        """Expert ``index``'s parameters per epoch, ``(epochs + 1, num_parameters)`` float32 on the CPU."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        trajectory = _read_expert(self.files[index])["trajectory"]
        self._cache[index] = trajectory
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return trajectory
