"""Matchers: compare synthetic with real images. ``DistributionMatcher`` (DM)."""

from __future__ import annotations

from .base import Matcher
from .distribution import DistributionMatcher

__all__ = ["DistributionMatcher", "Matcher"]
