"""Deterministic latent codes: the GLaD-style ``latent`` parameterisation (``pixel`` with an identity generator)."""

from __future__ import annotations

from torch import Tensor

from .base import LatentParameterization

__all__ = ["LatentCodes"]


class LatentCodes(LatentParameterization):
    """Deterministic codes (the GLaD-style ``latent`` baseline; with an identity generator, the classic ``pixel`` one).

    ``sample`` returns the codes repeated ``n_per_slot`` times and draws no random numbers.

    Args:
        init_codes: ``(num_slots, C, h, w)`` initial codes, copied into the ``codes`` parameter.
        labels: ``(num_slots,)`` integer class ids, sorted by class, the same number (``ipc``) for every class.
        num_classes: number of classes.

    Raises:
        ValueError: when the codes or labels are malformed.

    Example::

        codes = LatentCodes(generator.encode(images), labels, num_classes=9)
        latents, syn_labels = codes.sample()
    """

    def mean(self, slots: Tensor | None = None) -> Tensor:
        """The codes, ``(num_slots, C, h, w)`` (the parameter itself); ``slots``: only those slots'."""
        return self.codes if slots is None else self.codes[slots]

    def _draw(self, n_per_slot: int, antithetic: bool, slots: Tensor | None = None) -> Tensor:
        codes = self.mean(slots)
        return codes.expand(n_per_slot, *codes.shape)
