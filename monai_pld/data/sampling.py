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
        self.classes = list(range(dataset.num_classes))

    def restrict_classes(self, classes: list[int]) -> None:
        """Yield only the images of ``classes`` (a rank's share under ``torchrun``). Every class's draw stays what
        it is in the whole stream, so the ranks' batches together are the single-process batch."""
        self.classes = sorted(int(c) for c in classes)

    def batch(self, position: int) -> dict[str, torch.Tensor]:
        """Batch number ``position`` of the stream (pure: does not move the stream)."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, position))
        b = self.batch_per_class
        picks = {}
        for c, index in enumerate(self._indices):  # one cheap draw per class (<= a few dozen classes), not per image
            n = len(index)
            pick = torch.randperm(n, generator=gen)[:b] if n >= b else torch.randint(n, (b,), generator=gen)
            picks[c] = index[pick]
        order = torch.cat([picks[c] for c in self.classes])
        labels = torch.tensor(self.classes).repeat_interleave(b)
        return {"image": self.dataset.float_images(order), "label": labels}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            batch = self.batch(self.position)
            self.position += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
