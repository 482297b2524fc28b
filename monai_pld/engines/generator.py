"""Generator pretraining: an ``AutoencoderKL`` trained on the real training split with MONAI engines.

The loss is an L1 reconstruction term plus a KL term that keeps the latent close to unit scale, so that the
distillation learning rates work for every dataset. :func:`ensure_generator` is what ``train.yaml`` calls: it loads
the checkpoint for this dataset and image size, or pretrains (and saves) one first.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import Trainer
from torch.utils.data import DataLoader, TensorDataset

from monai_pld.data import ImageSet
from monai_pld.handlers.progress import ProgressLogger
from monai_pld.networks.generators import (
    AutoencoderKLGenerator,
    default_autoencoder_config,
)
from monai_pld.utils import as_bool, resolve_device

__all__ = [
    "GeneratorTrainer",
    "ReconstructionValidation",
    "reconstruction_metrics",
    "pretrain_generator",
    "ensure_generator",
]

logger = logging.getLogger("monai_pld")


class GeneratorTrainer(Trainer):
    """One iteration = one optimiser step of the autoencoder on a batch of real images (uint8 in, float inside).

    Args:
        device: where to train.
        max_epochs: passes over the training images.
        train_data_loader: yields ``(images_uint8,)`` batches of shape ``(B, C, H, W)``.
        generator: the autoencoder being trained.
        optimizer: optimiser over ``generator.parameters()``.
        kl_weight: weight of the KL term (mean over latent elements) relative to the mean L1 error.
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
        train_handlers: Sequence[Any] = (),
    ) -> None:
        super().__init__(device=device, max_epochs=max_epochs, data_loader=train_data_loader, decollate=False)
        self.generator = generator.to(device)
        self.optimizer = optimizer
        self.kl_weight = float(kl_weight)
        self._register_handlers(list(train_handlers))

    def _iteration(self, engine: GeneratorTrainer, batchdata: Any) -> list[dict[str, float]]:
        images = batchdata[0] if isinstance(batchdata, (list, tuple)) else batchdata
        x = images.to(engine.state.device, non_blocking=True).float().div_(255.0)
        engine.generator.train()
        recon, z_mu, z_sigma = engine.generator.reconstruct(x)
        recon_l1 = F.l1_loss(recon, x)
        kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - 2.0 * torch.log(z_sigma) - 1.0).mean()
        loss = recon_l1 + engine.kl_weight * kl
        engine.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        engine.optimizer.step()
        return [{"loss": loss.item(), "recon_l1": recon_l1.item(), "kl": kl.item()}]  # MONAI's decollated form


@torch.no_grad()
def reconstruction_metrics(
    generator: AutoencoderKLGenerator, images: ImageSet, batch_size: int = 512, max_images: int | None = 5000
) -> dict[str, float]:
    """Mean absolute error, mean squared error and PSNR (images in ``[0, 1]``) of ``decode(encode(x))``."""
    device = next(generator.parameters()).device
    n = len(images) if max_images is None else min(len(images), max_images)
    generator.eval()
    abs_err = sq_err = 0.0
    for start in range(0, n, batch_size):
        x = images.float_images(slice(start, min(start + batch_size, n))).to(device)
        recon = generator.decode(generator.encode(x))
        abs_err += (recon - x).abs().sum().item()
        sq_err += (recon - x).pow(2).sum().item()
    count = n * images.channels * images.image_size**2
    mse = sq_err / count
    return {"mae": abs_err / count, "mse": mse, "psnr": float(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))))}


class ReconstructionValidation:
    """At every epoch end, put ``val_mae``, ``val_mse`` and ``val_psnr`` of the validation split into
    ``engine.state.metrics`` (where MONAI's ``MLFlowHandler`` picks them up)."""

    def __init__(self, val: ImageSet, max_images: int | None = 5000) -> None:
        self.val = val
        self.max_images = max_images

    def attach(self, engine: GeneratorTrainer) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: GeneratorTrainer) -> None:
        metrics = reconstruction_metrics(engine.generator, self.val, max_images=self.max_images)
        engine.state.metrics.update({f"val_{k}": v for k, v in metrics.items()})


def pretrain_generator(
    generator_path: str | os.PathLike,
    dataset_flag: str = "pathmnist",
    dataset_dir: str | None = None,
    image_size: int = 28,
    download: bool | str = True,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 2e-3,
    kl_weight: float = 1e-3,
    max_train_images: int | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    log_interval: int = 100,
    tracking_uri: str | None = None,
    experiment_name: str = "monai_pld",
    run_name: str | None = None,
    network: dict[str, Any] | None = None,
) -> AutoencoderKLGenerator:
    """Train the default generator on a training split and save it atomically to ``generator_path``.

    Args:
        generator_path: checkpoint file to write.
        dataset_flag, dataset_dir, image_size, download: which data to read (see :func:`monai_pld.data.load_dataset`:
            MedMNIST 2D, CIFAR-10, ImageNet subsets).
        epochs: passes over the (possibly capped) training split.
        batch_size, lr: Adam settings.
        kl_weight: weight of the KL term.
        max_train_images: optional cap on training images (evenly spaced), for quick runs.
        seed: seeds initialisation and shuffling.
        device: ``auto``, ``cpu`` or ``cuda[:i]``.
        log_interval: iterations between progress lines.
        tracking_uri: MLflow tracking URI; ``None`` logs nothing to MLflow.
        experiment_name, run_name: MLflow names (run name defaults to ``pretrain_<flag>_<size>px``).
        network: architecture overrides on top of :func:`default_autoencoder_config`.

    Returns:
        the trained generator, frozen.
    """
    from monai.handlers import MLFlowHandler

    dev = resolve_device(device)
    if int(epochs) < 1:
        raise ValueError(f"'generator_epochs' must be >= 1, got {epochs}")
    from monai_pld.data import load_dataset

    train = load_dataset(
        dataset_flag, "train", dataset_dir, image_size=image_size, download=as_bool(download, "download")
    )
    val = load_dataset(dataset_flag, "val", dataset_dir, image_size=image_size, download=False)
    train_images = train.images
    if max_train_images is not None and len(train_images) > max_train_images:
        train_images = train_images[torch.linspace(0, len(train_images) - 1, int(max_train_images)).long()]

    torch.manual_seed(seed)
    config = {**default_autoencoder_config(image_size, train.channels), **(network or {})}
    generator = AutoencoderKLGenerator(**config).to(dev)
    loader = DataLoader(
        TensorDataset(train_images),
        batch_size=batch_size,
        shuffle=True,
        drop_last=len(train_images) > batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    handlers: list[Any] = [
        ReconstructionValidation(val),  # first, so the MLflow handler below logs its metrics at the same epoch
        ProgressLogger(interval=log_interval, prefix="generator"),
    ]
    run_name = run_name or f"pretrain_{dataset_flag}_{image_size}px"
    params = {
        "dataset_flag": dataset_flag,
        "image_size": image_size,
        "generator_epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "kl_weight": kl_weight,
        "train_images": len(train_images),
        "seed": seed,
        **{f"network_{k}": str(v) for k, v in config.items()},
    }
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
    trainer = GeneratorTrainer(
        device=dev,
        max_epochs=int(epochs),
        train_data_loader=loader,
        generator=generator,
        optimizer=torch.optim.Adam(generator.parameters(), lr=lr),
        kl_weight=kl_weight,
        train_handlers=handlers,
    )
    logger.info(
        f"pretraining the {dataset_flag} {image_size}px generator: {len(train_images)} images, {epochs} epochs, "
        f"latent {generator.latent_shape}, device {dev}"
    )
    start = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - start
    metrics = dict(trainer.state.metrics)
    logger.info(
        f"generator trained in {seconds:.0f}s; val MAE {metrics['val_mae']:.4f}, PSNR {metrics['val_psnr']:.2f} dB"
    )
    generator.save(
        generator_path,
        dataset=dataset_flag,
        image_size=int(image_size),
        epochs=int(epochs),
        train_images=len(train_images),
        train_seconds=seconds,
        seed=int(seed),
        device=str(dev),
        **metrics,
    )
    logger.info(f"generator saved to {generator_path}")
    return AutoencoderKLGenerator.load(generator_path, map_location=dev)


def ensure_generator(
    generator_path: str | os.PathLike, device: str | torch.device = "auto", **pretrain_kwargs: Any
) -> AutoencoderKLGenerator:
    """Load the generator at ``generator_path``, pretraining and saving it first when the file does not exist.

    Raises:
        GeneratorCheckpointError: when the file exists but is unusable (message names the file and the fix).
    """
    dev = resolve_device(device)
    if os.path.isfile(generator_path):
        generator = AutoencoderKLGenerator.load(generator_path, map_location=dev)
        logger.info(f"using generator {generator_path} (sha256 {generator.checkpoint_sha256[:12]})")
        return generator
    logger.info(f"no generator checkpoint at {generator_path}: pretraining one first")
    return pretrain_generator(generator_path, device=dev, **pretrain_kwargs)
