"""Matchers: compare synthetic with real images. ``DistributionMatcher`` (DM)."""

from .base import Matcher
from .distribution import DistributionMatcher

__all__ = ["DistributionMatcher", "Matcher"]
