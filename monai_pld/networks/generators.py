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
    "at_layer",
    "AutoencoderKLGenerator",
    "PixelGenerator",
    "ExternalGenerator",
    "FeatureLayerGenerator",
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


def default_autoencoder_config(
    image_size: int, in_channels: int, downsamplings: int | None = None, latent_channels: int = 4, width: int = 32
) -> dict[str, Any]:
    """Architecture of the default generator, sized so that pretraining takes minutes on a CPU.

    Args:
        image_size: side of the square images.
        in_channels: image channels.
        downsamplings: halvings between the image and the latent; ``None`` picks one at 28/32 px (a
            ``latent_channels x 14 x 14`` latent at 28 px, which reconstructs far better than ``7 x 7``; see
            docs/benchmarks.md) and one more per doubling of the size above that, so the latent side is at most 16.
        latent_channels: channels ``C`` of the latent map.
        width: channels of the deepest levels (the first level has half).
    """
    if downsamplings is None:
        downsamplings = 1
        size = image_size // 2
        while size > 16:
            downsamplings += 1
            size //= 2
    downsamplings = int(downsamplings)
    if downsamplings < 1:
        raise ValueError(f"'downsamplings' must be >= 1, got {downsamplings}")
    width = int(width)
    channels = [max(width // 2, 8)] + [width] * downsamplings
    return {
        "image_size": int(image_size),
        "in_channels": int(in_channels),
        "channels": channels,
        "latent_channels": int(latent_channels),
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

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks; ``latent_layer`` k in ``1..num_layers-1`` splits the decoder after block k."""
        return len(self.autoencoder.decoder.blocks)

    def decode_head(self, f: torch.Tensor, layer: int) -> torch.Tensor:
        """The decoder's first ``layer`` blocks: bottleneck latent ``f`` to the feature map after block ``layer``."""
        x = self.autoencoder.post_quant_conv(f)
        for block in self.autoencoder.decoder.blocks[:layer]:
            x = block(x)
        return x

    def decode_tail(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        """The rest of the decoder: a feature map after block ``layer`` to an image in ``[0, 1]``."""
        for block in self.autoencoder.decoder.blocks[layer:]:
            h = block(h)
        return torch.sigmoid(h)

    def layer_shapes(self) -> list[tuple[int, int, int]]:
        """Shape ``(C, h, w)`` of the feature map after each decoder block (index k-1 for ``latent_layer`` k)."""
        with torch.no_grad():
            x = self.autoencoder.post_quant_conv(torch.zeros(1, *self.latent_shape, device=self._device()))
            shapes = []
            for block in self.autoencoder.decoder.blocks:
                x = block(x)
                shapes.append(tuple(int(s) for s in x.shape[1:]))
        return shapes

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def encode_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and standard deviation, for the KL term of pretraining."""
        z_mu, z_sigma = self.autoencoder.encode(x)
        return z_mu, z_sigma

    def reconstruct(
        self, x: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sampled reconstruction in ``[0, 1]`` plus the posterior ``(mu, sigma)``, for pretraining.

        ``noise`` (standard normal, the latent's shape) replaces the draw MONAI's ``sampling`` makes: ranks that share
        one batch draw the batch's noise alike and each take their images' part.
        """
        z_mu, z_sigma = self.autoencoder.encode(x)
        z = self.autoencoder.sampling(z_mu, z_sigma) if noise is None else z_mu + noise * z_sigma
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


def load_generator(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", latent_layer: int = 0
) -> LatentGenerator:
    """Load a generator checkpoint written by this package (currently the ``autoencoderkl`` kind), split at
    ``latent_layer`` (see :func:`at_layer`; a distribution records the layer it was distilled in)."""
    return at_layer(AutoencoderKLGenerator.load(path, map_location), latent_layer)


def at_layer(generator: LatentGenerator, latent_layer: int = 0) -> LatentGenerator:
    """``generator`` itself for ``latent_layer`` 0 (its bottleneck), else a :class:`FeatureLayerGenerator` whose
    latent is the feature map after decoder block ``latent_layer``.

    Raises:
        ValueError: when the generator cannot be split (not an autoencoder) or the layer is out of range.
    """
    if not latent_layer:
        return generator
    if not isinstance(generator, AutoencoderKLGenerator):
        raise ValueError(
            f"'latent_layer' {latent_layer} needs the autoencoder generator; a {type(generator).__name__} cannot be "
            "split: use latent_layer 0"
        )
    return FeatureLayerGenerator(generator, latent_layer)


class FeatureLayerGenerator(LatentGenerator):
    """An autoencoder generator split inside its decoder: the latent is the feature map after decoder block
    ``layer`` (the analogue of GLaD's intermediate generator layers), and ``decode`` runs only the blocks after it.

    A feature map has more numbers than the bottleneck (``32 x 14 x 14`` against ``4 x 14 x 14`` at 28 px) and one
    optimiser step moves the image further, while the later blocks keep images close to what the decoder learnt to
    draw. ``encode`` is the base encoder followed by the first ``layer`` decoder blocks, so slots still start at the
    (reconstructed) real images.

    Args:
        base: the pretrained autoencoder generator.
        layer: split point, ``1 .. base.num_layers - 2`` (0 would be the bottleneck itself: use ``base``).

    Raises:
        ValueError: naming the valid layers and their shapes when ``layer`` is out of range.
    """

    def __init__(self, base: AutoencoderKLGenerator, layer: int) -> None:
        super().__init__()
        shapes = base.layer_shapes()
        valid = range(1, base.num_layers - 1)  # after the last two blocks (norm, output conv) nothing is left to learn
        if isinstance(layer, bool) or not isinstance(layer, int) or layer not in valid:
            listing = ", ".join(f"{k}: {'x'.join(map(str, shapes[k - 1]))}" for k in valid)
            raise ValueError(
                f"'latent_layer' must be 0 (the bottleneck, {'x'.join(map(str, base.latent_shape))}) or a decoder "
                f"block {valid.start}..{valid.stop - 1} ({listing}), got {layer!r}"
            )
        self.base = base
        self.layer = int(layer)
        self.config = base.config
        self.latent_shape = shapes[layer - 1]
        self.image_shape = base.image_shape
        for name in ("metadata", "checkpoint_sha256", "checkpoint_path"):
            if hasattr(base, name):
                setattr(self, name, getattr(base, name))

    @property
    def has_encoder(self) -> bool:
        return True

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.base.decode_tail(f, self.layer)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.decode_head(self.base.encode(x), self.layer)


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
