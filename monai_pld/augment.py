"""Differentiable Siamese augmentation (DSA), batched over groups of samples that share one transform.

DSA augments real and synthetic images with the *same* random transform, so that matching compares like with like
while gradients flow to the synthetic pixels. The reference code draws one transform per class in a Python loop and
re-seeds the global RNG for every draw. Here one call takes ``groups`` (class labels): each group id gets one family
and one parameter set, drawn from a private generator seeded with ``seed``, and every sample of the group uses them.
Two calls with the same seed therefore apply the same transform to every sample of a class, whatever the number of
samples per class, and each family is applied once to all the samples that drew it.

MONAI's random transforms draw per sample, are not differentiable as a group, and kornia is not a dependency, which
is why this is written here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["FAMILIES", "DiffSiameseAugment"]

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")

# One row of uniforms per group id, one column per scalar a transform needs. Every group consumes the same number
# of draws and the generator fills the table row after row, so a group's row depends only on (seed, group id), not
# on how many groups a call has: a synthetic batch missing a class still agrees with the real batch on the others.
_COLUMNS = (
    "family",
    "brightness",
    "saturation",
    "contrast",
    "shift_row",
    "shift_col",
    "cutout_row",
    "cutout_col",
    "flip",
    "scale_x",
    "scale_y",
    "angle",
)
_COL = {name: k for k, name in enumerate(_COLUMNS)}


class DiffSiameseAugment:
    """Differentiable augmentation with one family and one parameter set per group of samples.

    Works on normalised images: zero (the mean colour) fills the pixels that translations, scalings, rotations and
    cutout uncover. Each group draws one family uniformly from the strategy (the reference's ``'S'`` mode).

    Args:
        strategy: family names joined by ``_``, from ``color``, ``crop``, ``cutout``, ``flip``, ``scale``,
            ``rotate``. Drop ``flip`` for digit-like data.
        brightness: ``x + (u - 0.5) * brightness``, ``u ~ U[0, 1)``.
        saturation: ``x <- (x - m) * u * saturation + m``, ``m`` the per-pixel channel mean (no-op on one channel).
        contrast: ``x <- (x - m) * (u + contrast) + m``, ``m`` the per-image mean.
        ratio_crop_pad: largest translation as a fraction of the side, in whole pixels.
        ratio_cutout: side of the zeroed square as a fraction of the side.
        prob_flip: probability of reversing the width axis.
        ratio_scale: per-axis scale factors drawn in ``[1 / ratio_scale, ratio_scale]``.
        ratio_rotate: rotation angle drawn in ``[-ratio_rotate, ratio_rotate]`` degrees.

    Raises:
        ValueError: for an empty strategy or an unknown family name.
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
        families = tuple(strategy.split("_")) if strategy else ()
        unknown = [name for name in families if name not in FAMILIES]
        if unknown or not families:
            raise ValueError(
                f"DSA strategy {strategy!r} has unknown families {unknown}; join names from {list(FAMILIES)} with "
                "'_', e.g. 'color_crop_cutout_flip_scale_rotate'"
            )
        if ratio_scale <= 0:
            raise ValueError(f"ratio_scale must be > 0, got {ratio_scale}; 1.0 disables scaling")
        self.families = families
        self.brightness, self.saturation, self.contrast = float(brightness), float(saturation), float(contrast)
        self.ratio_crop_pad, self.ratio_cutout = float(ratio_crop_pad), float(ratio_cutout)
        self.prob_flip, self.ratio_scale, self.ratio_rotate = float(prob_flip), float(ratio_scale), float(ratio_rotate)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(strategy={'_'.join(self.families)!r})"

    def __call__(self, x: torch.Tensor, seed: int, groups: torch.Tensor | None = None) -> torch.Tensor:
        """Augment a batch, one transform per group.

        Args:
            x: normalised images ``(N, C, H, W)``.
            seed: seed of the draw; equal seeds give equal transforms to equal group ids.
            groups: non-negative integer group id per sample ``(N,)``, e.g. class labels for the Siamese rule;
                ``None`` makes every sample its own group (per-sample augmentation, to train a classifier).

        Returns:
            The augmented images, same shape, differentiable with respect to ``x``.

        Raises:
            ValueError: when ``x`` is not 4-D or ``groups`` is not a non-negative integer vector of length ``N``.
        """
        if x.ndim != 4:
            raise ValueError(f"DSA expects images of shape (N, C, H, W), got {tuple(x.shape)}")
        n, _, h, w = x.shape
        if groups is None:
            groups = torch.arange(n, device=x.device)
        elif groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
            raise ValueError(f"DSA groups must be an integer tensor (e.g. class labels), got dtype {groups.dtype}")
        elif groups.shape != (n,):
            raise ValueError(f"DSA groups must have shape ({n},), one id per image, got {tuple(groups.shape)}")
        if n == 0:
            return x
        groups = groups.to(device=x.device, dtype=torch.long)
        if int(groups.min()) < 0:
            raise ValueError(f"DSA group ids must be >= 0 (class labels), got minimum {int(groups.min())}")
        params = {k: v.to(x.device)[groups] for k, v in self._draw(int(groups.max()) + 1, h, w, seed).items()}
        indices, pieces = [], []
        for k, name in enumerate(self.families):
            index = (params["family"] == k).nonzero().squeeze(1)
            if index.numel():
                indices.append(index)
                family_params = {key: value[index] for key, value in params.items()}
                pieces.append(getattr(self, f"_{name}")(x.index_select(0, index), family_params))
        # every sample drew exactly one family, so the concatenated indices are a permutation of 0..N-1
        return torch.cat(pieces).index_select(0, torch.argsort(torch.cat(indices)))

    def _draw(self, num_groups: int, h: int, w: int, seed: int) -> dict[str, torch.Tensor]:
        """Per-group-id family index and parameters of every family, on the CPU."""
        gen = torch.Generator().manual_seed(int(seed))
        # float64 so that floor(u * n) stays below n for integer draws
        u = torch.rand(num_groups, len(_COLUMNS), generator=gen, dtype=torch.float64)
        col = {name: u[:, k] for name, k in _COL.items()}
        shift = torch.tensor([int(h * self.ratio_crop_pad + 0.5), int(w * self.ratio_crop_pad + 0.5)])
        cut = torch.tensor([int(h * self.ratio_cutout + 0.5), int(w * self.ratio_cutout + 0.5)])
        shift_u = torch.stack([col["shift_row"], col["shift_col"]], 1)
        centre_u = torch.stack([col["cutout_row"], col["cutout_col"]], 1)
        # centre range as in the reference: one extra position for even sides so the square can reach either border
        centre_range = torch.tensor([h, w]) + 1 - cut % 2
        cutout_start = (centre_u * centre_range).long() - cut // 2
        low = 1 / self.ratio_scale
        return {
            "family": (col["family"] * len(self.families)).long(),
            "brightness": (col["brightness"] - 0.5) * self.brightness,
            "saturation": col["saturation"] * self.saturation,
            "contrast": col["contrast"] + self.contrast,
            "shift": (shift_u * (2 * shift + 1)).long() - shift,
            "cutout_start": cutout_start,
            "cutout_end": cutout_start + cut,
            "flip": col["flip"] < self.prob_flip,
            "scale": low + torch.stack([col["scale_x"], col["scale_y"]], 1) * (self.ratio_scale - low),
            "angle": (col["angle"] - 0.5) * 2 * math.radians(self.ratio_rotate),
        }

    @staticmethod
    def _color(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        def per_sample(v: torch.Tensor) -> torch.Tensor:
            return v.to(x.dtype).view(-1, 1, 1, 1)

        x = x + per_sample(p["brightness"])
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * per_sample(p["saturation"]) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * per_sample(p["contrast"]) + mean

    @staticmethod
    def _crop(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        # an exact whole-pixel translation by gathering, rather than resampling, so values are copied bit for bit
        n, c, h, w = x.shape
        rows = torch.arange(h, device=x.device) + p["shift"][:, :1]
        cols = torch.arange(w, device=x.device) + p["shift"][:, 1:]
        inside = ((rows >= 0) & (rows < h))[:, None, :, None] & ((cols >= 0) & (cols < w))[:, None, None, :]
        out = x.gather(2, rows.clamp(0, h - 1)[:, None, :, None].expand(n, c, h, w))
        out = out.gather(3, cols.clamp(0, w - 1)[:, None, None, :].expand(n, c, h, w))
        return out * inside.to(x.dtype)

    @staticmethod
    def _cutout(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        h, w = x.shape[2:]
        start, end = p["cutout_start"], p["cutout_end"]
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        in_rows = (rows >= start[:, :1]) & (rows < end[:, :1])
        in_cols = (cols >= start[:, 1:]) & (cols < end[:, 1:])
        inside = in_rows[:, None, :, None] & in_cols[:, None, None, :]
        return x * (~inside).to(x.dtype)

    @staticmethod
    def _flip(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.where(p["flip"].view(-1, 1, 1, 1), x.flip(3), x)

    @staticmethod
    def _resample(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        # align_corners=False as in the DM reference code; zero padding fills with the mean colour
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _scale(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        theta = torch.diag_embed(p["scale"])
        return self._resample(x, torch.cat([theta, theta.new_zeros(len(x), 2, 1)], 2))

    def _rotate(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        cos, sin, zero = torch.cos(p["angle"]), torch.sin(p["angle"]), torch.zeros_like(p["angle"])
        theta = torch.stack([torch.stack([cos, sin, zero], 1), torch.stack([-sin, cos, zero], 1)], 1)
        return self._resample(x, theta)
