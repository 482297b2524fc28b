"""Differentiable Siamese augmentation (DSA), batched over groups of samples that share one transform.

DSA augments real and synthetic images with the *same* random transform so that matching compares like with like,
while gradients flow to the synthetic pixels. The reference draws one transform per class in a Python loop; here
a call takes ``groups`` (e.g. class labels): every sample of a group gets the same family and parameters, drawn
per group id from a private generator seeded by ``seed``. Two calls with the same seed, the same ``num_groups`` and
the group ids of their samples therefore apply identical per-class transforms, whatever the number of samples per
class, in one batched pass per family. Families and parameter ranges follow the DSA paper's defaults.

MONAI's random transforms act per sample and are not differentiable as a group, and kornia is not a dependency,
which is why this is written here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["DiffSiameseAugment", "FAMILIES"]

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


class DiffSiameseAugment:
    """Differentiable augmentation with one family and one parameter set per group.

    Args:
        strategy: families joined by ``_`` (``color_crop_cutout_flip_scale_rotate``); one is chosen per group,
            uniformly. Drop ``flip`` for digit-like data.
        brightness: additive shift range, ``x + (u - 0.5) * brightness``.
        saturation: ``x <- (x - channel mean) * u * saturation + channel mean``.
        contrast: ``x <- (x - image mean) * (u + contrast) + image mean``.
        ratio_crop_pad: maximum translation as a fraction of the size (zero fill).
        ratio_cutout: side of the zeroed square as a fraction of the size.
        prob_flip: probability of a horizontal flip.
        ratio_scale: per-axis scale factors in ``[1/ratio, ratio]``.
        ratio_rotate: rotation range in degrees, ``[-ratio, ratio]``.
    """

    def __init__(
        self,
        strategy: str = "color_crop_cutout_flip_scale_rotate",
        brightness: float = 1.0,
        saturation: float = 2.0,
        contrast: float = 0.5,
        ratio_crop_pad: float = 0.125,
        ratio_cutout: float = 0.5,
        prob_flip: float = 0.5,
        ratio_scale: float = 1.2,
        ratio_rotate: float = 15.0,
    ) -> None:
        families = tuple(t for t in strategy.split("_") if t)
        unknown = [t for t in families if t not in FAMILIES]
        if unknown or not families:
            raise ValueError(f"unknown DSA families {unknown} in strategy {strategy!r}; valid: {list(FAMILIES)}")
        self.families = families
        self.brightness, self.saturation, self.contrast = brightness, saturation, contrast
        self.ratio_crop_pad, self.ratio_cutout, self.prob_flip = ratio_crop_pad, ratio_cutout, prob_flip
        self.ratio_scale, self.ratio_rotate = ratio_scale, ratio_rotate

    def _draw(self, num_groups: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Family index and every family's parameters for each group id, always drawn in the same order."""
        g = num_groups
        family = torch.randint(len(self.families), (g,), generator=gen)
        shift = int(size * self.ratio_crop_pad + 0.5)
        cut = int(size * self.ratio_cutout + 0.5)
        params = {
            "brightness": (torch.rand(g, generator=gen) - 0.5) * self.brightness,
            "saturation": torch.rand(g, generator=gen) * self.saturation,
            "contrast": torch.rand(g, generator=gen) + self.contrast,
            "shift": torch.randint(-shift, shift + 1, (g, 2), generator=gen).float(),
            "cutout_centre": torch.randint(0, size + (1 - cut % 2), (g, 2), generator=gen),
            "flip": torch.rand(g, generator=gen) < self.prob_flip,
            "scale": 1 / self.ratio_scale + torch.rand(g, 2, generator=gen) * (self.ratio_scale - 1 / self.ratio_scale),
            "angle": (torch.rand(g, generator=gen) - 0.5) * 2 * math.radians(self.ratio_rotate),
        }
        return family, params

    def __call__(
        self, x: torch.Tensor, seed: int, groups: torch.Tensor | None = None, num_groups: int | None = None
    ) -> torch.Tensor:
        """Augment ``x`` ``(N, C, H, W)``.

        Args:
            x: images (normalised: zero is the fill value of translations and cutout).
            seed: seed of the parameter draw; equal seeds give equal transforms per group id.
            groups: int ``(N,)`` group id per sample (class labels for the Siamese rule); ``None`` = one group per
                sample (per-sample augmentation, as when training a classifier).
            num_groups: size of the parameter table; give the same value in calls that must agree (e.g. the
                number of classes). Default ``max(groups) + 1``.
        """
        n, _, h, w = x.shape
        groups = torch.arange(n, device=x.device) if groups is None else groups.to(x.device).long()
        if groups.shape != (n,) or (n and groups.min() < 0):
            raise ValueError(f"groups must be non-negative ints of shape ({n},), got {tuple(groups.shape)}")
        size = int(groups.max()) + 1 if n else 0
        num_groups = size if num_groups is None else int(num_groups)
        if num_groups < size:
            raise ValueError(f"num_groups {num_groups} is smaller than the largest group id + 1 ({size})")
        gen = torch.Generator().manual_seed(int(seed))
        family, params = self._draw(num_groups, h, gen)
        sample_family = family.to(x.device)[groups]
        out = x
        for k, name in enumerate(self.families):
            index = (sample_family == k).nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            ids = groups[index].cpu()
            p = {key: value[ids].to(x.device) for key, value in params.items()}
            out = out.index_copy(0, index, getattr(self, f"_{name}")(x.index_select(0, index), p))
        return out

    @staticmethod
    def _color(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        x = x + p["brightness"].view(-1, 1, 1, 1).to(x.dtype)
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * p["saturation"].view(-1, 1, 1, 1).to(x.dtype) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * p["contrast"].view(-1, 1, 1, 1).to(x.dtype) + mean

    @staticmethod
    def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    def _crop(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        h, w = x.shape[2:]
        theta = torch.zeros(len(x), 2, 3, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        # whole-pixel shifts: with align_corners=True one pixel is 2 / (size - 1) in grid units
        theta[:, 0, 2] = p["shift"][:, 0] * 2 / max(w - 1, 1)
        theta[:, 1, 2] = p["shift"][:, 1] * 2 / max(h - 1, 1)
        return self._affine(x, theta)

    def _cutout(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        h, w = x.shape[2:]
        cut = int(h * self.ratio_cutout + 0.5)
        start = (p["cutout_centre"] - cut // 2).clamp(min=0)
        end = (p["cutout_centre"] - cut // 2 + cut).clamp(max=h)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        inside = (rows >= start[:, 0, None, None]) & (rows < end[:, 0, None, None])
        inside = inside & (cols >= start[:, 1, None, None]) & (cols < end[:, 1, None, None])
        return x * (~inside).unsqueeze(1).to(x.dtype)

    @staticmethod
    def _flip(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.where(p["flip"].view(-1, 1, 1, 1), x.flip(3), x)

    def _scale(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        theta = torch.zeros(len(x), 2, 3, device=x.device)
        theta[:, 0, 0] = p["scale"][:, 0]
        theta[:, 1, 1] = p["scale"][:, 1]
        return self._affine(x, theta)

    def _rotate(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        cos, sin = torch.cos(p["angle"]), torch.sin(p["angle"])
        theta = torch.stack(
            [torch.stack([cos, sin, torch.zeros_like(cos)], 1), torch.stack([-sin, cos, torch.zeros_like(cos)], 1)], 1
        )
        return self._affine(x, theta)
