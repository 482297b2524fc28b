"""``ImageSet``: a labelled image set held as one uint8 tensor, the common currency of the data modules."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ImageSet"]


@dataclass
class ImageSet:
    """Images and labels of one split.

    Images stay ``uint8`` (PathMNIST at 64 px is 1.1 GB as uint8, four times that as float) and are converted to
    float in ``[0, 1]`` only for the batch at hand (:meth:`float_images`).

    Attributes:
        images: ``uint8`` tensor ``(N, C, H, W)``, channel-first; grayscale sets keep ``C = 1``.
        labels: ``int64`` tensor ``(N,)`` with values in ``[0, num_classes)``.
        class_names: name of every class, index = label.
        name: dataset name, e.g. ``pathmnist``.
        source_info: how the images were read, for manifests (custom data: format, cache file, images converted
            and skipped as unreadable); empty for the public datasets.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    name: str = ""
    source_info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.ndim != 4:
            got = (getattr(self.images, "dtype", type(self.images)), tuple(getattr(self.images, "shape", ())))
            raise ValueError(f"{self.name or 'ImageSet'}: images must be a uint8 tensor (N, C, H, W), got {got}")
        if self.images.shape[2] != self.images.shape[3]:
            raise ValueError(f"{self.name}: images must be square, got H x W = {tuple(self.images.shape[2:])}")
        self.labels = torch.as_tensor(self.labels)
        if self.labels.ndim != 1 or self.labels.dtype.is_floating_point or len(self.labels) != len(self.images):
            raise ValueError(
                f"{self.name}: labels must be integers of shape ({len(self.images)},), got "
                f"{self.labels.dtype} {tuple(self.labels.shape)}"
            )
        self.labels = self.labels.long()
        self.class_names = [str(c) for c in self.class_names]
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(
                f"{self.name}: labels must lie in [0, {len(self.class_names)}) for {len(self.class_names)} classes, "
                f"found {int(self.labels.min())}..{int(self.labels.max())}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[2])

    def float_images(self, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Images (all, or ``images[index]``) as ``float32`` in ``[0, 1]``."""
        images = self.images if index is None else self.images[index]
        return images.float().div_(255.0)

    def class_indices(self) -> list[torch.Tensor]:
        """For every class, the ``int64`` indices of its images (possibly empty)."""
        order = torch.argsort(self.labels, stable=True)
        counts = torch.bincount(self.labels, minlength=self.num_classes).tolist()
        return list(torch.split(order, counts))

    def channel_stats(self, max_images: int = 10000) -> tuple[list[float], list[float]]:
        """Per-channel mean and standard deviation of the float images (on up to ``max_images`` evenly spaced)."""
        n = len(self)
        index = torch.linspace(0, n - 1, min(n, max_images)).long() if n > max_images else None
        x = self.float_images(index).double().transpose(0, 1).reshape(self.channels, -1)
        return x.mean(1).tolist(), x.std(1, unbiased=False).tolist()

    def normalization(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std for standardising inputs, as matchers and experts use them: a constant channel
        (std below 1e-3) keeps std 1, so it is centred but not divided by zero."""
        mean, std = self.channel_stats()
        return mean, [s if s > 1e-3 else 1.0 for s in std]
