"""Generator pretraining: an ``AutoencoderKL`` trained on the real training split with MONAI engines.

The loss is an L1 reconstruction term plus a KL term that keeps the latent close to unit scale, so that the
distillation learning rates work for every dataset. Training is counted in optimiser steps, with random flips and a
cosine learning-rate decay; the validation PSNR/SSIM and every setting are stored in the checkpoint.
:func:`ensure_generator` is what ``train.yaml`` calls: it loads the checkpoint for this dataset and image size when
it was made with the settings the run asks for, or pretrains (and saves) one first.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import Trainer
from monai.handlers import LrScheduleHandler, MLFlowHandler
from monai.metrics import SSIMMetric
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from monai_pld import distributed
from monai_pld.data import ImageSet, load_dataset
from monai_pld.handlers.progress import ProgressLogger
from monai_pld.networks.generators import (
    AutoencoderKLGenerator,
    GeneratorCheckpointError,
    default_autoencoder_config,
)
from monai_pld.utils import as_bool, check_generator_settings, resolve_device

AUGMENTATIONS = ("none", "flip")
# Validation PSNR (dB) below which a generator is reported as too blurry to distil through: the generators whose
# latent rows fell below random real images in docs/benchmarks.md reconstructed at 14-20 dB.
MIN_PSNR = 22.0

__all__ = [
    "GeneratorTrainer",
    "ReconstructionValidation",
    "reconstruction_metrics",
    "pretrain_generator",
    "ensure_generator",
    "pretrain_settings",
    "random_flips",
    "settings_differences",
    "warn_if_blurry",
    "GENERATOR_POLICIES",
    "MIN_PSNR",
]

logger = logging.getLogger("monai_pld")


class _Reconstruction(torch.nn.Module):
    """A generator's ``reconstruct`` as ``forward``, for DistributedDataParallel."""

    def __init__(self, generator: AutoencoderKLGenerator) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.generator.reconstruct(x, noise)


class GeneratorTrainer(Trainer):
    """One iteration = one optimiser step of the autoencoder on a batch of real images (uint8 in, float inside).

    Args:
        device: where to train.
        max_epochs: number of epochs (an epoch is ``epoch_length`` steps; validation runs at every epoch end).
        train_data_loader: yields ``(images_uint8,)`` batches of shape ``(B, C, H, W)``.
        generator: the autoencoder being trained.
        optimizer: optimiser over ``generator.parameters()``.
        kl_weight: weight of the KL term (mean over latent elements) relative to the mean L1 error.
        augment: ``none`` or ``flip``: each image is flipped left-right and/or up-down with probability 1/2 (the
            autoencoder learns to draw, not to classify, so flips cannot hurt a label and give it more to learn from).
        epoch_length: steps per epoch (``None``: one pass over the loader).
        train_handlers: ignite/MONAI handlers, attached after the engine is complete.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: DataLoader,
        generator: AutoencoderKLGenerator,
        optimizer: torch.optim.Optimizer,
        kl_weight: float = 1e-3,
        augment: str = "none",
        epoch_length: int | None = None,
        train_handlers: Sequence[Any] = (),
    ) -> None:
        if augment not in AUGMENTATIONS:
            raise ValueError(f"'augment' must be one of {list(AUGMENTATIONS)}, got {augment!r}")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            decollate=False,
        )
        self.generator = generator.to(device)
        # under torchrun: DistributedDataParallel, which copies rank 0's weights to every rank now and averages the
        # gradients in backward; it reduces what its forward computed, hence the reconstruction wrapped as forward
        self.replica: DistributedDataParallel | None = None
        if distributed.world_size() > 1:
            dev = torch.device(device)
            self.replica = DistributedDataParallel(
                _Reconstruction(self.generator), device_ids=[dev] if dev.type == "cuda" else None
            )
        self.optimizer = optimizer
        self.kl_weight = float(kl_weight)
        self.augment = augment
        self._register_handlers(list(train_handlers))

    def _iteration(self, engine: GeneratorTrainer, batchdata: Any) -> list[dict[str, float]]:
        images = batchdata[0] if isinstance(batchdata, (list, tuple)) else batchdata
        x = images.to(engine.state.device, non_blocking=True).float().div_(255.0)
        if engine.augment == "flip":
            x = random_flips(x)
        engine.generator.train()
        weight = 1.0
        if engine.replica is None:
            recon, z_mu, z_sigma = engine.generator.reconstruct(x)
        else:
            # Data parallel: every rank drew the same batch and flips (one sampler, one seed) and draws the batch's
            # latent noise alike, as one process would, then takes every world-th image. The replica's backward
            # averages the ranks' gradients; with each rank's means weighted by its share of the batch (shares
            # differ by one image when the batch does not divide), that average is the whole batch's gradient, so
            # N ranks take the steps of one process up to the order of sums.
            world = distributed.world_size()
            noise = torch.randn(len(x), *engine.generator.latent_shape, device=x.device)
            share = slice(distributed.rank(), None, world)
            weight = len(x[share]) * world / len(x)
            x = x[share]
            recon, z_mu, z_sigma = engine.replica(x, noise[share])
        recon_l1 = F.l1_loss(recon, x) * weight
        kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - 2.0 * torch.log(z_sigma) - 1.0).mean() * weight
        loss = recon_l1 + engine.kl_weight * kl
        engine.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        values = distributed.mean_over_ranks([loss.item(), recon_l1.item(), kl.item()], x.device)
        engine.optimizer.step()
        return [dict(zip(("loss", "recon_l1", "kl"), values, strict=True))]  # MONAI's decollated form


def random_flips(x: torch.Tensor) -> torch.Tensor:
    """Flip each image of ``(B, C, H, W)`` left-right and, independently, up-down with probability 1/2."""
    lr = torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5
    ud = torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5
    x = torch.where(lr, x.flip(-1), x)
    return torch.where(ud, x.flip(-2), x)


@torch.no_grad()
def reconstruction_metrics(
    generator: AutoencoderKLGenerator, images: ImageSet, batch_size: int = 512, max_images: int | None = 5000
) -> dict[str, float]:
    """Mean absolute error, mean squared error, PSNR and SSIM (MONAI's ``SSIMMetric``, images in ``[0, 1]``) of
    ``decode(encode(x))`` on up to ``max_images`` images."""
    device = next(generator.parameters()).device
    n = len(images) if max_images is None else min(len(images), max_images)
    generator.eval()
    ssim = SSIMMetric(spatial_dims=2, data_range=1.0, win_size=min(7, images.image_size), reduction="mean")
    abs_err = sq_err = ssim_sum = 0.0
    for start in range(0, n, batch_size):
        x = images.float_images(slice(start, min(start + batch_size, n))).to(device)
        recon = generator.decode(generator.encode(x))
        abs_err += (recon - x).abs().sum().item()
        sq_err += (recon - x).pow(2).sum().item()
        # summed here, not by ssim.aggregate(), which under torchrun gathers every rank's buffer: a collective that
        # only rank 0 would enter
        ssim_sum += ssim(recon, x).sum().item()
    count = n * images.channels * images.image_size**2
    mse = sq_err / count
    return {
        "mae": abs_err / count,
        "mse": mse,
        "psnr": float(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12)))),
        "ssim": ssim_sum / n,
    }


class ReconstructionValidation:
    """At every epoch end, put ``val_mae``, ``val_mse``, ``val_psnr`` and ``val_ssim`` of the validation split into
    ``engine.state.metrics`` (where MONAI's ``MLFlowHandler`` picks them up) and log a progress line."""

    def __init__(self, val: ImageSet, max_images: int | None = 5000) -> None:
        self.val = val
        self.max_images = max_images

    def attach(self, engine: GeneratorTrainer) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: GeneratorTrainer) -> None:
        metrics = reconstruction_metrics(engine.generator, self.val, max_images=self.max_images)
        engine.state.metrics.update({f"val_{k}": v for k, v in metrics.items()})
        logger.info(
            f"generator step {engine.state.iteration}: val PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f}"
        )


def pretrain_settings(
    dataset_flag: str,
    image_size: int,
    in_channels: int,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 2e-3,
    kl_weight: float = 1e-3,
    augment: str = "flip",
    max_train_images: int | None = None,
    seed: int = 0,
    network: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every setting that decides what a pretrained generator is: what a checkpoint records and what
    :func:`ensure_generator` compares against a run's request. ``network`` holds
    :func:`default_autoencoder_config` arguments (``downsamplings``, ``latent_channels``, ``width``) or full
    ``AutoencoderKLGenerator`` overrides (``channels``...)."""
    network = dict(network or {})
    arch_args = {k: network.pop(k) for k in ("downsamplings", "latent_channels", "width") if k in network}
    config = {**default_autoencoder_config(int(image_size), int(in_channels), **arch_args), **network}
    return {
        "dataset_flag": str(dataset_flag),
        "image_size": int(image_size),
        "steps": int(steps),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "kl_weight": float(kl_weight),
        "augment": str(augment),
        "max_train_images": None if max_train_images is None else int(max_train_images),
        "seed": int(seed),
        "network": config,
    }


def pretrain_generator(
    generator_path: str | os.PathLike,
    dataset_flag: str = "pathmnist",
    dataset_dir: str | None = None,
    image_size: int = 28,
    download: bool | str = True,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 2e-3,
    kl_weight: float = 1e-3,
    augment: str = "flip",
    max_train_images: int | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    log_interval: int = 100,
    val_interval: int = 500,
    min_psnr: float = MIN_PSNR,
    tracking_uri: str | None = None,
    experiment_name: str = "monai_pld",
    run_name: str | None = None,
    network: dict[str, Any] | None = None,
    data_options: dict[str, Any] | None = None,
) -> AutoencoderKLGenerator:
    """Train the default generator on a training split and save it atomically to ``generator_path``.

    Training is counted in optimiser steps (a small archive gets as many steps as a large one), with Adam, a cosine
    learning-rate decay to zero and random flips; the validation split's PSNR and SSIM are measured every
    ``val_interval`` steps and recorded in the checkpoint with every setting (:func:`pretrain_settings`).

    Args:
        generator_path: checkpoint file to write.
        dataset_flag, dataset_dir, image_size, download: which data to read (see :func:`monai_pld.data.load_dataset`).
        steps: optimiser steps.
        batch_size, lr: Adam settings (``lr`` decays to 0 along a cosine).
        kl_weight: weight of the KL term.
        augment: ``flip`` (random left-right and up-down flips) or ``none``.
        max_train_images: optional cap on training images (evenly spaced), for quick runs.
        seed: seeds initialisation, shuffling and augmentation.
        device: ``auto``, ``cpu`` or ``cuda[:i]``.
        log_interval: steps between progress lines.
        val_interval: steps between validation measurements.
        min_psnr: validation PSNR (dB) below which the generator is reported as too blurry to distil through.
        tracking_uri: MLflow tracking URI; ``None`` logs nothing to MLflow.
        experiment_name, run_name: MLflow names (run name defaults to ``pretrain_<flag>_<size>px``).
        network: architecture choices, see :func:`pretrain_settings`.
        data_options: further :func:`monai_pld.data.load_dataset` options (a site's own data).

    Returns:
        the trained generator, frozen.
    """
    dev = resolve_device(device)
    data_options = dict(data_options or {})
    train = load_dataset(
        dataset_flag,
        "train",
        dataset_dir,
        image_size=image_size,
        download=as_bool(download, "download"),
        **data_options,
    )
    val = load_dataset(dataset_flag, "val", dataset_dir, image_size=image_size, download=False, **data_options)
    train_images = train.images
    if max_train_images is not None and len(train_images) > max_train_images:
        train_images = train_images[torch.linspace(0, len(train_images) - 1, int(max_train_images)).long()]
    check_generator_settings(
        {"steps": steps, "batch_size": batch_size, "lr": lr, "kl_weight": kl_weight, "augment": augment}
    )
    settings = pretrain_settings(
        dataset_flag,
        image_size,
        train.channels,
        steps,
        batch_size,
        lr,
        kl_weight,
        augment,
        max_train_images,
        seed,
        network,
    )
    epoch_length = min(int(val_interval), int(steps))
    epochs_run = math.ceil(int(steps) / epoch_length)
    total_steps = epochs_run * epoch_length

    torch.manual_seed(seed)
    generator = AutoencoderKLGenerator(**settings["network"]).to(dev)
    batch = min(int(batch_size), len(train_images))
    loader = _step_loader(train_images, batch, total_steps, seed)
    optimizer = torch.optim.Adam(generator.parameters(), lr=lr)
    params = {
        **{f"generator_{k}": v for k, v in settings.items() if k != "network"},
        "train_images": len(train_images),
        **{f"network_{k}": str(v) for k, v in settings["network"].items()},
    }
    handlers = _pretrain_handlers(
        optimizer,
        total_steps,
        val,
        log_interval,
        tracking_uri,
        experiment_name,
        run_name or f"pretrain_{dataset_flag}_{image_size}px",
        params,
    )
    trainer = GeneratorTrainer(
        device=dev,
        max_epochs=epochs_run,
        train_data_loader=loader,
        generator=generator,
        optimizer=optimizer,
        kl_weight=kl_weight,
        augment=augment,
        epoch_length=epoch_length,
        train_handlers=handlers,
    )
    logger.info(
        f"pretraining the {dataset_flag} {image_size}px generator: {len(train_images)} images, {total_steps} steps "
        f"of {batch}, latent {generator.latent_shape}, device {dev}"
        + (f", {distributed.world_size()} ranks" if distributed.world_size() > 1 else "")
    )
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)  # the flips are drawn from the global RNG: seed them, leave the caller's RNG alone
        start = time.perf_counter()
        trainer.run()
        seconds = time.perf_counter() - start
    if not distributed.is_main():  # rank 0 writes the checkpoint; the others read it when it is there
        distributed.barrier()
        return AutoencoderKLGenerator.load(generator_path, map_location=dev)
    metrics = dict(trainer.state.metrics)
    logger.info(
        f"generator trained in {seconds:.0f}s; val MAE {metrics['val_mae']:.4f}, PSNR {metrics['val_psnr']:.2f} dB, "
        f"SSIM {metrics['val_ssim']:.3f}"
    )
    warn_if_blurry(metrics["val_psnr"], min_psnr, len(train_images), str(generator_path))
    generator.save(
        generator_path,
        settings=settings,
        dataset=dataset_flag,
        image_size=int(image_size),
        steps=total_steps,
        train_images=len(train_images),
        train_seconds=seconds,
        seed=int(seed),
        device=str(dev),
        **metrics,
    )
    logger.info(f"generator saved to {generator_path}")
    distributed.barrier()
    return AutoencoderKLGenerator.load(generator_path, map_location=dev)


def _step_loader(images: torch.Tensor, batch: int, steps: int, seed: int) -> DataLoader:
    """Permutation after permutation of ``images``, as many batches of ``batch`` as there are ``steps``."""
    sampler = RandomSampler(images, num_samples=steps * batch, generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(images), batch_size=batch, sampler=sampler, drop_last=True)


def _pretrain_handlers(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    val: Any,
    log_interval: int,
    tracking_uri: str | None,
    experiment_name: str,
    run_name: str,
    params: dict[str, Any],
) -> list[Any]:
    """Cosine learning-rate decay on every rank; validation, progress lines and MLflow on rank 0 alone."""
    handlers: list[Any] = [
        LrScheduleHandler(
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps), epoch_level=False, print_lr=False
        ),
    ]
    if not distributed.is_main():
        return handlers
    handlers += [
        ReconstructionValidation(val),  # before the MLflow handler below, which logs its metrics at the same epoch
        ProgressLogger(interval=log_interval, prefix="generator"),
    ]
    if tracking_uri:
        handlers.append(
            MLFlowHandler(
                tracking_uri=tracking_uri,
                experiment_name=experiment_name,
                run_name=run_name,
                experiment_param=params,
                output_transform=lambda out: out[0],
                iteration_log=lambda engine, it: it % log_interval == 0,
                close_on_complete=True,
            )
        )
    return handlers


def warn_if_blurry(psnr: float, min_psnr: float, train_images: int, path: str) -> bool:
    """Log a warning when a generator's validation PSNR is below ``min_psnr``; returns whether it did."""
    if psnr >= min_psnr:
        return False
    logger.warning(
        f"the generator {path} reconstructs the validation images at {psnr:.1f} dB PSNR, below the quality floor "
        f"of {min_psnr:.0f} dB ({train_images} training images): latent rows distilled through it start from "
        "blurred images and may end below random real images. Pretrain longer (--generator_steps), use a generator "
        "trained on a larger set of the same modality and size (--generator_path ... --generator_policy any), or "
        "distil in pixel space (--parameterization pixel); see docs/configuration.md, 'Generator'."
    )
    return True


GENERATOR_POLICIES = ("match", "retrain", "any")


def ensure_generator(
    generator_path: str | os.PathLike,
    device: str | torch.device = "auto",
    policy: str = "match",
    in_channels: int | None = None,
    **pretrain_kwargs: Any,
) -> AutoencoderKLGenerator:
    """Load the generator at ``generator_path``, pretraining and saving it first when the file does not exist.

    Args:
        generator_path: the checkpoint.
        device: where to put it.
        policy: what to do with an existing file made with other settings than ``pretrain_kwargs`` ask for:
            ``match`` (stop with an error naming the keys that differ), ``retrain`` (pretrain anew and replace it)
            or ``any`` (use it as it is: a generator trained on another, larger set of the same modality and size).
        in_channels: image channels of the data, to compare the architecture (``None``: the checkpoint's).
        pretrain_kwargs: :func:`pretrain_generator` arguments.

    Raises:
        GeneratorCheckpointError: when the file exists but is unusable, or differs under ``policy="match"``
            (the message names the file, the keys and the fix).
    """
    if policy not in GENERATOR_POLICIES:
        raise ValueError(f"'generator_policy' must be one of {list(GENERATOR_POLICIES)}, got {policy!r}")
    dev = resolve_device(device)
    distributed.barrier()  # under torchrun every rank sees the file as it is now, and all make the same choice
    if os.path.isfile(generator_path):
        generator = AutoencoderKLGenerator.load(generator_path, map_location=dev)
        differences = settings_differences(generator, pretrain_kwargs, in_channels)
        if differences and policy == "match":
            raise GeneratorCheckpointError(
                f"generator {generator_path} was pretrained with other settings than this run asks for: "
                f"{'; '.join(differences)}. Use --generator_policy retrain to pretrain it anew with this run's "
                "settings, --generator_policy any to use the file as it is, or point --generator_path elsewhere"
            )
        if differences and policy == "retrain":
            logger.info(f"generator {generator_path} differs ({'; '.join(differences)}): pretraining it anew")
            return pretrain_generator(generator_path, device=dev, **pretrain_kwargs)
        logger.info(f"using generator {generator_path} (sha256 {generator.checkpoint_sha256[:12]})")
        return generator
    logger.info(f"no generator checkpoint at {generator_path}: pretraining one first")
    return pretrain_generator(generator_path, device=dev, **pretrain_kwargs)


def settings_differences(
    generator: AutoencoderKLGenerator, pretrain_kwargs: dict[str, Any], in_channels: int | None = None
) -> list[str]:
    """``key: stored -> requested`` for every pretraining setting that ``pretrain_kwargs`` asks for differently
    from what made ``generator`` (keys not given in ``pretrain_kwargs`` take :func:`pretrain_generator`'s defaults)."""
    stored = generator.metadata.get("settings")
    if not isinstance(stored, dict):
        return ["the checkpoint records no pretraining settings (made by an older monai_pld)"]
    defaults = inspect.signature(pretrain_generator).parameters
    args = {
        k: pretrain_kwargs.get(k, defaults[k].default)
        for k in inspect.signature(pretrain_settings).parameters
        if k not in ("in_channels", "image_size") and k in defaults
    }
    args["image_size"] = pretrain_kwargs.get("image_size", stored.get("image_size"))
    channels = in_channels if in_channels is not None else generator.config["in_channels"]
    requested = pretrain_settings(in_channels=channels, **args)
    differences = []
    for key, value in requested.items():
        if key == "network":
            for k, v in value.items():
                if stored.get("network", {}).get(k) != v:
                    differences.append(f"network.{k}: {stored.get('network', {}).get(k)} -> {v}")
        elif stored.get(key) != value:
            differences.append(f"generator_{key}: {stored.get(key)} -> {value}")
    return differences
