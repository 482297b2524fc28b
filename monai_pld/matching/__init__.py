"""Matchers: compare synthetic with real images. ``DistributionMatcher`` (DM), ``GradientMatcher`` (DC with DSA),
``TrajectoryMatcher`` (MTT)."""

from __future__ import annotations

from .base import Matcher
from .distribution import DistributionMatcher
from .gradient import GradientMatcher
from .trajectory import TrajectoryMatcher

__all__ = ["DistributionMatcher", "GradientMatcher", "Matcher", "TrajectoryMatcher"]
