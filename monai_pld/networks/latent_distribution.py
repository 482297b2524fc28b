"""Deprecated path, kept for one release: the parameterisations live in :mod:`monai_pld.parameterizations`."""

from monai_pld.parameterizations import LatentCodes, LatentParameterization, SLFDistribution

__all__ = ["LatentCodes", "LatentParameterization", "SLFDistribution"]
