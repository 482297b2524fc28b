"""Deprecated path, kept for one release: :class:`RealImageSet` lives in :mod:`monai_pld.parameterizations`."""

from monai_pld.parameterizations import BASELINES, RealImageSet

__all__ = ["BASELINES", "RealImageSet"]
