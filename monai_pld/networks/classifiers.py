"""Classifiers used by the matchers and for evaluation, sized from the input rather than assumed.

``ConvNet`` is the network of the dataset-distillation literature (conv3x3 -> norm -> activation -> pool, ``depth``
times, then a linear head), which MONAI does not have. Its feature size is computed by a dummy forward pass, so any
image size works (the reference code's bookkeeping breaks at 28 px RGB).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ConvNet", "get_classifier", "CLASSIFIERS"]

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leakyrelu": lambda: nn.LeakyReLU(0.01),
    "sigmoid": nn.Sigmoid,
    "swish": nn.SiLU,
}
POOLS = {"avgpooling": lambda: nn.AvgPool2d(2, 2), "maxpooling": lambda: nn.MaxPool2d(2, 2), "none": nn.Identity}


def _norm(kind: str, channels: int, size: int) -> nn.Module:
    if kind == "instancenorm":  # as in the reference: a GroupNorm with one channel per group, with affine
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "layernorm":
        return nn.LayerNorm([channels, size, size])
    if kind == "groupnorm":
        return nn.GroupNorm(4, channels, affine=True)
    return nn.Identity()


class ConvNet(nn.Module):
    """The dataset-distillation ConvNet.

    Args:
        in_channels: image channels.
        num_classes: output classes.
        image_size: side of the square input.
        width: channels of every conv layer.
        depth: number of conv blocks.
        norm: ``instancenorm`` (default), ``batchnorm``, ``layernorm``, ``groupnorm`` or ``none``.
        act: ``relu``, ``leakyrelu``, ``sigmoid`` or ``swish``.
        pool: ``avgpooling``, ``maxpooling`` or ``none``.
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
        if act not in ACTS:
            raise ValueError(f"ConvNet act must be one of {list(ACTS)}, got {act!r}")
        if pool not in POOLS:
            raise ValueError(f"ConvNet pool must be one of {list(POOLS)}, got {pool!r}")
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for d in range(depth):
            # padding 3 on a 1-channel first layer: the reference's way of treating 28 px digits like 32 px images
            padding = 3 if (d == 0 and in_channels == 1) else 1
            layers.append(nn.Conv2d(channels, width, 3, padding=padding))
            size = size + 2 * padding - 2
            layers += [_norm(norm, width, size), ACTS[act](), POOLS[pool]()]
            if pool != "none":
                size //= 2
            if size < 1:
                raise ValueError(f"image_size {image_size} is too small for depth {depth}; use a smaller depth")
            channels = width
        self.features = nn.Sequential(*layers)
        with torch.no_grad():
            self.num_features = int(self.features(torch.zeros(1, in_channels, image_size, image_size)).numel())
        self.classifier = nn.Linear(self.num_features, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened features ``(N, num_features)`` (what distribution matching compares)."""
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


CLASSIFIERS: dict[str, dict[str, Any]] = {
    "convnet": {},
    "convnetbn": {"norm": "batchnorm"},
}


def get_classifier(name: str, in_channels: int, num_classes: int, image_size: int, **kwargs: Any) -> nn.Module:
    """A classifier by registry name (``convnet``, ``convnetbn``), with keyword overrides."""
    key = name.lower()
    if key not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; known: {sorted(CLASSIFIERS)}")
    return ConvNet(in_channels, num_classes, image_size, **{**CLASSIFIERS[key], **kwargs})
