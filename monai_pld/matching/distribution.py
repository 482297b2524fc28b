"""Distribution matching (DM): match per-class mean embeddings under a freshly drawn random network."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from monai_pld.augment import DiffSiameseAugment
from monai_pld.matching.base import Matcher
from monai_pld.networks.classifiers import get_classifier
from monai_pld.utils import derive_seed

__all__ = ["DistributionMatcher"]

# last part of derive_seed(seed, step, part): keeps the embedder's and the augmentation's streams apart
_EMBEDDER_STREAM, _AUGMENT_STREAM = 0, 1


class DistributionMatcher(Matcher):
    """DM loss ``sum_c || mean_i phi(A(x_real,c,i)) - mean_j phi(A(x_syn,c,j)) ||^2``.

    The squared distance is summed over features and over the classes present in both sets, not averaged, as in the
    reference, whose image learning rates assume this scale. ``phi`` is the ``embed`` of a randomly initialised
    network (ConvNet by default, frozen, train mode), re-drawn every step from a seed derived from ``(seed, step)``,
    so a resumed run sees the same networks. ``A`` is DSA with one transform per class shared by the real and the
    synthetic images. Each set goes through the embedder in one call; real embeddings carry no graph.

    Args:
        in_channels: image channels.
        num_classes: number of classes.
        image_size: side of the square images.
        mean: per-channel mean used to normalise ``[0, 1]`` inputs (default 0.5).
        std: per-channel std (default 0.5).
        seed: base seed of the embedders and augmentations.
        dsa_strategy: DSA families joined by ``_``; ``None`` or ``""`` disables augmentation.
        embedder: classifier registry name of the embedder (see :func:`~monai_pld.networks.get_classifier`).
        embedder_kwargs: its constructor arguments (``width``, ``depth``, ``norm``...).

    Raises:
        ValueError: for inconsistent sizes or statistics, an unknown DSA family, or an embedder that cannot be built.
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
        self.build_embedder(0, torch.device("cpu"))  # a bad name or argument fails here, not at the first step

    def build_embedder(self, step: int, device: torch.device | str) -> nn.Module:
        """The random embedder of ``step``: the same network whenever it is asked for.

        It is initialised on the CPU inside a forked RNG (only the CPU generator is re-seeded, never a CUDA one), so
        the caller's global RNG state is untouched, then moved to ``device``.

        Args:
            step: iteration number.
            device: where the network goes.

        Returns:
            The network, frozen (``requires_grad`` off) and in train mode, as in the reference.
        """
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(derive_seed(self.seed, step, _EMBEDDER_STREAM))
            net = get_classifier(
                self.embedder_name, self.in_channels, self.num_classes, self.image_size, **self.embedder_kwargs
            )
        return net.to(device).requires_grad_(False).train()

    def _class_means(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class mean features ``(num_classes, F)`` (zero for absent classes) and per-class counts."""
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
        """DM loss of one step; classes missing from either set contribute nothing.

        Args:
            syn_images: synthetic images ``(M, C, H, W)`` in ``[0, 1]``.
            syn_labels: their integer labels ``(M,)``.
            real_images: real images ``(N, C, H, W)`` in ``[0, 1]``, on the device of the synthetic ones.
            real_labels: their integer labels ``(N,)``.
            step: iteration number, which selects the embedder and the augmentation.

        Returns:
            Scalar loss, differentiable with respect to ``syn_images``.

        Raises:
            ValueError: for images or labels of the wrong shape, dtype, device or label range.
        """
        self.check_sets(syn_images, syn_labels, real_images, real_labels)
        syn_labels, real_labels = syn_labels.long(), real_labels.long()
        net = self.build_embedder(step, syn_images.device)
        dsa_seed = derive_seed(self.seed, step, _AUGMENT_STREAM)
        with torch.no_grad():
            real = self.normalize(real_images)
            if self.augment is not None:
                real = self.augment(real, dsa_seed, groups=real_labels)
            real_mean, real_count = self._class_means(net.embed(real), real_labels)
        syn = self.normalize(syn_images)
        if self.augment is not None:
            syn = self.augment(syn, dsa_seed, groups=syn_labels)
        syn_mean, syn_count = self._class_means(net.embed(syn), syn_labels)
        present = ((real_count > 0) & (syn_count > 0)).to(syn_mean.dtype)
        return ((real_mean - syn_mean).pow(2).sum(1) * present).sum()
