"""Build the parts of a distillation run from configuration values (what the bundles call), and a complete trainer
from them for Python users and scripts."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from monai_pld.data import ClassBalancedBatches, ImageSet, select_initial_images, select_initial_indices
from monai_pld.defaults import OPTIMIZERS, default_learning_rates
from monai_pld.engines.distillation import DistillationTrainer
from monai_pld.engines.generator import ensure_generator, pretrain_settings
from monai_pld.matching import DistributionMatcher, GradientMatcher, TrajectoryMatcher
from monai_pld.networks.generators import AutoencoderKLGenerator, LatentGenerator, PixelGenerator, at_layer
from monai_pld.parameterizations import BASELINES, LatentCodes, RealImageSet, SLFDistribution
from monai_pld.utils import (
    MATCHERS,
    PARAMETERIZATIONS,
    ConfigError,
    configure_cpu_allocator,
    derive_seed,
    resolve_device,
)

__all__ = [
    "build_generator",
    "encode_images",
    "class_latent_prior",
    "build_parameterization",
    "build_matcher",
    "build_optimizer",
    "build_trainer",
]

logger = logging.getLogger("monai_pld")
_NETWORK_INIT_STREAM = 1  # derive_seed(seed, 1): the SLFD network initialisation


def build_generator(
    parameterization: str,
    dataset: ImageSet,
    generator_path: str | os.PathLike,
    device: str | torch.device = "auto",
    latent_layer: int = 0,
    policy: str = "match",
    **pretrain_kwargs: Any,
) -> LatentGenerator:
    """The frozen generator for ``parameterization``: the identity for ``pixel`` and the real-image baselines
    (``random``, ``full``), else the pretrained autoencoder (pretrained first when ``generator_path`` is missing),
    split at ``latent_layer`` (0: its bottleneck; k: the feature map after decoder block k).

    ``policy`` decides what happens when the file was pretrained with other settings than ``pretrain_kwargs``
    (see :func:`monai_pld.engines.generator.ensure_generator`)."""
    dev = resolve_device(device)
    if parameterization == "pixel" or parameterization in BASELINES:
        return PixelGenerator((dataset.channels, dataset.image_size, dataset.image_size)).to(dev).freeze()
    if latent_layer and not os.path.isfile(generator_path):
        # a layer the architecture to be pretrained does not have fails now, not after minutes of pretraining
        settings = pretrain_settings("", dataset.image_size, dataset.channels, network=pretrain_kwargs.get("network"))
        try:
            at_layer(AutoencoderKLGenerator(**settings["network"]), int(latent_layer))
        except ValueError as e:
            raise ConfigError(str(e)) from e
    generator = ensure_generator(
        generator_path, device=dev, policy=policy, in_channels=dataset.channels, **pretrain_kwargs
    )
    if tuple(generator.image_shape) != (dataset.channels, dataset.image_size, dataset.image_size):
        raise ConfigError(
            f"generator {generator_path} makes images of shape {tuple(generator.image_shape)} but the data are "
            f"{(dataset.channels, dataset.image_size, dataset.image_size)}; point 'generator_path' at a generator "
            "for this dataset and image_size (or delete the file to pretrain one)"
        )
    try:
        return at_layer(generator, int(latent_layer))
    except ValueError as e:
        raise ConfigError(str(e)) from e


@torch.no_grad()
def encode_images(generator: LatentGenerator, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Encode float images in batches on the generator's device; returns latents on the CPU."""
    device = next(iter(generator.parameters()), torch.empty(0)).device
    return torch.cat([generator.encode(x.to(device)).cpu() for x in images.split(batch_size)])


@torch.no_grad()
def class_latent_prior(
    generator: LatentGenerator, dataset: ImageSet, max_per_class: int = 256, seed: int = 0, min_var: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean and (floored) variance of the encodings of up to ``max_per_class`` training images."""
    gen = torch.Generator().manual_seed(int(seed) + 1)
    means, variances = [], []
    for index in dataset.class_indices():
        pick = index[torch.randperm(len(index), generator=gen)[:max_per_class]]
        z = encode_images(generator, dataset.float_images(pick))
        means.append(z.mean(0))
        variances.append(
            z.var(0, unbiased=len(pick) > 1).clamp_min(min_var) if len(pick) > 1 else torch.ones_like(z[0])
        )
    return torch.stack(means), torch.stack(variances)


def build_parameterization(
    kind: str,
    generator: LatentGenerator,
    dataset: ImageSet,
    ipc: int,
    rank: int = 8,
    seed: int = 0,
    hidden_channels: int = 32,
    kl_weight: float = 0.0,
    init: str = "real",
    **slfd_kwargs: Any,
) -> torch.nn.Module:
    """The learnable parameterisation of the synthetic set, or a fixed real-image baseline.

    Args:
        kind: ``slfd`` (probabilistic latents), ``latent`` (deterministic codes, GLaD-style), ``pixel``, or a
            baseline: ``random`` (the ``ipc`` seeded real images per class that also initialise the slots) or
            ``full`` (the whole training split).
        generator: the frozen generator (identity for ``pixel``).
        dataset: the real training split (initialisation and, with ``kl_weight > 0``, the class prior).
        ipc: slots per class.
        rank: rank of the covariance factor (``slfd`` only).
        seed: which real images initialise the slots.
        hidden_channels: width of the lightweight network (``slfd`` only).
        kl_weight: when > 0, the class prior is estimated for the KL term.
        init: ``real`` (encode random real images of the class) or ``noise`` (standard normal latents; the only
            choice for generators without an encoder).
        slfd_kwargs: further ``SLFDistribution`` arguments (``log_var_min``, ``init_log_var``...).
    """
    if kind not in PARAMETERIZATIONS + BASELINES:
        raise ConfigError(f"'parameterization' must be one of {list(PARAMETERIZATIONS + BASELINES)}, got {kind!r}")
    if init not in ("real", "noise"):
        raise ConfigError(f"'init' must be 'real' or 'noise', got {init!r}")
    if kind == "full":
        return RealImageSet(dataset.images, dataset.labels, dataset.num_classes, kind="full")
    if kind == "random":
        order, labels = select_initial_indices(dataset, ipc, seed)
        return RealImageSet(dataset.images[order], labels, dataset.num_classes, kind="random", seed=seed)
    images, labels = select_initial_images(dataset, ipc, seed)
    if init == "real" and generator.has_encoder:
        codes = encode_images(generator, images)
    else:
        codes = torch.randn((len(labels), *generator.latent_shape), generator=torch.Generator().manual_seed(seed))
    hyper: dict[str, Any] = {
        "kind": kind,
        "ipc": int(ipc),
        "init": init,
        "seed": int(seed),
        "latent_layer": int(getattr(generator, "layer", 0)),
    }
    if kind in ("latent", "pixel"):
        param: torch.nn.Module = LatentCodes(codes, labels, dataset.num_classes)
    else:
        prior = class_latent_prior(generator, dataset, seed=seed) if kl_weight > 0 else None
        # the lightweight network's initial weights come from the seed, not from whatever the global RNG holds
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, _NETWORK_INIT_STREAM))
            param = SLFDistribution(
                codes,
                labels,
                dataset.num_classes,
                rank=rank,
                hidden_channels=hidden_channels,
                class_prior=prior,
                **slfd_kwargs,
            )
        hyper.update({"rank": int(rank), "hidden_channels": int(hidden_channels), **slfd_kwargs})
    param.hyper_parameters = hyper
    return param


def build_matcher(
    name: str,
    dataset: ImageSet,
    seed: int = 0,
    parameterization: str | None = None,
    ipc: int | None = None,
    **kwargs: Any,
) -> torch.nn.Module | None:
    """The matcher ``name`` (``dm``, ``dc`` or ``mtt``) for images shaped like ``dataset``, normalising with the
    dataset's channel statistics; ``None`` for the real-image baselines, which match nothing.

    Args:
        name: matcher name.
        dataset: the real training split.
        seed: base seed of the matcher's random draws.
        parameterization: when ``random`` or ``full``, no matcher is built.
        ipc: images per class (DC derives its outer/inner loops from it).
        kwargs: the matcher's own settings (``matcher_args[name]`` in the bundles, passed on by build_trainer).

    Raises:
        ConfigError: for an unknown name or a setting the matcher does not take.
    """
    if name not in MATCHERS:
        raise ConfigError(f"'matcher' must be one of {list(MATCHERS)}, got {name!r}")
    if parameterization in BASELINES:
        return None
    mean, std = dataset.normalization()
    common = {"mean": mean, "std": std, "seed": seed}
    shape = (dataset.channels, dataset.num_classes, dataset.image_size)
    classes = {"dm": DistributionMatcher, "dc": GradientMatcher, "mtt": TrajectoryMatcher}
    if name == "dc":
        kwargs = {"ipc": ipc, **kwargs}
    try:
        return classes[name](*shape, **common, **kwargs)
    except TypeError as e:  # an unknown key in matcher_args
        raise ConfigError(f"bad setting in matcher_args.{name}: {e}") from e


def build_optimizer(
    parameterization: torch.nn.Module,
    lr_codes: float = 0.01,
    lr_network: float = 0.001,
    matcher: torch.nn.Module | None = None,
    lr_matcher: float = 1e-5,
    optimizer: str = "adam",
    momentum: float = 0.5,
) -> torch.optim.Optimizer | None:
    """One optimiser with a parameter group for the slot codes, one for the lightweight network (if any) and one
    for the matcher's learnable parameters (if any, e.g. MTT's student learning rate); ``None`` when nothing is
    learnable (the real-image baselines).

    Args:
        parameterization: the learnable parameterisation.
        lr_codes, lr_network, lr_matcher: learning rate of each group (see
            :func:`monai_pld.defaults.default_learning_rates` for the per-space defaults the bundles use).
        matcher: the matcher, whose learnable parameters get their own group.
        optimizer: ``adam`` (default: invariant to the scale of the matching loss, which differs between datasets
            and matchers) or ``sgd`` (with ``momentum``, as GLaD).
        momentum: SGD momentum.
    """
    if not any(p.requires_grad for p in parameterization.parameters()):
        return None
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"'optimizer' must be one of {list(OPTIMIZERS)}, got {optimizer!r}")
    codes = [p for n, p in parameterization.named_parameters() if n == "codes"]
    network = [p for n, p in parameterization.named_parameters() if n != "codes"]
    groups = [{"params": codes, "lr": float(lr_codes), "name": "codes"}]
    if network:
        groups.append({"params": network, "lr": float(lr_network), "name": "network"})
    matcher_params = [p for p in matcher.parameters() if p.requires_grad] if matcher is not None else []
    if matcher_params:
        groups.append({"params": matcher_params, "lr": float(lr_matcher), "name": "matcher"})
    if optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=float(momentum))
    return torch.optim.Adam(groups)


def build_trainer(
    dataset: ImageSet,
    parameterization: str = "slfd",
    matcher: str = "dm",
    ipc: int = 10,
    iterations: int = 600,
    generator_path: str | os.PathLike | None = None,
    generator_policy: str = "match",
    latent_layer: int = 2,
    rank: int = 8,
    hidden_channels: int = 32,
    samples_per_slot: int = 1,
    antithetic: bool = False,
    include_mean: bool = True,
    decode_chunk: int = 30,
    kl_weight: float = 0.0,
    init: str = "real",
    optimizer: str = "adam",
    momentum: float = 0.5,
    lr_codes: float | str = "auto",
    lr_network: float | str = "auto",
    lr_matcher: float = 1e-5,
    batch_real_per_class: int = 64,
    seed: int = 0,
    device: str | torch.device = "auto",
    matcher_args: dict[str, Any] | None = None,
    pretrain: dict[str, Any] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_interval: int = 50,
    resume: bool = False,
    handlers: list[Any] | None = None,
    generator: LatentGenerator | None = None,
    parameterization_options: Mapping[str, Any] | None = None,
    cpu_allocator: str = "tuned",
) -> Any:
    """A complete :class:`~monai_pld.engines.DistillationTrainer` from configuration values: what every bundle's
    ``train#trainer`` is, and what Python users and scripts call.

    ``generator`` replaces the pretrained autoencoder of ``generator_path`` with one built elsewhere (the bundles
    pass their ``train#generator`` component, so a config can swap in any decoder). Handlers that draw or export
    the set take the trainer's parts when they are attached, so they need no reference to them.
    ``parameterization_options`` are further :func:`build_parameterization` keywords (e.g. SLFD's ``diagonal``).
    ``cpu_allocator`` is :func:`~monai_pld.utils.configure_cpu_allocator`'s mode, applied to the whole process.

    ``lr_codes``/``lr_network`` ``"auto"`` take the per-space defaults of :mod:`monai_pld.defaults` (SLFD's network
    rate also by ``iterations``); ``pretrain`` holds :func:`~monai_pld.engines.generator.pretrain_generator`
    arguments used when the generator is pretrained (or compared with an existing checkpoint). The trainer keeps
    ``generator``, ``parameterization``, ``matcher`` and ``optimizer`` as attributes.

    Example::

        train = monai_pld.data.load_dataset("retinamnist", "train", "../shared/data", download=False)
        trainer = build_trainer(train, "slfd", "dm", ipc=10, iterations=200, generator_path="g.pt",
                                pretrain={"dataset_flag": "retinamnist", "dataset_dir": "../shared/data"})
        trainer.run()
        images, labels = trainer.parameterization.render(trainer.generator)
    """
    dev = resolve_device(device)
    configure_cpu_allocator(cpu_allocator)
    auto_codes, auto_network = (
        default_learning_rates(parameterization, matcher, latent_layer, ipc, iterations)
        if (parameterization in PARAMETERIZATIONS)
        else (0.0, 0.0)
    )
    lr_codes = auto_codes if lr_codes == "auto" else float(lr_codes)
    lr_network = auto_network if lr_network == "auto" else float(lr_network)
    if generator_path is None:
        generator_path = os.path.join("generators", f"{dataset.name or 'data'}_{dataset.image_size}px_autoencoderkl.pt")
    if generator is None:
        generator = build_generator(
            parameterization, dataset, generator_path, dev, latent_layer, generator_policy, **dict(pretrain or {})
        )
    param = build_parameterization(
        parameterization,
        generator,
        dataset,
        ipc,
        rank=rank,
        seed=seed,
        hidden_channels=hidden_channels,
        kl_weight=kl_weight,
        init=init,
        **dict(parameterization_options or {}),
    )
    match = build_matcher(
        matcher, dataset, seed=seed, parameterization=parameterization, ipc=ipc, **dict(matcher_args or {})
    )
    opt = build_optimizer(
        param, lr_codes, lr_network, matcher=match, lr_matcher=lr_matcher, optimizer=optimizer, momentum=momentum
    )
    fixed = parameterization in BASELINES
    return DistillationTrainer(
        dev,
        1 if fixed else int(iterations),
        ClassBalancedBatches(dataset, batch_real_per_class, seed),
        param,
        generator,
        match,
        opt,
        samples_per_slot=samples_per_slot,
        antithetic=antithetic,
        kl_weight=kl_weight,
        seed=seed,
        include_mean=include_mean,
        decode_chunk=decode_chunk,
        checkpoint_dir=checkpoint_dir,
        checkpoint_interval=checkpoint_interval,
        resume=resume,
        train_handlers=list(handlers or []),
    )
