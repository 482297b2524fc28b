"""Classifiers for the matchers and for evaluation, sized from the input rather than assumed.

``ConvNet`` is the network of the dataset-distillation literature (conv3x3 -> norm -> activation -> pool, ``depth``
times, then a linear head), which MONAI does not provide. Its feature size comes from a dummy forward pass, so any
image size works; the reference code's shape bookkeeping treats 28 px as 32 px and breaks at 28 px RGB.

The cross-architecture backbones follow the evaluation pools of the literature at small image sizes: ``alexnet``
and ``vgg11`` (the distillation papers' small-image variants, with pooling skipped once the maps are 1 px, so 28 px
works), ``resnet18`` (torchvision's ResNet-18 with the CIFAR stem: 3x3 stride-1 conv, no max-pool), ``vit`` (MONAI's
ViT with a small patch) and ``densenet121`` (MONAI's, where the image is large enough).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["CLASSIFIERS", "AlexNet", "AvgPool2x2", "ConvNet", "VGG11", "get_classifier"]

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    # in place: each follows a conv or norm whose output nothing else reads, so the values and gradients are the
    # same and a 28 px ConvNet skips one activation-sized allocation per layer
    "relu": lambda: nn.ReLU(inplace=True),
    "leakyrelu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "sigmoid": nn.Sigmoid,
    "swish": nn.SiLU,
}


class AvgPool2x2(nn.AvgPool2d):
    """``nn.AvgPool2d(2, 2)`` with the same values (bit for bit, forward and backward), faster on the CPU.

    PyTorch's CPU kernel for channels-first average pooling is slow for its work; adding the four strided views of
    each 2x2 window does the same sums in the same order, 1.5x faster on a 28 px ConvNet's first activation map
    (``benchmarks/dm_speed.py --parts``), and adding them into one buffer saves three allocations the size of the
    output. Other memory formats and devices use the stock kernel.
    """

    def __init__(self) -> None:
        super().__init__(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.ndim != 4 or not x.is_contiguous() or min(x.shape[2:]) < 2:
            return super().forward(x)
        x = x[:, :, : x.shape[2] // 2 * 2, : x.shape[3] // 2 * 2]  # floor mode: an odd last row/column is dropped
        out = x[:, :, 0::2, 0::2] + x[:, :, 0::2, 1::2]
        out += x[:, :, 1::2, 0::2]
        out += x[:, :, 1::2, 1::2]
        return out.mul_(0.25)


POOLS: dict[str, Callable[[], nn.Module]] = {
    "avgpooling": AvgPool2x2,
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


class _FeatureClassifier(nn.Module):
    """``features`` then a linear head sized by a dummy forward pass; ``embed`` gives the flattened features."""

    def _finish(self, in_channels: int, num_classes: int, image_size: int) -> None:
        self.features.eval()
        with torch.no_grad():
            count = self.features(torch.zeros(1, in_channels, image_size, image_size)).numel()
        self.features.train()
        self.num_features = int(count)
        self.classifier = nn.Linear(self.num_features, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


class AlexNet(_FeatureClassifier):
    """The distillation papers' small-image AlexNet: conv5x5-128, conv5x5-192, conv3x3-256/192/192, three
    max-pools (skipped when the map is already 1 px), no normalisation unless ``norm`` is given."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, norm: str = "none") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size, channels = image_size, in_channels
        spec = [
            (128, 5, 4 if in_channels == 1 else 2, True),
            (192, 5, 2, True),
            (256, 3, 1, False),
            (192, 3, 1, False),
            (192, 3, 1, True),
        ]
        for width, kernel, padding, pool in spec:
            size = size + 2 * padding - kernel + 1
            layers += [nn.Conv2d(channels, width, kernel, padding=padding), _norm(norm, width, (size, size)), nn.ReLU()]
            if pool and size >= 2:
                layers.append(nn.MaxPool2d(2, 2))
                size //= 2
            channels = width
        self.features = nn.Sequential(*layers)
        self._finish(in_channels, num_classes, image_size)


class VGG11(_FeatureClassifier):
    """VGG-11 for small images: conv3x3 + instance norm (``norm``) + ReLU, max-pools skipped once maps are 1 px
    (then the norm is skipped too: normalising a single value per channel is degenerate)."""

    CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, in_channels: int, num_classes: int, image_size: int, norm: str = "instancenorm") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size, channels = image_size, in_channels
        for i, item in enumerate(self.CONFIG):
            if item == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2, 2))
                    size //= 2
                continue
            padding = 3 if i == 0 and in_channels == 1 else 1
            size = size + 2 * padding - 2
            # instance norm of a 1-px map is degenerate (every value becomes the bias): no norm there
            layers += [
                nn.Conv2d(channels, int(item), 3, padding=padding),
                _norm(norm if size > 1 else "none", int(item), (size, size)),
                nn.ReLU(),
            ]
            channels = int(item)
        self.features = nn.Sequential(*layers)
        self._finish(in_channels, num_classes, image_size)


def _resnet18(in_channels: int, num_classes: int, image_size: int, norm: str = "instancenorm") -> nn.Module:
    """torchvision's ResNet-18 with the small-image (CIFAR) stem; instance norm as GroupNorm(C, C) by default."""
    from torchvision.models import resnet18

    norm_layer = {"instancenorm": lambda c: nn.GroupNorm(c, c), "batchnorm": nn.BatchNorm2d}[norm]
    net = resnet18(num_classes=num_classes, norm_layer=norm_layer)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


class _ViT(nn.Module):
    """MONAI's ViT classifier returning logits only (it returns ``(logits, hidden_states)``)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        patch_size: int | None = None,
        hidden_size: int = 256,
        mlp_dim: int = 512,
        num_layers: int = 6,
        num_heads: int = 8,
        dropout_rate: float = 0.1,
    ) -> None:
        super().__init__()
        from monai.networks.nets import ViT

        patch = patch_size or max(p for p in (2, 4, 7, 8, 16) if image_size % p == 0 and image_size // p >= 2)
        self.net = ViT(
            in_channels=in_channels,
            img_size=(image_size, image_size),
            patch_size=(patch, patch),
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            classification=True,
            num_classes=num_classes,
            dropout_rate=dropout_rate,
            spatial_dims=2,
            post_activation="none",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


def _densenet121(in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    from monai.networks.nets import DenseNet121

    if image_size < 64:  # stem stride 4 and three 2x transitions: below 64 px the maps vanish
        raise ValueError(f"densenet121 needs images of at least 64 px, got {image_size}; use it with image_size 64")
    return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=num_classes)


CLASSIFIERS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    "convnet": (ConvNet, {}),
    "convnetbn": (ConvNet, {"norm": "batchnorm"}),
    "alexnet": (AlexNet, {}),
    "vgg11": (VGG11, {}),
    "resnet18": (_resnet18, {}),
    "vit": (_ViT, {}),
    "densenet121": (_densenet121, {}),
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
