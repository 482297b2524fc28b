"""Distribution matching (DM): match per-class mean embeddings under a freshly drawn random network."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from monai_pld.augment import DiffSiameseAugment
from monai_pld.matching.base import Matcher
from monai_pld.networks.classifiers import get_classifier
from monai_pld.utils import derive_seed

__all__ = ["DistributionMatcher"]


class DistributionMatcher(Matcher):
    """DM loss: ``sum_c || mean_i phi(A(x_real,c,i)) - mean_j phi(A(x_syn,c,j)) ||^2`` (summed over features, as
    in the reference, whose learning rates assume this scale).

    ``phi`` is a randomly initialised embedder (ConvNet by default), re-drawn every step from a seed derived from
    ``(seed, step)``; ``A`` is DSA with one transform per class shared by real and synthetic images. All classes go
    through the embedder in one call per set; real embeddings carry no graph.

    Args:
        in_channels, num_classes, image_size, mean, std, seed: see :class:`Matcher`.
        dsa_strategy: DSA families (``None`` or ``""`` disables augmentation).
        embedder: classifier registry name of the embedder.
        embedder_kwargs: its arguments (width, depth, norm...).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int = 0,
        dsa_strategy: str | None = "color_crop_cutout_flip_scale_rotate",
        embedder: str = "convnet",
        embedder_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(in_channels, num_classes, image_size, mean, std, seed)
        self.augment = DiffSiameseAugment(dsa_strategy) if dsa_strategy else None
        self.embedder_name = embedder
        self.embedder_kwargs = dict(embedder_kwargs or {})
        get_classifier(embedder, in_channels, num_classes, image_size, **self.embedder_kwargs)  # fail early

    def embedder(self, step: int, device: torch.device) -> torch.nn.Module:
        """The random embedder of ``step``: the same network whenever it is asked for, global RNG untouched."""
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(derive_seed(self.seed, step, 0))
            net = get_classifier(
                self.embedder_name, self.in_channels, self.num_classes, self.image_size, **self.embedder_kwargs
            )
        return net.to(device).requires_grad_(False).train()

    def _class_means(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sums = features.new_zeros(self.num_classes, features.shape[1]).index_add(0, labels, features)
        counts = torch.bincount(labels, minlength=self.num_classes)
        return sums / counts.clamp_min(1).unsqueeze(1).to(features.dtype), counts

    def loss(
        self,
        syn_images: torch.Tensor,
        syn_labels: torch.Tensor,
        real_images: torch.Tensor,
        real_labels: torch.Tensor,
        step: int,
    ) -> torch.Tensor:
        self.check_inputs(syn_images, syn_labels, "synthetic")
        self.check_inputs(real_images, real_labels, "real")
        syn_labels, real_labels = syn_labels.long(), real_labels.long()
        net = self.embedder(step, syn_images.device)
        syn, real = self.normalize(syn_images), self.normalize(real_images)
        if self.augment is not None:
            seed = derive_seed(self.seed, step, 1)
            real = self.augment(real, seed, real_labels, num_groups=self.num_classes)
            syn = self.augment(syn, seed, syn_labels, num_groups=self.num_classes)
        with torch.no_grad():
            real_mean, real_count = self._class_means(net.embed(real), real_labels)
        syn_mean, syn_count = self._class_means(net.embed(syn), syn_labels)
        present = (real_count > 0) & (syn_count > 0)
        return (real_mean - syn_mean).pow(2).sum(1)[present].sum()
