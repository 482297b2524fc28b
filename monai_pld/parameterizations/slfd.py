"""Stochastic latent feature distillation: every slot a low-rank Gaussian over latents, from one small network."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import LowRankMultivariateNormal, kl_divergence

from .base import LatentParameterization

__all__ = ["SLFDistribution"]


class SLFDistribution(LatentParameterization):
    """Per-slot low-rank Gaussians over latents, produced by a lightweight network shared by all slots and classes.

    For slot ``i`` of class ``c`` with code ``u_i`` (``(C, h, w)``, D = C*h*w)::

        h   = SiLU(conv3x3(SiLU(conv3x3(u_i)) + embedding(c)))          # hidden_channels maps of size (h, w)
        mu  = u_i + head_mu(h)                                          # head_mu starts at zero: mu == u at init
        d   = exp(clamp(head_logd(h), log_var_min, log_var_max))        # (D,)
        P   = head_P(h)                                                 # (rank*C, h, w) viewed as (D, rank)
        f_i ~ N(mu, P P^T + diag(d)),   f_i = mu + P eps_r + sqrt(d) * eps_D

    The heads are 1x1 convs. ``head_P``'s channels are rank-major: channels ``k*C .. k*C + C-1`` form factor column
    ``k``, flattened like the latents (channel, row, column). No D x D matrix is ever formed.

    Variants:

    * ``rank=0, diagonal=True``: a diagonal Gaussian. :meth:`distribution` then uses one fixed all-zero factor column
      (``LowRankMultivariateNormal`` needs one), so the KL and log-density code is the same for every variant.
    * ``rank>0, diagonal=False``: low-rank covariance plus a fixed, not learned, floor ``exp(log_var_min)`` on the
      diagonal (``LowRankMultivariateNormal`` needs ``cov_diag > 0``).
    * ``rank=0, diagonal=False``: deterministic (``sample`` returns ``mu``; :meth:`distribution` raises).

    Heads a variant does not use are not created, so every parameter receives a gradient (as DDP requires).

    Args:
        init_codes: ``(num_slots, C, h, w)`` initial codes ``u``, copied; the network is built with their dtype and
            device.
        labels: ``(num_slots,)`` integer class ids, sorted by class, the same number (``ipc``) for every class.
        num_classes: number of classes (size of the class embedding).
        rank: number of covariance factor columns ``r`` (0 allowed, see above).
        hidden_channels: channels of the network's two 3x3 convs.
        diagonal: learn a per-element variance ``d``; otherwise ``d`` is the fixed floor ``exp(log_var_min)``.
        log_var_min: lower clamp of ``log d`` (keeps the variance, and the capacitance matrix, well conditioned).
        log_var_max: upper clamp of ``log d`` (stops the variance from exploding under a pure matching loss).
        init_log_var: initial ``log d`` everywhere (bias of ``head_logd``; its weights start at zero).
        factor_init_std: std of the normal initialisation of ``head_P``'s weights (its bias starts at zero).
        class_prior: optional ``(means, variances)``, each ``(num_classes, C, h, w)``: a diagonal Gaussian per class
            (e.g. of the generator's encodings of the real images) used by :meth:`kl_to_prior`. Kept as
            non-persistent buffers: it summarises real images, so it stays out of the shared ``state_dict``.

    Raises:
        ValueError: when an argument is out of range or malformed (see messages).

    Example::

        slfd = SLFDistribution(generator.encode(images), labels, num_classes=9, rank=8)
        latents, syn_labels = slfd.sample(2, antithetic=True)
        images = generator.decode(latents)
    """

    prior_mean: Tensor | None
    prior_var: Tensor | None

    def __init__(
        self,
        init_codes: Tensor,
        labels: Tensor,
        num_classes: int,
        rank: int = 8,
        hidden_channels: int = 32,
        diagonal: bool = True,
        log_var_min: float = -9.0,
        log_var_max: float = 1.0,
        init_log_var: float = -4.0,
        factor_init_std: float = 0.02,
        class_prior: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        super().__init__(init_codes, labels, num_classes)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"'rank' must be an int >= 0 (0 = no covariance factor), got {rank!r}")
        if isinstance(hidden_channels, bool) or not isinstance(hidden_channels, int) or hidden_channels < 1:
            raise ValueError(f"'hidden_channels' must be a positive int, got {hidden_channels!r}")
        if not log_var_min < log_var_max:
            raise ValueError(
                f"'log_var_min' ({log_var_min}) must be smaller than 'log_var_max' ({log_var_max}); e.g. -9 and 1"
            )
        # outside the clamp range head_logd would get no gradient at all and never move
        if not log_var_min <= init_log_var <= log_var_max:
            raise ValueError(
                f"'init_log_var' ({init_log_var}) must lie in [log_var_min, log_var_max] = [{log_var_min}, "
                f"{log_var_max}]"
            )
        if not factor_init_std >= 0:
            raise ValueError(f"'factor_init_std' must be >= 0, got {factor_init_std!r}")
        self.rank = rank
        self.hidden_channels = hidden_channels
        self.diagonal = bool(diagonal)
        self.log_var_min = float(log_var_min)
        self.log_var_max = float(log_var_max)
        self._deterministic = rank == 0 and not self.diagonal

        channels = self.latent_shape[0]
        factory = {"device": init_codes.device, "dtype": init_codes.dtype}
        self.body_in = nn.Conv2d(channels, hidden_channels, 3, padding=1, **factory)
        self.class_embedding = nn.Embedding(num_classes, hidden_channels, **factory)
        self.body_out = nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1, **factory)
        self.activation = nn.SiLU()
        self.head_mu = nn.Conv2d(hidden_channels, channels, 1, **factory)
        nn.init.zeros_(self.head_mu.weight)
        nn.init.zeros_(self.head_mu.bias)
        self.head_logd: nn.Conv2d | None = None
        if self.diagonal:
            self.head_logd = nn.Conv2d(hidden_channels, channels, 1, **factory)
            nn.init.zeros_(self.head_logd.weight)
            nn.init.constant_(self.head_logd.bias, init_log_var)
        self.head_P: nn.Conv2d | None = None
        if rank > 0:
            self.head_P = nn.Conv2d(hidden_channels, channels * rank, 1, **factory)
            nn.init.normal_(self.head_P.weight, 0.0, factor_init_std)
            nn.init.zeros_(self.head_P.bias)

        prior_mean, prior_var = self._check_prior(class_prior, init_codes) if class_prior is not None else (None, None)
        self.register_buffer("prior_mean", prior_mean, persistent=False)
        self.register_buffer("prior_var", prior_var, persistent=False)

    def _check_prior(self, class_prior: tuple[Tensor, Tensor], init_codes: Tensor) -> tuple[Tensor, Tensor]:
        """Validate ``class_prior`` and return it as detached copies with the codes' dtype and device."""
        expected = (self.num_classes, *self.latent_shape)
        if not isinstance(class_prior, (tuple, list)) or len(class_prior) != 2:
            raise ValueError(f"'class_prior' must be a pair (means, variances), got {type(class_prior).__name__}")
        checked = []
        for name, value in zip(("means", "variances"), class_prior, strict=True):
            if not isinstance(value, Tensor) or tuple(value.shape) != expected:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"'class_prior' {name} must have shape (num_classes, C, h, w) = {expected}, got {got}; "
                    "compute one mean and variance per class over the encodings of its real images"
                )
            value = value.detach().to(device=init_codes.device, dtype=init_codes.dtype).clone()
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"'class_prior' {name} contain non-finite values")
            checked.append(value)
        if not bool((checked[1] > 0).all()):
            raise ValueError(
                f"'class_prior' variances must be > 0, got a minimum of {checked[1].min().item()}; "
                "add a small floor, e.g. variances.clamp_min(1e-6)"
            )
        return checked[0], checked[1]

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rank={self.rank}, diagonal={self.diagonal}, "
            f"log_var_range=({self.log_var_min}, {self.log_var_max}), class_prior={self.prior_mean is not None}"
        )

    def _slots(self, slots: Tensor | None) -> tuple[Tensor, Tensor]:
        return (self.codes, self.labels) if slots is None else (self.codes[slots], self.labels[slots])

    def _features(self, slots: Tensor | None = None) -> Tensor:
        codes, labels = self._slots(slots)
        hidden = self.activation(self.body_in(codes))
        hidden = hidden + self.class_embedding(labels)[:, :, None, None]
        return self.activation(self.body_out(hidden))

    def mean(self, slots: Tensor | None = None) -> Tensor:
        """``mu`` per slot, ``(num_slots, C, h, w)``, differentiable; ``slots``: only those slots'."""
        return self._slots(slots)[0] + self.head_mu(self._features(slots))

    def parameters_of_distribution(self, slots: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The Gaussian of every slot over its flattened latent, D = C*h*w.

        Args:
            slots: slot indices: only those slots' (the network is per slot, so they equal their rows of the whole).

        Returns:
            ``mu`` ``(num_slots, D)``, ``cov_factor`` ``(num_slots, D, r)`` and ``cov_diag`` ``(num_slots, D)``, all
            differentiable. With ``rank=0`` the factor is one all-zero column (``r=1``) when ``diagonal=True``, and
            empty (``r=0``) with a zero diagonal in the deterministic case, so that ``P P^T + diag(d)`` is always the
            covariance.
        """
        hidden = self._features(slots)
        codes = self._slots(slots)[0]
        num_slots = len(codes)
        mu = (codes + self.head_mu(hidden)).flatten(1)
        if self._deterministic:
            return mu, mu.new_zeros(num_slots, mu.shape[1], 0), torch.zeros_like(mu)
        if self.head_logd is not None:
            cov_diag = self.head_logd(hidden).clamp(self.log_var_min, self.log_var_max).exp().flatten(1)
        else:
            cov_diag = torch.full_like(mu, math.exp(self.log_var_min))
        if self.head_P is not None:
            cov_factor = self.head_P(hidden).view(num_slots, self.rank, -1).transpose(1, 2)
        else:
            cov_factor = mu.new_zeros(num_slots, mu.shape[1], 1)
        return mu, cov_factor, cov_diag

    def distribution(self) -> LowRankMultivariateNormal:
        """The slots' Gaussians as one ``LowRankMultivariateNormal`` (batch ``num_slots``, event D), differentiable.

        Raises:
            RuntimeError: for the deterministic variant (``rank=0, diagonal=False``), which has no Gaussian.
        """
        if self._deterministic:
            raise RuntimeError(
                "SLFDistribution(rank=0, diagonal=False) is deterministic and has no Gaussian; use mean() or "
                "sample(), or build it with rank > 0 or diagonal=True"
            )
        mu, cov_factor, cov_diag = self.parameters_of_distribution()
        # cov_diag > 0 holds by construction; validation would only add a pass over every tensor
        return LowRankMultivariateNormal(mu, cov_factor, cov_diag, validate_args=False)

    def _draw(self, n_per_slot: int, antithetic: bool, slots: Tensor | None = None) -> Tensor:
        return self._draw_from(n_per_slot, antithetic, slots, with_mean=False)

    def _draw_with_mean(self, n_per_slot: int, antithetic: bool, slots: Tensor | None = None) -> Tensor:
        # the means and the samples come from one pass of the network (the mean alone is a third of its cost)
        return self._draw_from(n_per_slot, antithetic, slots, with_mean=True)

    def _draw_from(self, n_per_slot: int, antithetic: bool, slots: Tensor | None, with_mean: bool) -> Tensor:
        if self._deterministic:
            mu = self.mean(slots).flatten(1)
            n = n_per_slot + 1 if with_mean else n_per_slot
            return mu.expand(n, *mu.shape).reshape(n, len(mu), *self.latent_shape)
        # The reparameterisation of LowRankMultivariateNormal.rsample (mu + P eps_r + sqrt(d) eps_D, the noise drawn
        # in its order and shapes, for every slot) written out: antithetic pairs need the noise itself, a subset of
        # the slots takes its part of the noise drawn for every slot, the means share the network's pass, and the
        # distribution's capacitance matrix, which sampling does not use, is never formed.
        mu, cov_factor, cov_diag = self.parameters_of_distribution(slots)
        draws = n_per_slot // 2 if antithetic else n_per_slot
        factory = {"device": mu.device, "dtype": mu.dtype}
        rank = cov_factor.shape[-1]
        eps_factor = None
        if self.head_P is not None or not antithetic:  # rsample draws a factor's noise always
            eps_factor = torch.empty(draws, self.num_slots, rank, **factory).normal_()
        eps = torch.empty(draws, self.num_slots, mu.shape[1], **factory).normal_()
        if slots is not None:
            eps = eps[:, slots]
            eps_factor = eps_factor[:, slots] if eps_factor is not None else None
        noise = cov_diag.sqrt() * eps
        if eps_factor is not None:
            noise = torch.einsum("bdr,nbr->nbd", cov_factor, eps_factor) + noise
        noise = torch.cat([noise, -noise]) if antithetic else noise
        latents = mu + noise
        if with_mean:
            latents = torch.cat([mu[None], latents])
        return latents.view(len(latents), len(mu), *self.latent_shape)

    @property
    def stochastic(self) -> bool:
        """Whether :meth:`sample` draws anything (every variant but ``rank=0, diagonal=False``)."""
        return not self._deterministic

    def kl_to_prior(self) -> Tensor:
        """Mean over slots of ``KL(slot Gaussian || its class prior) / D``; 0 without a prior or when deterministic.

        The deterministic variant has no Gaussian (a point mass has infinite KL), so it is not regularised.
        """
        if self.prior_mean is None or self._deterministic:
            return self.codes.new_zeros(())
        slots = self.distribution()
        prior_mean = self.prior_mean[self.labels].flatten(1)
        prior_var = self.prior_var[self.labels].flatten(1)
        prior = LowRankMultivariateNormal(
            prior_mean, prior_mean.new_zeros(*prior_mean.shape, 1), prior_var, validate_args=False
        )
        return kl_divergence(slots, prior).mean() / prior_mean.shape[1]
