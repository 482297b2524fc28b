"""Train a classifier from scratch on an image set with MONAI's ``SupervisedTrainer`` (per-sample DSA, SGD with
momentum) and test it on the real test split with MONAI's ``SupervisedEvaluator``."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from torch.utils.data import DataLoader, TensorDataset

from monai_pld.augment import DiffSiameseAugment
from monai_pld.data import ImageSet, ImageSource
from monai_pld.networks.classifiers import get_classifier
from monai_pld.utils import derive_seed, resolve_device

from .metrics import classification_metrics

__all__ = ["DC_LR", "GLAD_DEFAULT_LR", "GLAD_LR", "PROTOCOLS", "train_and_test", "train_classifier"]

PROTOCOLS = ("dc", "glad")
# per-architecture learning rates of the GLaD-style protocol (VGG-11 trains at a tenth of the others)
GLAD_LR = {"vgg11": 1e-4}
GLAD_DEFAULT_LR = 1e-3
DC_LR = 0.01


def _lr_lambda(protocol: str, epochs: int) -> Callable[[int], float]:
    if protocol == "dc":  # x0.1 from half-way, as the reference
        return lambda epoch: 1.0 if epoch < epochs // 2 else 0.1
    warm = max(epochs // 2, 1)

    def glad(epoch: int) -> float:  # linear warm-up over half the epochs, then cosine over the other half
        if epoch < warm:
            return 1e-7 + (1 - 1e-7) * epoch / warm
        return 0.5 * (1 + math.cos(math.pi * (epoch - warm) / max(epochs - warm, 1)))

    return glad


def train_classifier(
    backbone: str,
    source: ImageSource,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    protocol: str = "dc",
    epochs: int = 300,
    batch_size: int = 256,
    lr: float | None = None,
    dsa_strategy: str | None = "color_crop_cutout_flip_scale_rotate",
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train ``backbone`` from scratch on ``source`` with MONAI's ``SupervisedTrainer``.

    Protocols: ``dc`` (SGD momentum 0.9, weight decay 5e-4, lr 0.01, x0.1 at half) and ``glad`` (same optimiser,
    lr 1e-3 (VGG-11 1e-4), linear warm-up over half the epochs then cosine, weights averaged by an EMA of decay
    0.995 updated every epoch, the EMA model returned). Both train with per-sample DSA.

    Returns:
        the trained network (in eval mode, on ``device``; inputs normalised with ``mean``/``std``) and
        ``{"train_seconds", "lr", "epochs"}``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"'protocol' must be one of {list(PROTOCOLS)}, got {protocol!r}")
    dev = resolve_device(device)
    channels, size = int(source.images.shape[1]), int(source.images.shape[-1])
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(derive_seed(seed, 0))
        net = get_classifier(backbone, channels, num_classes, size)
    net = net.to(dev)
    lr = lr if lr is not None else (DC_LR if protocol == "dc" else GLAD_LR.get(backbone, GLAD_DEFAULT_LR))
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(protocol, epochs))
    augment = DiffSiameseAugment(dsa_strategy) if dsa_strategy else None
    mean_t = torch.tensor(list(mean), device=dev).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), device=dev).view(1, -1, 1, 1)
    counter = {"batches": 0}

    def prepare_batch(batch, device=None, non_blocking=False, **kwargs):  # noqa: ARG001 - MONAI's signature
        images, labels = batch
        x = (images.to(dev) - mean_t) / std_t
        counter["batches"] += 1
        if augment is not None:
            x = augment(x, derive_seed(seed, 1, counter["batches"]))
        return x, labels.to(dev)

    def loader_for(epoch: int) -> DataLoader:
        images, labels = source.epoch(epoch)
        return DataLoader(
            TensorDataset(images, labels),
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(derive_seed(seed, 2, epoch)),
        )

    trainer = SupervisedTrainer(
        device=dev,
        max_epochs=int(epochs),
        train_data_loader=loader_for(0),
        network=net,
        optimizer=optimizer,
        loss_function=torch.nn.CrossEntropyLoss(),
        prepare_batch=prepare_batch,
        decollate=False,
    )
    trainer.logger.setLevel(logging.WARNING)
    ema = None
    if protocol == "glad":
        ema = torch.optim.swa_utils.AveragedModel(net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.995))

    @trainer.on(Events.EPOCH_COMPLETED)
    def _epoch_end(engine):
        scheduler.step()
        if ema is not None:
            ema.update_parameters(net)
        if source.resample is not None and engine.state.epoch < engine.state.max_epochs:
            engine.set_data(loader_for(engine.state.epoch))

    start = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - start
    trained = ema.module if ema is not None else net
    return trained.eval(), {"train_seconds": round(seconds, 3), "lr": lr, "epochs": int(epochs)}


def train_and_test(
    backbone: str,
    source: ImageSource,
    test: ImageSet,
    mean: Sequence[float],
    std: Sequence[float],
    **settings: Any,
) -> dict[str, Any]:
    """Train ``backbone`` from scratch on ``source`` and test it on ``test``.

    Args:
        backbone, source, mean, std: see :func:`train_classifier`.
        test: the real test split (also gives the class count).
        settings: :func:`train_classifier`'s keyword arguments (``protocol``, ``epochs``, ``batch_size``, ``lr``,
            ``dsa_strategy``, ``seed``, ``device``).

    Returns:
        ``accuracy``, ``auc``, ``f1``, ``per_class_accuracy``, ``train_seconds``, ``lr``, ``epochs``.
    """
    net, record = train_classifier(backbone, source, test.num_classes, mean, std, **settings)
    dev = next(net.parameters()).device
    mean_t = torch.tensor(list(mean), device=dev).view(1, -1, 1, 1)
    std_t = torch.tensor(list(std), device=dev).view(1, -1, 1, 1)
    return {**_test(net, test, mean_t, std_t, dev), **record}


def _test(net: torch.nn.Module, test: ImageSet, mean_t: torch.Tensor, std_t: torch.Tensor, dev) -> dict[str, Any]:
    probabilities: list[torch.Tensor] = []

    def prepare(batch, device=None, non_blocking=False, **kwargs):  # noqa: ARG001 - MONAI's signature
        images, labels = batch
        return (images.to(dev).float() / 255.0 - mean_t) / std_t, labels.to(dev)

    evaluator = SupervisedEvaluator(
        device=dev,
        val_data_loader=DataLoader(TensorDataset(test.images, test.labels), batch_size=256),
        network=net,
        prepare_batch=prepare,
        decollate=False,
    )
    evaluator.logger.setLevel(logging.WARNING)
    evaluator.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda engine: probabilities.append(torch.softmax(engine.state.output["pred"].float(), 1).cpu()),
    )
    evaluator.run()
    return classification_metrics(torch.cat(probabilities).numpy(), test.labels.numpy(), test.num_classes)
