"""Real images drawn from a split: the seeded initial selection of ``ipc`` images per class (which initialises
distillation and is the ``random`` baseline), and class-balanced batches, an infinite, deterministic and resumable
stream for the distillation engine."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch

from monai_pld.data.base import ImageSet
from monai_pld.utils import derive_seed

__all__ = ["ClassBalancedBatches", "select_initial_images", "select_initial_indices"]

logger = logging.getLogger("monai_pld")


def select_initial_indices(dataset: ImageSet, ipc: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of ``ipc`` distinct random training images per class (seeded), class-sorted, and their labels.

    Classes with fewer than ``ipc`` images repeat images (with a warning), so every class gets ``ipc`` slots.
    """
    gen = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c, index in enumerate(dataset.class_indices()):
        if len(index) == 0:
            raise ValueError(f"class {c} ({dataset.class_names[c]}) has no training images; cannot initialise it")
        if len(index) < ipc:
            logger.warning(f"class {c} has {len(index)} images < ipc {ipc}: some initial images repeat")
            pick = index[torch.randint(len(index), (ipc,), generator=gen)]
        else:
            pick = index[torch.randperm(len(index), generator=gen)[:ipc]]
        chosen.append(pick)
    labels = torch.arange(dataset.num_classes).repeat_interleave(ipc)
    return torch.cat(chosen), labels


def select_initial_images(dataset: ImageSet, ipc: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of :func:`select_initial_indices` as float ``[0, 1]``, with their labels.

    The ``random`` baseline is exactly this selection, so it equals the starting point of ``pixel`` distillation
    with the same seed.
    """
    order, labels = select_initial_indices(dataset, ipc, seed)
    return dataset.float_images(order), labels


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
