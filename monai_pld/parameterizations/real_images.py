"""Real-image baselines as image sets: ``random`` (``ipc`` seeded real images per class) and ``full`` (everything).

They are the floor and the ceiling of every distillation table. Giving them the render interface of a
parameterisation lets the same workflow export them as ``images.npz`` + ``manifest.json``, so evaluation treats every
row of a table the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from monai_pld.utils import BASELINES

__all__ = ["RealImageSet", "BASELINES"]


class RealImageSet(nn.Module):
    """A fixed set of real images with the ``render`` interface of a parameterisation; nothing is learnt.

    The images are kept as ``uint8`` in a non-persistent buffer: checkpoints stay small (the whole PathMNIST
    training split would otherwise be copied into every checkpoint), and the exporter writes them to
    ``images.npz`` instead of a ``distribution.pt``.

    Args:
        images: ``uint8`` images ``(N, C, H, W)``.
        labels: integer labels ``(N,)`` in ``[0, num_classes)``.
        num_classes: number of classes.
        kind: ``random`` or ``full``, recorded in the manifest.
        seed: seed of the selection (``random``), recorded in the manifest.

    Raises:
        ValueError: for non-uint8 or non-4-D images, labels that do not match, or an unknown kind.
    """

    fixed = True  # tells the trainer and the exporter that there is nothing to optimise or to save as a distribution

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int, kind: str = "random", seed: int = 0) -> None:
        super().__init__()
        if kind not in BASELINES:
            raise ValueError(f"baseline kind must be one of {list(BASELINES)}, got {kind!r}")
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"real images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        labels = torch.as_tensor(labels).long()
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}")
        self.num_classes = int(num_classes)
        self.register_buffer("images", images, persistent=False)
        self.register_buffer("labels", labels, persistent=False)
        counts = torch.bincount(labels, minlength=num_classes)
        # ``full`` has as many images per class as the data; ipc is only defined when every class has the same count
        self.ipc: int | None = int(counts[0]) if bool((counts == counts[0]).all()) else None
        self.images_per_class = counts.tolist()
        self.hyper_parameters = {"kind": kind, "seed": int(seed), "images": int(images.shape[0])}
        if self.ipc is not None:
            self.hyper_parameters["ipc"] = self.ipc

    @property
    def num_slots(self) -> int:
        return int(self.images.shape[0])

    def kl_to_prior(self) -> Tensor:
        return torch.zeros(())

    @torch.no_grad()
    def render(self, generator=None, mode: str = "mean", seed: int = 0, chunk_size: int = 256) -> tuple[Tensor, Tensor]:
        """The images as float in ``[0, 1]`` and their labels; ``generator``, ``mode`` and ``seed`` are ignored."""
        return self.images.float().div(255.0), self.labels.clone()
