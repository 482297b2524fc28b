"""Distribution matching (DM): match per-class mean embeddings under a freshly drawn random network."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from monai_pld import distributed
from monai_pld.augment import DiffSiameseAugment
from monai_pld.matching.base import Matcher
from monai_pld.networks.classifiers import get_classifier
from monai_pld.utils import derive_seed

__all__ = ["DistributionMatcher"]

_REAL_DTYPES = ("float32", "bfloat16")
ESTIMATORS = ("pooled", "unbiased")
KERNELS = ("linear", "gaussian")
# bandwidths of the gaussian kernel, as multiples of the median squared distance between the step's real embeddings
_BANDWIDTHS = (0.25, 1.0, 4.0)


# compiled embeddings by architecture and device; module level, so no template network enters a state_dict
_COMPILED: dict[tuple, Callable] = {}


class _Embed(nn.Module):
    """A network whose ``forward`` is its ``embed``, for ``torch.func.functional_call``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embed(x)


# "auto" chunking: images whose first activation map takes about this much, within [_MIN_CHUNK, _MAX_CHUNK]
_CHUNK_BYTES, _MIN_CHUNK, _MAX_CHUNK, _DEFAULT_CHUNK = 8 << 20, 4, 256, 16

# last part of derive_seed(seed, step, part): keeps the embedder's and the augmentation's streams apart
_EMBEDDER_STREAM, _AUGMENT_STREAM = 0, 1


class DistributionMatcher(Matcher):
    """DM loss ``sum_c || mean_i phi(A(x_real,c,i)) - mean_j phi(A(x_syn,c,j)) ||^2``.

    The squared distance is summed over features and over the classes present in both sets, not averaged, as in the
    reference, whose image learning rates assume this scale. ``phi`` is the ``embed`` of a randomly initialised
    network (ConvNet by default, frozen, train mode), re-drawn every step from a seed derived from ``(seed, step)``,
    so a resumed run sees the same networks. ``A`` is DSA with one transform per class shared by the real and the
    synthetic images. Each set goes through the embedder in one call; real embeddings carry no graph.

    Args:
        in_channels: image channels.
        num_classes: number of classes.
        image_size: side of the square images.
        mean: per-channel mean used to normalise ``[0, 1]`` inputs (default 0.5).
        std: per-channel std (default 0.5).
        seed: base seed of the embedders and augmentations.
        dsa_strategy: DSA families joined by ``_``; ``None`` or ``""`` disables augmentation.
        embedder: classifier registry name of the embedder (see :func:`~monai_pld.networks.get_classifier`).
        embedder_kwargs: its constructor arguments (``width``, ``depth``, ``norm``...).
        embed_chunk: images per embedder call; ``"auto"`` (default) picks the number whose first activation map
            takes about 8 MiB (20 images at 28 px with the default ConvNet), ``0`` embeds each set in one call.
        real_dtype: ``float32`` (default) or ``bfloat16``: autocast dtype of the real images' embedding, which needs
            no gradient. bfloat16 pays only on hardware with bfloat16 arithmetic (recent GPUs, CPUs with AVX-512
            BF16 or AMX); on CPUs without it, it is many times slower.
        channels_last: run the embedder in the channels-last memory format (faster on some GPUs; slower on the
            CPUs measured).
        compile: run the embedder through ``torch.compile`` (inductor), with the random weights of each step passed
            as inputs so that one compiled graph serves every step. The first step takes a while longer (about 30 s
            per graph on a CPU, and a C++ compiler must be installed); later steps embed the real images about a
            third faster on the CPUs measured, so it pays on long runs.
        estimator: ``"pooled"`` (default): each class's synthetic mean is taken over all its images, the reference's
            loss. ``"unbiased"``: for samples of a distribution, which come in two independent halves (``syn_groups``
            of :meth:`loss`), the loss is ``sum_c <r_c - a_c, r_c - b_c>`` with ``a_c``, ``b_c`` the two halves'
            class means and ``r_c`` the real one. Its expectation is the squared distance between the real mean and
            the *expected* synthetic mean, so the spread of the samples is not penalised; the pooled loss adds the
            variance of the synthetic mean, which pushes every slot's distribution towards a point. Without groups
            (deterministic sets) both estimators are the pooled loss.
        std_weight: weight of a second term that compares the per-class *spread* of the embeddings:
            ``std_weight * sum_c || sd_i phi(A(x_real,c,i)) - sd_j phi(A(x_syn,c,j)) ||^2`` with per-feature standard
            deviations (Bessel-corrected; classes with fewer than two synthetic images contribute only their mean
            term). 0 (default) is the reference's loss. The mean term alone is blind to how a class's images spread
            around their mean, and it penalises the spread of a distribution's samples; the spread term gives a
            probabilistic set's variance a target, the real images' spread. Pooled estimator only.
        kernel: ``"linear"`` (default): the loss above, which is the squared maximum mean discrepancy (MMD) of the
            class's embeddings under the linear kernel. ``"gaussian"``: the squared MMD under a sum of Gaussian
            kernels ``exp(-|u - v|^2 / (b * m))`` with ``b`` in (0.25, 1, 4) and ``m`` the median squared distance
            between the step's real embeddings, ``sum_c [mean k(r, r') - 2 mean k(r, s) + mean k(s, s')]``. It compares
            whole distributions, not only their means: the last term grows when a class's synthetic images crowd
            together, so a set (or a distribution's samples) is rewarded for covering the real spread. Each of the
            three terms is in ``[0, 3]``, so the loss is on another scale than the linear one (Adam, the default
            optimiser, does not care). The whole loss needs every image's embedding, so under ``torchrun`` it is not
            split among the ranks (each computes it). Pooled estimator, ``std_weight`` 0.

    Raises:
        ValueError: for inconsistent sizes or statistics, an unknown DSA family, or an embedder that cannot be built.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int = 0,
        dsa_strategy: str | None = "color_crop_cutout_flip_scale_rotate",
        embedder: str = "convnet",
        embedder_kwargs: dict[str, Any] | None = None,
        embed_chunk: int | str = "auto",
        real_dtype: str = "float32",
        channels_last: bool = False,
        compile: bool = False,
        estimator: str = "pooled",
        std_weight: float = 0.0,
        kernel: str = "linear",
    ) -> None:
        super().__init__(in_channels, num_classes, image_size, mean, std, seed)
        if estimator not in ESTIMATORS:
            raise ValueError(f"DM estimator must be one of {list(ESTIMATORS)}, got {estimator!r}")
        self.estimator = estimator
        if isinstance(std_weight, bool) or not isinstance(std_weight, int | float) or not std_weight >= 0:
            raise ValueError(f"DM std_weight must be a number >= 0 (0: means only), got {std_weight!r}")
        if std_weight and estimator != "pooled":
            raise ValueError("DM std_weight needs the pooled estimator; set estimator to 'pooled' or std_weight to 0")
        self.std_weight = float(std_weight)
        if kernel not in KERNELS:
            raise ValueError(f"DM kernel must be one of {list(KERNELS)}, got {kernel!r}")
        if kernel != "linear" and (estimator != "pooled" or std_weight):
            raise ValueError(
                f"DM kernel {kernel!r} compares whole distributions: use it with estimator 'pooled' and std_weight 0"
            )
        self.kernel = kernel
        self.augment = DiffSiameseAugment(dsa_strategy) if dsa_strategy else None
        self.embedder_name = embedder
        self.embedder_kwargs = dict(embedder_kwargs or {})
        if real_dtype not in _REAL_DTYPES:
            raise ValueError(f"DM real_dtype must be one of {list(_REAL_DTYPES)}, got {real_dtype!r}")
        self.real_dtype = real_dtype
        self.channels_last = bool(channels_last)
        self.compile = bool(compile)
        net = self.build_embedder(0, torch.device("cpu"))  # a bad name or argument fails here, not at the first step
        self.batch_dependent = any(isinstance(m, _BatchNorm) for m in net.modules())
        # per-image embeddings summed per class can be shared among ranks; batch statistics cannot
        self.class_split = None if self.batch_dependent or kernel != "linear" else "samples"
        self.embed_chunk = self._resolve_chunk(embed_chunk, net)

    def _resolve_chunk(self, embed_chunk: int | str, net: nn.Module) -> int:
        """Images per embedder call (0: one call), from the setting and the embedder's first activation map."""
        if embed_chunk == "auto":
            if self.batch_dependent:
                return 0
            first = net.features[0] if hasattr(net, "features") else None
            if not isinstance(first, nn.Conv2d):
                return _DEFAULT_CHUNK
            per_image = first.out_channels * self.image_size**2 * 4  # bytes of one float32 activation map
            return max(_MIN_CHUNK, min(_MAX_CHUNK, _CHUNK_BYTES // per_image))
        if isinstance(embed_chunk, bool) or not isinstance(embed_chunk, int) or embed_chunk < 0:
            raise ValueError(
                f"DM embed_chunk must be 'auto', 0 (one call) or a positive number of images, got {embed_chunk!r}"
            )
        return 0 if self.batch_dependent else int(embed_chunk)

    def hyper_parameters(self) -> dict[str, Any]:
        return {
            **super().hyper_parameters(),
            "embed_chunk": self.embed_chunk,
            "real_dtype": self.real_dtype,
            "channels_last": self.channels_last,
            "compile": self.compile,
            "estimator": self.estimator,
            "std_weight": self.std_weight,
            "kernel": self.kernel,
        }

    def _compiled_embed(self, net: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """``net.embed`` through one compiled graph per embedder architecture and device type, which takes the
        weights as inputs (shared by every matcher of the process, so a new run does not compile again)."""
        device = next(net.parameters()).device
        key = (
            self.embedder_name,
            repr(sorted(self.embedder_kwargs.items())),
            self.in_channels,
            self.num_classes,
            self.image_size,
            device.type,
            self.channels_last,
        )
        if key not in _COMPILED:
            template = _Embed(self.build_embedder(0, device))

            def embed(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
                return torch.func.functional_call(template, state, (x,))

            _COMPILED[key] = torch.compile(embed, dynamic=False)
        state = {f"net.{name}": value for name, value in (*net.named_parameters(), *net.named_buffers())}
        return partial(_COMPILED[key], state)

    def _embed(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``net.embed`` of ``x``, ``embed_chunk`` images at a time."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        embed = self._compiled_embed(net) if self.compile else net.embed
        if not self.embed_chunk or len(x) <= self.embed_chunk:
            return embed(x)
        return torch.cat([embed(part) for part in x.split(self.embed_chunk)])

    def build_embedder(self, step: int, device: torch.device | str) -> nn.Module:
        """The random embedder of ``step``: the same network whenever it is asked for.

        It is initialised on the CPU inside a forked RNG (only the CPU generator is re-seeded, never a CUDA one), so
        the caller's global RNG state is untouched, then moved to ``device``.

        Args:
            step: iteration number.
            device: where the network goes.

        Returns:
            The network, frozen (``requires_grad`` off) and in train mode, as in the reference.
        """
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(derive_seed(self.seed, step, _EMBEDDER_STREAM))
            net = get_classifier(
                self.embedder_name, self.in_channels, self.num_classes, self.image_size, **self.embedder_kwargs
            )
        net = net.to(device).requires_grad_(False).train()
        return net.to(memory_format=torch.channels_last) if self.channels_last else net

    def _class_sums(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class sums of the features ``(num_classes, F)`` (zero for absent classes) and per-class counts."""
        sums = features.new_zeros(self.num_classes, features.shape[1]).index_add(0, labels, features)
        return sums, torch.bincount(labels, minlength=self.num_classes)

    @staticmethod
    def _over_ranks(
        real_sum: torch.Tensor, real_count: torch.Tensor, syn_sum: torch.Tensor, syn_count: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every rank's per-class sums and counts summed, in one all-reduce. The synthetic sums keep the gradient
        of this rank's own features only: the other ranks' part is a constant here and differentiated on its own
        rank, so the ranks' gradients add up to the single-process one."""
        f = real_sum.shape[1]
        local = torch.cat([real_sum, real_count[:, None], syn_sum.detach(), syn_count[:, None]], 1)
        total = distributed.all_reduce_sum(local.to(real_sum.dtype))
        syn_sum = syn_sum + (total[:, f + 1 : 2 * f + 1] - syn_sum.detach())
        return total[:, :f], total[:, f].round().long(), syn_sum, total[:, -1].round().long()

    def loss(
        self,
        syn_images: torch.Tensor,
        syn_labels: torch.Tensor,
        real_images: torch.Tensor,
        real_labels: torch.Tensor,
        step: int,
        across_ranks: bool = False,
        syn_groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """DM loss of one step; classes missing from either set contribute nothing.

        Args:
            syn_images: synthetic images ``(M, C, H, W)`` in ``[0, 1]``.
            syn_labels: their integer labels ``(M,)``.
            real_images: real images ``(N, C, H, W)`` in ``[0, 1]``, on the device of the synthetic ones.
            real_labels: their integer labels ``(N,)``.
            step: iteration number, which selects the embedder and the augmentation.
            across_ranks: the images are this rank's share of the step's images (under ``torchrun``): the per-class
                sums and counts are summed over the ranks before the means are compared, so every rank gets the
                loss of the whole step, and the gradient of its own synthetic images in it.
            syn_groups: for ``estimator="unbiased"``: ``(M,)`` integers, 0 or 1 for the two independent halves of
                the samples, 2 for images in both (e.g. the slots' means); ignored by the pooled estimator.

        Returns:
            Scalar loss, differentiable with respect to ``syn_images``.

        Raises:
            ValueError: for images, labels or groups of the wrong shape, dtype, device or range.
        """
        self.check_sets(syn_images, syn_labels, real_images, real_labels)
        paired = self.estimator == "unbiased" and syn_groups is not None
        if paired and (
            tuple(syn_groups.shape) != (len(syn_images),) or not bool(((syn_groups >= 0) & (syn_groups <= 2)).all())
        ):
            raise ValueError(
                f"syn_groups must hold one value in {{0, 1, 2}} per synthetic image ({len(syn_images)}), "
                f"got shape {tuple(syn_groups.shape)}"
            )
        if across_ranks and self.kernel != "linear":
            raise ValueError(f"DM kernel {self.kernel!r} is computed whole on every rank: call it without across_ranks")
        syn_labels, real_labels = syn_labels.long(), real_labels.long()
        net = self.build_embedder(step, syn_images.device)
        dsa_seed = derive_seed(self.seed, step, _AUGMENT_STREAM)
        with torch.no_grad():
            real = self.normalize(real_images)
            if self.augment is not None:
                real = self.augment(real, dsa_seed, groups=real_labels)
            with torch.autocast(real.device.type, dtype=torch.bfloat16, enabled=self.real_dtype == "bfloat16"):
                features = self._embed(net, real)
            features = features.float()
            if self.std_weight:  # second moments ride along with the sums (and their all-reduce), in float64:
                features = self._with_squares(features)  # the variance is their difference with the squared mean
            real_sum, real_count = self._class_sums(features, real_labels)
        syn = self.normalize(syn_images)
        if self.augment is not None:
            syn = self.augment(syn, dsa_seed, groups=syn_labels)
        syn_features = self._embed(net, syn)
        if self.kernel == "gaussian":
            return self._gaussian_mmd(features, real_labels, syn_features, syn_labels).to(syn.dtype)
        if self.std_weight:
            syn_features = self._with_squares(syn_features)
        if not paired:
            halves = [self._class_sums(syn_features, syn_labels)]
        else:
            picks = [(syn_groups == half) | (syn_groups == 2) for half in (0, 1)]
            halves = [self._class_sums(syn_features[pick], syn_labels[pick]) for pick in picks]
        if across_ranks:
            reduced = [self._over_ranks(real_sum, real_count, *half) for half in halves]
            real_sum, real_count = reduced[0][:2]
            halves = [r[2:] for r in reduced]
        real_mean = real_sum / real_count.clamp_min(1).unsqueeze(1).to(real_sum.dtype)
        present = real_count > 0
        residuals = []
        for syn_sum, syn_count in halves:
            residuals.append(real_mean - syn_sum / syn_count.clamp_min(1).unsqueeze(1).to(syn_sum.dtype))
            present = present & (syn_count > 0)
        if self.std_weight:
            (syn_sum, syn_count), width = halves[0], real_sum.shape[1] // 2
            residual = residuals[0][:, :width]
            spread = self._std(syn_sum, syn_count, width) - self._std(real_sum, real_count, width)
            both = present & (real_count > 1) & (syn_count > 1)
            loss = (residual.square().sum(1) * present.to(residual.dtype)).sum()
            return (loss + self.std_weight * (spread.square().sum(1) * both.to(spread.dtype)).sum()).to(syn.dtype)
        # pooled: |r - s|^2; unbiased: <r - a, r - b>, whose expectation over independent halves is |r - E s|^2
        return ((residuals[0] * residuals[-1]).sum(1) * present.to(real_mean.dtype)).sum()

    def _gaussian_mmd(
        self, real: torch.Tensor, real_labels: torch.Tensor, syn: torch.Tensor, syn_labels: torch.Tensor
    ) -> torch.Tensor:
        """``sum_c MMD^2`` of the class's real and synthetic embeddings under the multi-bandwidth Gaussian kernel,
        over the classes present in both (the biased estimate: every pair, an image with itself included).
        Written here because the kernel two-sample statistics of common libraries (e.g. torchmetrics' KID)
        use polynomial kernels on fixed features and give no per-class sum."""
        with torch.no_grad():  # the bandwidth is a statistic of the real embeddings: a constant of the step
            dist = torch.pdist(real).square()
            scale = dist.median() if len(dist) else real.new_ones(())
            scale = scale.clamp_min(torch.finfo(real.dtype).tiny)

        def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            # squared distances without a square root, whose gradient at an image's distance to itself is undefined
            d = (a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * a @ b.T).clamp_min(0)
            return sum(torch.exp(-d / (width * scale)) for width in _BANDWIDTHS)

        present = torch.bincount(real_labels, minlength=self.num_classes) > 0
        present &= torch.bincount(syn_labels, minlength=self.num_classes) > 0
        # a class's mean of a kernel matrix is w_a^T K w_b with w the one-hot columns divided by the class counts
        wr = nn.functional.one_hot(real_labels, self.num_classes).to(real.dtype)
        ws = nn.functional.one_hot(syn_labels, self.num_classes).to(syn.dtype)
        wr, ws = wr / wr.sum(0).clamp_min(1), ws / ws.sum(0).clamp_min(1)
        with torch.no_grad():
            rr = (wr * (kernel(real, real) @ wr)).sum(0)
        rs = (wr * (kernel(real, syn) @ ws)).sum(0)
        ss = (ws * (kernel(syn, syn) @ ws)).sum(0)
        return ((rr - 2 * rs + ss) * present.to(ss.dtype)).sum()

    @staticmethod
    def _with_squares(features: torch.Tensor) -> torch.Tensor:
        """``[features, features^2]`` in float64 (float32 sums of squares lose the variance of a few close images)."""
        features = features.double()
        return torch.cat([features, features.square()], 1)

    @staticmethod
    def _std(sums: torch.Tensor, counts: torch.Tensor, width: int) -> torch.Tensor:
        """Per-class, per-feature standard deviations (Bessel-corrected) from the sums of the features (first
        ``width`` columns) and of their squares (the rest); a small floor keeps the square root differentiable."""
        n = counts.unsqueeze(1).to(sums.dtype)
        mean = sums[:, :width] / n.clamp_min(1)
        var = (sums[:, width:] - n * mean.square()) / (n - 1).clamp_min(1)
        return (var.clamp_min(0) + 1e-8).sqrt()
