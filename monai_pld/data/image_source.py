"""The images a classifier trains on: a fixed set, or a distilled distribution that is drawn anew every epoch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from monai_pld.utils import derive_seed

__all__ = ["EVAL_MODES", "ImageSource"]

EVAL_MODES = ("mean", "sample", "resample")


class ImageSource:
    """The images a classifier trains on: a fixed set, or a distribution that is resampled every epoch.

    Args:
        images: float images ``(N, C, H, W)`` in ``[0, 1]`` (the first draw, for ``resample``).
        labels: int64 labels ``(N,)``.
        description: what the set is (recorded in the results).
        resample: optional ``f(epoch) -> (images, labels)`` giving a fresh draw for each epoch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        description: dict[str, Any],
        resample: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.images, self.labels = images.float(), labels.long()
        self.description = description
        self.resample = resample

    def epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.resample(epoch) if self.resample is not None else (self.images, self.labels)

    @classmethod
    def from_distribution(
        cls, distribution: Any, generator: Any, description: dict[str, Any], mode: str = "mean", seed: int = 0
    ) -> ImageSource:
        """Images rendered from a distilled distribution: its means, one draw seeded by ``seed`` (``sample``), or a
        fresh draw seeded by ``(seed, epoch)`` every epoch (``resample``)."""
        if mode not in EVAL_MODES:
            raise ValueError(f"'mode' must be one of {list(EVAL_MODES)}, got {mode!r}")

        def draw(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = distribution.render(generator, "sample", seed=derive_seed(seed, epoch))
            return x.cpu(), y.cpu()

        images, labels = distribution.render(generator, "sample" if mode != "mean" else "mean", seed=seed)
        return cls(images.cpu(), labels.cpu(), description, draw if mode == "resample" else None)
