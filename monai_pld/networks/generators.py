"""Generators: frozen maps from a spatial latent feature map ``f`` of shape ``(C, h, w)`` to images in ``[0, 1]``.

Every generator offers ``latent_shape``, a differentiable ``decode(f)`` and, when it has one, ``encode(x)`` (used to
initialise slots from real images and to estimate the per-class latent prior). Implementations:

* :class:`AutoencoderKLGenerator`: the decoder of a MONAI ``AutoencoderKL`` trained on the target dataset
  (``monai_pld.engines.generator`` trains it); saved and loaded as a plain checkpoint (``weights_only=True``).
* :class:`PixelGenerator`: the identity, so ``f`` is the image (the classic pixel-space parameterisation).
* :class:`ExternalGenerator`: any ``nn.Module`` or TorchScript file a user brings (e.g. a StyleGAN-XL or
  latent-diffusion decoder on a GPU).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import AutoencoderKL
from torch import nn

from monai_pld.utils import atomic_save_torch, library_versions, sha256_file

__all__ = [
    "LatentGenerator",
    "AutoencoderKLGenerator",
    "PixelGenerator",
    "ExternalGenerator",
    "GeneratorCheckpointError",
    "default_autoencoder_config",
    "config_hash",
    "load_generator",
]

CHECKPOINT_FORMAT = 1


class GeneratorCheckpointError(RuntimeError):
    """A generator checkpoint cannot be used (missing, corrupted, wrong format or wrong data shape)."""


def config_hash(config: dict[str, Any]) -> str:
    """Short stable hash of a JSON-serialisable config, stored with checkpoints to identify how they were made."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class LatentGenerator(nn.Module):
    """Interface of a frozen generator. Subclasses set ``latent_shape``, ``image_shape`` and implement ``decode``."""

    latent_shape: tuple[int, int, int]
    image_shape: tuple[int, int, int]

    @property
    def has_encoder(self) -> bool:
        """Whether :meth:`encode` maps images to latents (else slots start from random latents)."""
        return False

    def decode(self, f: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """Map latents ``(N, *latent_shape)`` to images ``(N, *image_shape)`` in ``[0, 1]``, differentiably."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Map images in ``[0, 1]`` to latents. Raises ``NotImplementedError`` for generators without an encoder."""
        raise NotImplementedError(f"{type(self).__name__} has no encoder; initialise slots with random latents")

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.decode(f)

    def freeze(self) -> LatentGenerator:
        """Eval mode and no parameter gradients: distillation only passes gradients *through* the generator."""
        self.eval()
        self.requires_grad_(False)
        return self


def default_autoencoder_config(image_size: int, in_channels: int) -> dict[str, Any]:
    """Architecture of the default generator, sized so that pretraining on a MedMNIST set takes minutes on a CPU.

    Two downsamplings give a ``4 x s/4 x s/4`` spatial latent (``4 x 7 x 7`` at 28 px, ``4 x 16 x 16`` at 64 px);
    larger images get one more level per doubling so the latent stays at most 16 x 16.
    """
    levels = 3
    size = image_size // 4
    while size > 16:
        levels += 1
        size //= 2
    channels = [16, 32] + [32] * (levels - 2)
    return {
        "image_size": int(image_size),
        "in_channels": int(in_channels),
        "channels": channels,
        "latent_channels": 4,
        "num_res_blocks": 1,
        "norm_num_groups": 8,
    }


class AutoencoderKLGenerator(LatentGenerator):
    """A MONAI ``AutoencoderKL`` whose decoder (followed by a sigmoid) is the generator.

    The sigmoid keeps images in ``[0, 1]`` without a gradient-killing clamp; pretraining uses the same output, so
    reconstructions and generated images share one range.

    Args:
        image_size: side of the square images.
        in_channels: image channels (3 for RGB, 1 for grayscale).
        channels: channels per level of the autoencoder; ``len(channels) - 1`` downsamplings.
        latent_channels: channels ``C`` of the latent map.
        num_res_blocks: residual blocks per level.
        norm_num_groups: group-norm groups; must divide every entry of ``channels``.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        channels: Sequence[int] = (16, 32, 32),
        latent_channels: int = 4,
        num_res_blocks: int = 1,
        norm_num_groups: int = 8,
    ) -> None:
        super().__init__()
        down = 2 ** (len(channels) - 1)
        if image_size % down:
            raise ValueError(
                f"image_size {image_size} is not divisible by 2**(len(channels)-1) = {down}; "
                f"use fewer levels in 'channels' {list(channels)}"
            )
        if any(c % norm_num_groups for c in channels):
            raise ValueError(f"norm_num_groups {norm_num_groups} must divide every entry of channels {list(channels)}")
        self.config = {
            "image_size": int(image_size),
            "in_channels": int(in_channels),
            "channels": [int(c) for c in channels],
            "latent_channels": int(latent_channels),
            "num_res_blocks": int(num_res_blocks),
            "norm_num_groups": int(norm_num_groups),
        }
        self.autoencoder = AutoencoderKL(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=in_channels,
            channels=tuple(channels),
            latent_channels=latent_channels,
            num_res_blocks=num_res_blocks,
            attention_levels=(False,) * len(channels),
            norm_num_groups=norm_num_groups,
            with_encoder_nonlocal_attn=False,
            with_decoder_nonlocal_attn=False,
        )
        self.latent_shape = (latent_channels, image_size // down, image_size // down)
        self.image_shape = (in_channels, image_size, image_size)

    @property
    def has_encoder(self) -> bool:
        return True

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.autoencoder.decode(f))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean of the encoder (deterministic, as used for initialisation)."""
        return self.autoencoder.encode(x)[0]

    def encode_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and standard deviation, for the KL term of pretraining."""
        z_mu, z_sigma = self.autoencoder.encode(x)
        return z_mu, z_sigma

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sampled reconstruction in ``[0, 1]`` plus the posterior ``(mu, sigma)``, for pretraining."""
        z_mu, z_sigma = self.autoencoder.encode(x)
        z = self.autoencoder.sampling(z_mu, z_sigma)
        return self.decode(z), z_mu, z_sigma

    def save(self, path: str | os.PathLike, **metadata: Any) -> Path:
        """Write the weights, the architecture and ``metadata`` atomically; loadable with ``weights_only=True``."""
        payload = {
            "format": CHECKPOINT_FORMAT,
            "kind": "autoencoderkl",
            "config": self.config,
            "config_hash": config_hash(self.config),
            "state_dict": self.state_dict(),
            "versions": library_versions(),
            "metadata": metadata,
        }
        return atomic_save_torch(payload, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> AutoencoderKLGenerator:
        """Rebuild a generator from :meth:`save` output; the result is frozen.

        Raises:
            GeneratorCheckpointError: naming the file when it is missing, unreadable or of another format.
        """
        payload = _read_checkpoint(path, map_location)
        if payload.get("kind") != "autoencoderkl":
            raise GeneratorCheckpointError(f"{path} holds a '{payload.get('kind')}' generator, not 'autoencoderkl'")
        gen = cls(**payload["config"])
        try:
            gen.load_state_dict(payload["state_dict"])
        except RuntimeError as e:
            raise GeneratorCheckpointError(f"{path}: weights do not match the stored architecture ({e})") from e
        gen.metadata = dict(payload.get("metadata", {}))
        gen.checkpoint_sha256 = sha256_file(path)
        gen.checkpoint_path = str(path)
        return gen.freeze()


def _read_checkpoint(path: str | os.PathLike, map_location: str | torch.device) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise GeneratorCheckpointError(f"generator checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise GeneratorCheckpointError(
            f"generator checkpoint {path} cannot be read "
            f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); "
            "it is corrupted or not a monai_pld generator. Delete it to pretrain a new one, or point 'generator_path' "
            "at a good file."
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise GeneratorCheckpointError(
            f"generator checkpoint {path} is not in monai_pld generator format {CHECKPOINT_FORMAT}; "
            "delete it to pretrain a new one"
        )
    return payload


def load_generator(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LatentGenerator:
    """Load a generator checkpoint written by this package (currently the ``autoencoderkl`` kind)."""
    return AutoencoderKLGenerator.load(path, map_location)


class PixelGenerator(LatentGenerator):
    """Identity generator: the latent is the image, giving classic pixel-space distillation.

    ``decode`` does not clamp during optimisation (a clamp would stop gradients of out-of-range pixels);
    rendering of the final set clamps to ``[0, 1]``.
    """

    def __init__(self, image_shape: Sequence[int]) -> None:
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        self.image_shape = tuple(int(s) for s in image_shape)  # type: ignore[assignment]
        self.latent_shape = self.image_shape

    @property
    def has_encoder(self) -> bool:
        return True

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ExternalGenerator(LatentGenerator):
    """A generator brought by the user: an ``nn.Module`` or the path of a TorchScript file.

    Args:
        decoder: module mapping ``(N, *latent_shape)`` to images, or a TorchScript file path.
        latent_shape: ``(C, h, w)`` of the latents the decoder takes.
        image_shape: ``(C, H, W)`` of its images, checked against the dataset by the caller.
        output_range: value range of the decoder's output; mapped linearly to ``[0, 1]`` (e.g. ``(-1, 1)``).
        encoder: optional module (or TorchScript path) mapping images in ``[0, 1]`` to latents.
    """

    def __init__(
        self,
        decoder: nn.Module | str | os.PathLike,
        latent_shape: Sequence[int],
        image_shape: Sequence[int],
        output_range: Sequence[float] = (0.0, 1.0),
        encoder: nn.Module | str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.decoder = _as_module(decoder, "decoder")
        self.encoder = _as_module(encoder, "encoder") if encoder is not None else None
        self.latent_shape = tuple(int(s) for s in latent_shape)  # type: ignore[assignment]
        self.image_shape = tuple(int(s) for s in image_shape)  # type: ignore[assignment]
        low, high = (float(v) for v in output_range)
        if not high > low:
            raise ValueError(f"output_range must be (low, high) with high > low, got {tuple(output_range)}")
        self.low, self.high = low, high

    @property
    def has_encoder(self) -> bool:
        return self.encoder is not None

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return (self.decoder(f) - self.low) / (self.high - self.low)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            return super().encode(x)
        return self.encoder(x)


def _as_module(obj: nn.Module | str | os.PathLike, what: str) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    if not os.path.isfile(obj):
        raise FileNotFoundError(f"external {what} file {obj} does not exist; give a TorchScript file or a module")
    # TorchScript archives hold code, not pickles, so loading one does not execute arbitrary Python.
    return torch.jit.load(str(obj), map_location="cpu")
