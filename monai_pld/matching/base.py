"""The matcher interface: compare synthetic with real images, owning whatever networks the comparison needs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Matcher"]


class Matcher(nn.Module):
    """Base of every matcher. Inputs are images in ``[0, 1]``; :meth:`normalize` maps them with the dataset's
    per-channel mean and std, so augmentation fills (zeros) mean "average colour" as in the reference code.

    Args:
        in_channels: image channels.
        num_classes: number of classes (labels are ``0..num_classes-1``).
        image_size: side of the square images.
        mean: per-channel mean (default 0.5 each).
        std: per-channel standard deviation (default 0.5 each).
        seed: base seed of the matcher's random networks and augmentations.
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
        mean = [0.5] * in_channels if mean is None else list(mean)
        std = [0.5] * in_channels if std is None else list(std)
        if len(mean) != in_channels or len(std) != in_channels:
            raise ValueError(f"mean/std need {in_channels} values (one per channel), got {len(mean)} and {len(std)}")
        if min(std) <= 0:
            raise ValueError(f"std values must be > 0, got {std}")
        self.in_channels, self.num_classes, self.image_size, self.seed = in_channels, num_classes, image_size, seed
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def check_inputs(self, images: torch.Tensor, labels: torch.Tensor, name: str) -> None:
        """Raise a ``ValueError`` naming ``name`` when images or labels do not fit this matcher."""
        shape = (self.in_channels, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != shape:
            raise ValueError(
                f"{name} images must have shape (N, {', '.join(map(str, shape))}), got {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(f"{name} labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"{name} labels must lie in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")

    def loss(
        self,
        syn_images: torch.Tensor,
        syn_labels: torch.Tensor,
        real_images: torch.Tensor,
        real_labels: torch.Tensor,
        step: int,
    ) -> torch.Tensor:  # pragma: no cover - interface
        """Scalar matching loss of step ``step``, differentiable in ``syn_images``."""
        raise NotImplementedError
