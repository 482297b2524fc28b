"""The learnable distilled set: a parameterisation holds ``ipc`` slots per class and renders them to images through
a frozen generator (:class:`LatentCodes`, :class:`SLFDistribution`), or holds real images (:class:`RealImageSet`,
the ``random`` and ``full`` baselines)."""

from .base import LatentParameterization
from .codes import LatentCodes
from .real_images import BASELINES, RealImageSet
from .slfd import SLFDistribution

__all__ = ["BASELINES", "LatentCodes", "LatentParameterization", "RealImageSet", "SLFDistribution"]
