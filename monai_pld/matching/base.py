"""The matcher interface: compare synthetic with real images, owning whatever networks the comparison needs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["Matcher"]


class Matcher(nn.Module, ABC):
    """Base of every matcher. Owns its networks; compares synthetic with real images.

    Under several ranks the distillation engine splits the work among them as ``class_split`` says:
    ``"samples"`` (every rank decodes, augments and embeds the images of every N-th slot and every N-th real
    image, and ``loss`` takes ``across_ranks=True`` and combines the ranks' per-class sums, as in DM), ``"terms"``
    (a sum of per-class terms that need the whole synthetic set, as in DC whose inner network trains on every
    image: the classes are split and ``loss`` takes ``classes``) or ``None`` (no split: every rank computes the
    whole loss, as in MTT, whose student trains on all classes at once).

    Inputs are images in ``[0, 1]``; :meth:`normalize` maps them with per-channel mean and std, so that zero (the
    fill value of augmentations) means the average colour, as in the reference code.

    Args:
        in_channels: image channels.
        num_classes: number of classes; labels are ``0..num_classes-1``.
        image_size: side of the square images.
        mean: per-channel mean, default 0.5 for every channel.
        std: per-channel standard deviation, default 0.5 for every channel.
        seed: base seed of the matcher's random networks and augmentations.

    Raises:
        ValueError: for non-positive sizes, or ``mean``/``std`` with a length other than ``in_channels`` or a
            non-positive std.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if min(in_channels, num_classes, image_size) < 1:
            raise ValueError(
                f"in_channels, num_classes and image_size must be >= 1, got {(in_channels, num_classes, image_size)}"
            )
        mean = [0.5] * in_channels if mean is None else [float(m) for m in mean]
        std = [0.5] * in_channels if std is None else [float(s) for s in std]
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(
                f"mean/std need {in_channels} values (one per channel), got {len(mean)} and {len(std)}; "
                "pass the dataset's channel statistics or None for 0.5"
            )
        if min(std) <= 0:
            raise ValueError(f"std values must be > 0, got {std}")
        self.in_channels, self.num_classes, self.image_size, self.seed = in_channels, num_classes, image_size, seed
        # not persistent: they come from the constructor, so checkpoints need not carry them
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel standardisation.

        Args:
            x: images ``(N, C, H, W)`` in ``[0, 1]``.

        Returns:
            ``(x - mean) / std``, in the dtype and on the device of ``x``.
        """
        mean, std = self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype)
        return (x - mean) / std

    def check_inputs(self, images: torch.Tensor, labels: torch.Tensor, name: str) -> None:
        """Check one image set against this matcher.

        Args:
            images: ``(N, in_channels, image_size, image_size)`` floating-point images.
            labels: integer class labels ``(N,)`` in ``[0, num_classes)``, on the device of ``images``.
            name: what the set is called in error messages (``"synthetic"``, ``"real"``).

        Raises:
            ValueError: naming ``name``, what was wrong and what is expected.
        """
        shape = (self.in_channels, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != shape:
            raise ValueError(
                f"{name} images must have shape (N, {', '.join(map(str, shape))}), got {tuple(images.shape)}"
            )
        if not images.dtype.is_floating_point:
            raise ValueError(f"{name} images must be floating point in [0, 1], got dtype {images.dtype}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{name} labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"{name} labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.device != images.device:
            raise ValueError(f"{name} labels are on {labels.device} but the images on {images.device}; move both")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"{name} labels must lie in [0, {self.num_classes}), got {int(labels.min())}..{int(labels.max())}"
            )

    def check_sets(
        self, syn_images: torch.Tensor, syn_labels: torch.Tensor, real_images: torch.Tensor, real_labels: torch.Tensor
    ) -> None:
        """:meth:`check_inputs` on both sets, and that they are on one device.

        Raises:
            ValueError: naming the set and the problem.
        """
        self.check_inputs(syn_images, syn_labels, "synthetic")
        self.check_inputs(real_images, real_labels, "real")
        if real_images.device != syn_images.device:
            raise ValueError(
                f"real images are on {real_images.device} but synthetic images on {syn_images.device}; move both"
            )

    class_split: str | None = None

    def hyper_parameters(self) -> dict[str, Any]:
        """The matcher's settings, recorded in the manifest and as MLflow params (JSON-serialisable values)."""
        return {"seed": self.seed}

    def metrics(self) -> dict[str, float]:
        """Values to log after every step besides the loss (e.g. MTT's learnt student learning rate)."""
        return {}

    @abstractmethod
    def loss(
        self,
        syn_images: torch.Tensor,
        syn_labels: torch.Tensor,
        real_images: torch.Tensor,
        real_labels: torch.Tensor,
        step: int,
    ) -> torch.Tensor:
        """The matching loss of one distillation step.

        Args:
            syn_images: synthetic images ``(M, C, H, W)`` in ``[0, 1]``, usually requiring grad.
            syn_labels: their class labels ``(M,)``.
            real_images: real images ``(N, C, H, W)`` in ``[0, 1]``.
            real_labels: their class labels ``(N,)``.
            step: iteration number; the matcher's random draws are a function of ``(seed, step)``.

        Returns:
            A scalar, differentiable with respect to ``syn_images``.
        """
