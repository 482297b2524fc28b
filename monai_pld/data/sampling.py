"""Class-balanced real batches: an infinite, deterministic and resumable stream for the distillation engine."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from monai_pld.data.base import ImageSet
from monai_pld.utils import derive_seed

__all__ = ["ClassBalancedBatches"]


class ClassBalancedBatches:
    """Yield ``{"image", "label"}`` batches with ``batch_per_class`` images of every class, class-major, forever.

    Batch number ``p`` is drawn from a private generator seeded by ``(seed, p)``, so the stream is the same in every
    run and, after ``load_state_dict({"position": p})``, a new iterator continues exactly where an uninterrupted one
    would be. The global RNG is never touched. Usable as an ignite/MONAI engine's data loader (set ``epoch_length``).

    Args:
        dataset: the real training split.
        batch_per_class: images per class in each batch; classes smaller than this are sampled with replacement.
        seed: base seed of the stream.

    Raises:
        ValueError: ``batch_per_class < 1`` or a class without images (named).
    """

    def __init__(self, dataset: ImageSet, batch_per_class: int, seed: int = 0) -> None:
        if int(batch_per_class) < 1:
            raise ValueError(f"'batch_real_per_class' must be >= 1, got {batch_per_class}")
        self.dataset = dataset
        self.batch_per_class = int(batch_per_class)
        self.seed = int(seed)
        self.position = 0
        self._indices = dataset.class_indices()
        empty = [f"{c} ({dataset.class_names[c]})" for c, idx in enumerate(self._indices) if len(idx) == 0]
        if empty:
            raise ValueError(
                f"{dataset.name}: classes {', '.join(empty)} have no training images; distillation needs every "
                "class in the training split"
            )
        self._labels = torch.arange(dataset.num_classes).repeat_interleave(self.batch_per_class)
        self.share = slice(None)

    def take_share(self, rank: int, ranks: int) -> None:
        """Yield only every ``ranks``-th image of each batch, from ``rank`` on (a rank's share under ``torchrun``).
        The draws stay those of the whole stream, so the ranks' shares together are the single-process batch."""
        self.share = slice(int(rank), None, int(ranks))

    def batch(self, position: int) -> dict[str, torch.Tensor]:
        """Batch number ``position`` of the stream (pure: does not move the stream)."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, position))
        b = self.batch_per_class
        picks = []
        for index in self._indices:  # one cheap draw per class (<= a few dozen classes), not per image
            n = len(index)
            pick = torch.randperm(n, generator=gen)[:b] if n >= b else torch.randint(n, (b,), generator=gen)
            picks.append(index[pick])
        order = torch.cat(picks)[self.share]
        return {"image": self.dataset.float_images(order), "label": self._labels[self.share].clone()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            batch = self.batch(self.position)
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
