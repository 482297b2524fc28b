"""Learnable parameterisations of a distilled set in a generator's latent space.

A distilled set has ``num_classes * ipc`` *slots*, sorted by class. Each slot owns a code ``u_i`` of shape
``(C, h, w)`` (the generator's ``latent_shape``); a frozen generator turns latents into images. Two
parameterisations share one API (:class:`LatentParameterization`):

* :class:`LatentCodes`: the codes themselves, deterministic (the GLaD-style ``latent`` baseline; with an identity
  generator, the classic ``pixel`` one).
* :class:`SLFDistribution`: every slot is a low-rank Gaussian ``N(mu_i, P_i P_i^T + diag(d_i))`` over its flattened
  latent (D = C*h*w), whose ``mu_i``, ``P_i`` and ``d_i`` come from a lightweight network shared by all slots and
  classes (Stochastic Latent Feature Distillation; see docs/architecture.md).

Both are ``nn.Module`` s whose ``state_dict`` is the whole distilled set (slots, labels and network), loadable with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LatentParameterization", "SAMPLE_MODES"]

SAMPLE_MODES = ("mean", "sample")


def _check_slots(init_codes: Tensor, labels: Tensor, num_classes: int) -> int:
    """Validate slot codes and labels and return the number of slots per class (ipc).

    Raises:
        ValueError: when the codes are not a floating 4-D tensor, the labels are not integer class ids in range, one
            per code, or the slots are not sorted by class with the same number per class.
    """
    if not isinstance(init_codes, Tensor) or init_codes.ndim != 4 or not init_codes.is_floating_point():
        got = type(init_codes).__name__
        if isinstance(init_codes, Tensor):
            got = f"{init_codes.dtype} tensor of shape {tuple(init_codes.shape)}"
        raise ValueError(
            f"'init_codes' must be a floating-point tensor (num_slots, C, h, w), got a {got}; "
            "stack one latent per slot, e.g. generator.encode(images) or torch.randn(n, *generator.latent_shape)"
        )
    num_slots = init_codes.shape[0]
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(
            f"'labels' must be a 1-D integer tensor of class ids, got {labels!r:.80}; "
            "e.g. torch.arange(num_classes).repeat_interleave(ipc)"
        )
    if labels.shape[0] != num_slots:
        raise ValueError(
            f"'labels' has {labels.shape[0]} entries but 'init_codes' has {num_slots} slots; give one label per slot"
        )
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"'num_classes' must be a positive int, got {num_classes!r}")
    if num_slots == 0:
        raise ValueError("'init_codes' has no slots; give at least one slot per class")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"'labels' must lie in [0, {num_classes - 1}] for num_classes={num_classes}, got values in "
            f"[{labels.min().item()}, {labels.max().item()}]; check 'num_classes' or the label mapping"
        )
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes)
    if not bool((counts == counts[0]).all()):
        raise ValueError(
            f"every class needs the same number of slots (ipc), got per-class counts {counts.tolist()}; "
            "draw exactly ipc initial codes for every class"
        )
    ipc = int(counts[0])
    expected = torch.arange(num_classes).repeat_interleave(ipc)
    if not torch.equal(labels.long().cpu(), expected):
        raise ValueError(
            f"'labels' must be sorted by class ({ipc} slots of class 0, then of class 1, ...), got "
            f"{labels.tolist()!s:.120}; sort the slots with torch.argsort(labels, stable=True)"
        )
    return ipc


class LatentParameterization(nn.Module):
    """Common base: learnable slot codes with class labels, sampled into latents and rendered into images.

    Subclasses implement :meth:`mean` and :meth:`_draw`; sampling, seeded latents and rendering are shared.

    Args:
        init_codes: ``(num_slots, C, h, w)`` initial codes, copied into the ``codes`` parameter.
        labels: ``(num_slots,)`` integer class ids, sorted by class, the same number (``ipc``) for every class.
        num_classes: number of classes.

    Raises:
        ValueError: when the codes or labels are malformed (see messages).
    """

    labels: Tensor

    def __init__(self, init_codes: Tensor, labels: Tensor, num_classes: int) -> None:
        super().__init__()
        self.ipc = _check_slots(init_codes, labels, num_classes)
        self.num_classes = num_classes
        self.latent_shape: tuple[int, int, int] = tuple(init_codes.shape[1:])
        self.codes = nn.Parameter(init_codes.detach().clone())
        self.register_buffer("labels", labels.detach().to(device=init_codes.device, dtype=torch.long).clone())

    @property
    def num_slots(self) -> int:
        """Number of slots, ``num_classes * ipc``."""
        return self.codes.shape[0]

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, ipc={self.ipc}, latent_shape={self.latent_shape}"

    def mean(self, slots: Tensor | None = None) -> Tensor:  # pragma: no cover - interface
        """Most likely latent per slot, ``(num_slots, C, h, w)``, differentiable; ``slots``: only those slots."""
        raise NotImplementedError

    def _draw(self, n_per_slot: int, antithetic: bool, slots: Tensor | None = None) -> Tensor:  # pragma: no cover
        """Reparameterised latents ``(n_per_slot, num_slots, C, h, w)``; the arguments are already validated.
        ``slots``: those slots' part of the draw for every slot (the same noise, the others' left unused)."""
        raise NotImplementedError

    def _draw_with_mean(self, n_per_slot: int, antithetic: bool, slots: Tensor | None = None) -> Tensor:
        """The means, then :meth:`_draw`'s latents: ``(1 + n_per_slot, num_slots, C, h, w)``; a parameterisation
        whose mean and samples share work overrides it to compute that work once."""
        mean = self.mean(slots)
        return torch.cat([mean[None], self._draw(n_per_slot, antithetic, slots)])

    def sample(
        self, n_per_slot: int = 1, antithetic: bool = False, slots: Tensor | None = None, with_mean: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Draw latents for every slot, differentiably (reparameterisation), from the global RNG.

        Args:
            n_per_slot: samples per slot.
            antithetic: draw ``n_per_slot / 2`` noise vectors and use each with both signs: sample ``k`` and sample
                ``k + n_per_slot / 2`` of a slot are mirror images around its mean (variance reduction).
            slots: slot indices: only these slots' latents, equal (up to rounding) to their part of the draw for
                every slot from the same RNG state (a rank's share under ``torchrun``); ``None``: every slot.
            with_mean: put every slot's mean (:meth:`mean`) before its samples; the samples are those drawn
                without it (up to rounding).

        Returns:
            ``latents`` of shape ``(n * num_slots, C, h, w)`` and ``labels`` of shape ``(n * num_slots,)``,
            ``n = n_per_slot (+ 1 with the means)``, sample-major: all slots' means (``with_mean``), then all
            slots' first sample, then all slots' second sample, ...

        Raises:
            ValueError: when ``n_per_slot`` is not a positive int, or is odd with ``antithetic=True``.
        """
        if not isinstance(n_per_slot, int) or n_per_slot < 1:
            raise ValueError(f"'n_per_slot' must be a positive int, got {n_per_slot!r}")
        if antithetic and n_per_slot % 2:
            raise ValueError(
                f"antithetic sampling uses +eps/-eps pairs, so 'n_per_slot' must be even, got {n_per_slot}; "
                "use an even number of samples per slot or antithetic=False"
            )
        draw = self._draw_with_mean if with_mean else self._draw
        n = n_per_slot + 1 if with_mean else n_per_slot
        if slots is None:
            latents = draw(n_per_slot, antithetic)
            return latents.reshape(n * self.num_slots, *self.latent_shape), self.labels.repeat(n)
        slots = torch.as_tensor(slots, dtype=torch.long, device=self.codes.device)
        latents = draw(n_per_slot, antithetic, slots)
        return latents.reshape(n * len(slots), *self.latent_shape), self.labels[slots].repeat(n)

    def kl_to_prior(self) -> Tensor:
        """Regulariser of the slots towards a class prior; 0 for parameterisations without one."""
        return self.codes.new_zeros(())

    @torch.no_grad()
    def latents(self, mode: str = "mean", seed: int = 0) -> tuple[Tensor, Tensor]:
        """One latent per slot, detached: the mean, or one sample drawn with a fixed seed.

        ``mode="sample"`` seeds a forked RNG (CPU and the module's CUDA device), so the global RNG state is untouched
        and the same seed always gives the same latents.

        Args:
            mode: ``"mean"`` or ``"sample"``.
            seed: seed of the sample (ignored for ``"mean"``).

        Returns:
            ``latents`` ``(num_slots, C, h, w)`` and ``labels`` ``(num_slots,)``.

        Raises:
            ValueError: when ``mode`` is unknown.
        """
        if mode == "mean":
            latents, labels = self.mean(), self.labels
        elif mode == "sample":
            device = self.codes.device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                latents, labels = self.sample(1)
        else:
            raise ValueError(f"'mode' must be one of {SAMPLE_MODES}, got {mode!r}")
        # the mean of LatentCodes is the parameter itself: hand out a copy, never a view into the distilled set
        return latents.detach().clone(), labels.clone()

    @torch.no_grad()
    def render(self, generator, mode: str = "mean", seed: int = 0, chunk_size: int = 256) -> tuple[Tensor, Tensor]:
        """Images of one latent per slot (see :meth:`latents`), decoded in chunks to bound the generator's memory.

        Args:
            generator: object with ``decode(f) -> images``, on the same device as this module.
            mode: ``"mean"`` or ``"sample"``.
            seed: seed of the sample (ignored for ``"mean"``).
            chunk_size: latents decoded per generator call.

        Returns:
            ``images`` ``(num_slots, *image_shape)`` clamped to ``[0, 1]`` and ``labels`` ``(num_slots,)``.

        Raises:
            ValueError: when ``mode`` is unknown or ``chunk_size`` is not a positive int.
        """
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"'chunk_size' must be a positive int, got {chunk_size!r}")
        latents, labels = self.latents(mode, seed)
        images = torch.cat([generator.decode(chunk).clamp(0.0, 1.0) for chunk in latents.split(chunk_size)])
        return images, labels
