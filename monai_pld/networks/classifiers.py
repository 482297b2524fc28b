"""Classifiers for the matchers and for evaluation, sized from the input rather than assumed.

``ConvNet`` is the network of the dataset-distillation literature (conv3x3 -> norm -> activation -> pool, ``depth``
times, then a linear head), which MONAI does not provide. Its feature size comes from a dummy forward pass, so any
image size works; the reference code's shape bookkeeping treats 28 px as 32 px and breaks at 28 px RGB.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["CLASSIFIERS", "ConvNet", "get_classifier"]

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leakyrelu": lambda: nn.LeakyReLU(0.01),
    "sigmoid": nn.Sigmoid,
    "swish": nn.SiLU,
}
POOLS: dict[str, Callable[[], nn.Module]] = {
    "avgpooling": lambda: nn.AvgPool2d(2, 2),
    "maxpooling": lambda: nn.MaxPool2d(2, 2),
    "none": nn.Identity,
}


def _norm(kind: str, channels: int, size: tuple[int, int]) -> nn.Module:
    if kind == "instancenorm":  # the reference's "instance norm": one channel per group, with an affine map
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "layernorm":
        return nn.LayerNorm([channels, *size])
    if kind == "groupnorm":
        return nn.GroupNorm(4, channels, affine=True)
    return nn.Identity()


class ConvNet(nn.Module):
    """The dataset-distillation ConvNet (``ConvNetD{depth}``), PyTorch default initialisation.

    Args:
        in_channels: image channels.
        num_classes: number of outputs.
        image_size: side of the square input.
        width: channels of every conv layer.
        depth: number of conv blocks.
        norm: ``instancenorm`` (default), ``batchnorm``, ``layernorm``, ``groupnorm`` (4 groups) or ``none``.
        act: ``relu``, ``leakyrelu``, ``sigmoid`` or ``swish``.
        pool: ``avgpooling``, ``maxpooling`` or ``none``.

    Attributes:
        num_features: length of the :meth:`embed` vector.

    Raises:
        ValueError: for an unknown ``norm``/``act``/``pool``, a ``groupnorm`` width not divisible by 4, or an
            image too small for ``depth`` pooling steps.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        width: int = 128,
        depth: int = 3,
        norm: str = "instancenorm",
        act: str = "relu",
        pool: str = "avgpooling",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"ConvNet norm must be one of {list(NORMS)}, got {norm!r}")
        if act not in ACTIVATIONS:
            raise ValueError(f"ConvNet act must be one of {list(ACTIVATIONS)}, got {act!r}")
        if pool not in POOLS:
            raise ValueError(f"ConvNet pool must be one of {list(POOLS)}, got {pool!r}")
        if norm == "groupnorm" and width % 4:
            raise ValueError(f"ConvNet groupnorm uses 4 groups, so width must be a multiple of 4, got {width}")
        if min(in_channels, num_classes, image_size, width, depth) < 1:
            raise ValueError(
                "ConvNet in_channels, num_classes, image_size, width and depth must all be >= 1, got "
                f"{(in_channels, num_classes, image_size, width, depth)}"
            )
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for d in range(depth):
            # padding 3 on a one-channel first layer: the reference's way of giving 28 px digits 32 px feature maps
            padding = 3 if d == 0 and in_channels == 1 else 1
            conv_size = size + 2 * padding - 2
            size = conv_size // 2 if pool != "none" else conv_size
            if size < 1:
                raise ValueError(
                    f"ConvNet image_size {image_size} is too small for depth {depth} with pooling; lower depth"
                )
            layers += [
                nn.Conv2d(channels, width, 3, padding=padding),
                _norm(norm, width, (conv_size, conv_size)),
                ACTIVATIONS[act](),
                POOLS[pool](),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        self.num_features = self._count_features(in_channels, image_size)
        self.classifier = nn.Linear(self.num_features, num_classes)

    def _count_features(self, in_channels: int, image_size: int) -> int:
        # eval mode so the dummy pass leaves batch-norm running statistics untouched
        self.features.eval()
        with torch.no_grad():
            count = self.features(torch.zeros(1, in_channels, image_size, image_size)).numel()
        self.features.train()
        return int(count)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features, what distribution matching compares.

        Args:
            x: images ``(N, in_channels, image_size, image_size)``.

        Returns:
            ``(N, num_features)``.
        """
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, num_classes)`` of images ``(N, in_channels, image_size, image_size)``."""
        return self.classifier(self.embed(x))


CLASSIFIERS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "convnet": (ConvNet, {}),
    "convnetbn": (ConvNet, {"norm": "batchnorm"}),
}


def get_classifier(name: str, in_channels: int, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """A classifier from the registry, freshly initialised from the global RNG.

    Args:
        name: registry name (case-insensitive), one of :data:`CLASSIFIERS`.
        in_channels: image channels.
        num_classes: number of outputs.
        image_size: side of the square input.
        kwargs: constructor arguments; they override the registry entry's defaults (e.g. ``width``, ``depth``).

    Returns:
        The network, in train mode.

    Raises:
        ValueError: for an unknown name.
    """
    key = name.lower()
    if key not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; known: {sorted(CLASSIFIERS)}")
    cls, defaults = CLASSIFIERS[key]
    return cls(in_channels, num_classes, image_size, **{**defaults, **kwargs})
