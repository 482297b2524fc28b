"""One image (channel-first, any dtype, any size) to uint8 ``(channels, size, size)`` with MONAI transforms."""

from __future__ import annotations

from collections import Counter

import numpy as np

# MONAI's transforms take seconds to import and a cached load needs none, so they are imported when an image is
# first preprocessed (this module itself is imported with the data package)

__all__ = ["Preprocess"]

# ITU-R BT.601 luma, the weights PIL's convert("L") uses, so a colour file read through MONAI and one read through
# PIL turn into the same grey image (MONAI has no colour-to-grey transform)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class Preprocess:
    """Convert channels, scale intensities to ``[0, 255]``, centre-crop to square and resize.

    * channels: grey -> RGB repeats the channel; RGB(A) -> grey is the BT.601 luma; an alpha channel is dropped.
    * intensity: uint8 images are kept as they are; any other dtype (16-bit, float) is scaled to ``[0, 255]`` by
      ``ScaleIntensity`` per image (``"minmax"``) or by ``ScaleIntensityRange`` from a fixed window ``[low, high]``
      (clipped), which keeps intensities comparable across images (e.g. a CT window).
    * geometry: ``CenterSpatialCrop`` to the shorter side when not square, then ``Resize`` to ``size`` (``area``
      when shrinking, which averages like an anti-aliasing filter; ``bilinear`` when enlarging).

    Each call returns the image and the notes of what it changed, so callers can count conversions.
    """

    def __init__(self, size: int, channels: int, intensity: str | list[float] = "minmax") -> None:
        from monai.transforms import Resize, ScaleIntensity, ScaleIntensityRange

        self.size, self.channels = int(size), int(channels)
        if intensity == "minmax":
            self.scale = ScaleIntensity(minv=0.0, maxv=255.0)
        else:
            low, high = intensity
            self.scale = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=255.0, clip=True)
        self.shrink = Resize((self.size, self.size), mode="area")
        self.enlarge = Resize((self.size, self.size), mode="bilinear", align_corners=False)
        self.converted: Counter[str] = Counter()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        out, notes = self.apply(image)
        self.converted.update(notes)
        return out

    def apply(self, image: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """``image`` ``(C, H, W)`` -> uint8 ``(channels, size, size)`` and notes such as ``"RGB to grey"``."""
        from monai.transforms import CenterSpatialCrop
        from monai.utils import convert_to_numpy

        notes: list[str] = []
        if image.ndim != 3:
            raise ValueError(f"expected a channel-first 2D image (C, H, W), got shape {image.shape}")
        finite = np.isfinite(image) if image.dtype.kind == "f" else None
        if finite is not None and not finite.all():
            # a min-max scale of an image with a NaN is NaN everywhere, which the cast to uint8 turns into a black
            # image without a word: refuse it instead
            bad = int(image.size - finite.sum())
            raise ValueError(
                f"the image holds {bad} NaN or infinite value(s) of {image.size}; replace them before distilling "
                "(e.g. numpy.nan_to_num(image, nan=background)), or leave the image out"
            )
        if image.dtype == np.uint8:
            x = image.astype(np.float32)
        else:
            notes.append(f"{image.dtype} scaled to 8 bits")
            x = convert_to_numpy(self.scale(image.astype(np.float32)), dtype=np.float32)
        c = x.shape[0]
        if c in (2, 4):  # grey + alpha, RGB + alpha: the alpha channel carries no image content
            x, c = x[: c - 1], c - 1
            notes.append("alpha dropped")
        if c != self.channels:
            if c == 1 and self.channels == 3:
                x = np.repeat(x, 3, axis=0)
                notes.append("grey to RGB")
            elif c == 3 and self.channels == 1:
                x = np.tensordot(_LUMA, x, axes=1)[None]
                notes.append("RGB to grey")
            else:
                raise ValueError(f"cannot convert an image with {image.shape[0]} channels to {self.channels}")
        h, w = x.shape[1:]
        if h != w:
            x = convert_to_numpy(CenterSpatialCrop((min(h, w), min(h, w)))(x))
            notes.append("cropped to square")
        if x.shape[1] != self.size:
            x = convert_to_numpy((self.shrink if x.shape[1] > self.size else self.enlarge)(x))
            notes.append("resized")
        return np.clip(np.rint(x), 0, 255).astype(np.uint8), notes

    def summary(self) -> str:
        return ", ".join(f"{n} {what}" for what, n in sorted(self.converted.items())) or "no conversion"
