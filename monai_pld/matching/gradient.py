"""Gradient matching (DC) with differentiable Siamese augmentation: make the synthetic set's training gradients
look like the real data's, on networks that are themselves trained on the synthetic set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from monai_pld.augment import DiffSiameseAugment
from monai_pld.matching.base import Matcher
from monai_pld.networks.classifiers import get_classifier
from monai_pld.utils import derive_seed

__all__ = ["REFERENCE_LOOPS", "GradientMatcher", "gradient_distance"]

# (outer, inner) loops per IPC of the reference: outer matching steps per network, inner epochs between them
REFERENCE_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
DISTANCES = ("ours", "mse", "cos")
_NET_STREAM, _AUGMENT_STREAM, _INNER_STREAM = 0, 1, 2


def _rows(g: torch.Tensor) -> torch.Tensor:
    """A gradient as rows of one output unit each: conv (out, in*kh*kw), linear as is, 3-D (C, rest)."""
    return g.reshape(g.shape[0], -1)


def gradient_distance(syn: Sequence[torch.Tensor], real: Sequence[torch.Tensor], kind: str = "ours") -> torch.Tensor:
    """Distance between two lists of parameter gradients.

    ``ours`` (the reference's layer-wise distance): for every gradient with 2 or more dimensions, the sum over
    output units of ``1 - cos(g_syn_row, g_real_row)`` (with ``1e-6`` added to the norm product); 1-D gradients
    (biases, normalisation affine parameters) contribute nothing. ``mse``: squared distance of the concatenated
    gradients. ``cos``: ``1 -`` cosine of the concatenated gradients.
    """
    if kind == "ours":
        total = syn[0].new_zeros(())
        for gs, gr in zip(syn, real, strict=True):
            if gs.ndim < 2:
                continue
            a, b = _rows(gs), _rows(gr)
            cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-6)
            total = total + (1 - cos).sum()
        return total
    a = torch.cat([g.reshape(-1) for g in syn])
    b = torch.cat([g.reshape(-1) for g in real])
    if kind == "mse":
        return (a - b).pow(2).sum()
    if kind == "cos":
        return 1 - (a * b).sum() / (a.norm() * b.norm() + 1e-6)
    raise ValueError(f"'distance' must be one of {list(DISTANCES)}, got {kind!r}")


class GradientMatcher(Matcher):
    """DC loss ``sum_c D(grad_theta CE(net(A(x_syn,c))), grad_theta CE(net(A(x_real,c))))``.

    The trainer calls :meth:`loss` once per iteration ``step`` (1, 2, ...), which is one *outer* step of the
    reference: with loops ``(outer, inner)``, step ``t`` is outer step ``(t - 1) % outer`` of cycle
    ``(t - 1) // outer``. The first step of a cycle re-draws the network from ``(seed, cycle)``; every other step
    first trains it for ``inner`` epochs (SGD ``lr_net``, batches of ``batch_train``, per-sample DSA) on the
    synthetic images it receives, which are the ones updated by the previous step, as in the reference. The
    network is a submodule, so the matcher's ``state_dict`` (and every checkpoint) carries it and a resumed run
    continues mid-cycle exactly.

    Batch-norm networks (``convnetbn``): before matching, ``bn_real_per_class`` real images per class go through
    the network in train mode to set the batch statistics, which are then frozen (eval mode) for the matching.

    Args:
        in_channels, num_classes, image_size, mean, std, seed: see :class:`Matcher`.
        dsa_strategy: DSA families joined by ``_``; ``None`` or ``""`` disables augmentation.
        model: classifier registry name of the matched network.
        model_kwargs: its constructor arguments (``width``, ``depth``, ``norm``...).
        ipc: images per class, which selects the reference loops.
        loops: ``reference`` (by ``ipc``: 1 -> (1, 1), 10 -> (10, 50), 20 -> (20, 25), 30 -> (30, 20),
            40 -> (40, 15), 50 -> (50, 10)), ``glad`` ((1, 1) for every IPC: cheap) or an explicit ``(outer, inner)``.
        lr_net: SGD learning rate of the inner training.
        batch_train: inner-training batch size.
        distance: ``ours`` (reference), ``mse`` or ``cos``.
        bn_real_per_class: real images per class that set the batch-norm statistics.

    Raises:
        ValueError: for an unknown distance, bad loops (naming ``loops``/``ipc``), or a model that cannot be built.
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
        model: str = "convnet",
        model_kwargs: dict[str, Any] | None = None,
        ipc: int | None = None,
        loops: str | Sequence[int] = "reference",
        lr_net: float = 0.01,
        batch_train: int = 256,
        distance: str = "ours",
        bn_real_per_class: int = 16,
    ) -> None:
        super().__init__(in_channels, num_classes, image_size, mean, std, seed)
        if distance not in DISTANCES:
            raise ValueError(f"'distance' must be one of {list(DISTANCES)}, got {distance!r}")
        if loops == "reference":
            if ipc not in REFERENCE_LOOPS:
                raise ValueError(
                    f"the reference DC loops are defined for ipc in {sorted(REFERENCE_LOOPS)}, got ipc={ipc!r}; "
                    "use loops='glad' (1 outer, 1 inner) or an explicit pair, e.g. --dc_loops [10,20]"
                )
            self.outer, self.inner = REFERENCE_LOOPS[ipc]
        elif loops == "glad":
            self.outer, self.inner = 1, 1
        elif isinstance(loops, Sequence) and not isinstance(loops, str) and len(loops) == 2:
            self.outer, self.inner = (int(v) for v in loops)
            if self.outer < 1 or self.inner < 0:
                raise ValueError(f"'loops' needs outer >= 1 and inner >= 0, got {tuple(loops)}")
        else:
            raise ValueError(f"'loops' must be 'reference', 'glad' or (outer, inner), got {loops!r}")
        if lr_net <= 0 or batch_train < 1 or bn_real_per_class < 1:
            raise ValueError(
                f"'lr_net' must be > 0, 'batch_train' and 'bn_real_per_class' >= 1; got {lr_net}, {batch_train}, "
                f"{bn_real_per_class}"
            )
        self.augment = DiffSiameseAugment(dsa_strategy) if dsa_strategy else None
        self.dsa_strategy = dsa_strategy or ""
        self.model_name, self.model_kwargs = model, dict(model_kwargs or {})
        self.loops_setting = loops if isinstance(loops, str) else [int(v) for v in loops]
        self.lr_net, self.batch_train, self.distance = float(lr_net), int(batch_train), distance
        self.bn_real_per_class = int(bn_real_per_class)
        self.net = self._fresh_net(0)
        self.net.requires_grad_(True)

    def _fresh_net(self, cycle: int) -> nn.Module:
        """The network of ``cycle``, initialised on the CPU in a forked RNG so the global RNG is untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(derive_seed(self.seed, cycle, _NET_STREAM))
            return get_classifier(
                self.model_name, self.in_channels, self.num_classes, self.image_size, **self.model_kwargs
            )

    def hyper_parameters(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "loops": self.loops_setting,
            "outer_loop": self.outer,
            "inner_loop": self.inner,
            "lr_net": self.lr_net,
            "batch_train": self.batch_train,
            "distance": self.distance,
            "model": self.model_name,
            "model_kwargs": self.model_kwargs,
            "dsa_strategy": self.dsa_strategy,
        }

    def _has_batchnorm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.net.modules())

    def _train_inner(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> None:
        """``inner`` epochs of plain SGD on the (detached) synthetic set, per-sample DSA, seeded by ``step``."""
        self.net.train()
        optimizer = torch.optim.SGD(self.net.parameters(), lr=self.lr_net)
        x_all = self.normalize(images.detach())
        for epoch in range(self.inner):
            gen = torch.Generator().manual_seed(derive_seed(self.seed, step, _INNER_STREAM, epoch))
            order = torch.randperm(len(x_all), generator=gen).to(x_all.device)
            for b, index in enumerate(order.split(self.batch_train)):
                x = x_all[index]
                if self.augment is not None:
                    x = self.augment(x, derive_seed(self.seed, step, _INNER_STREAM, epoch, b + 1))
                loss = F.cross_entropy(self.net(x), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

    def loss(
        self,
        syn_images: torch.Tensor,
        syn_labels: torch.Tensor,
        real_images: torch.Tensor,
        real_labels: torch.Tensor,
        step: int,
    ) -> torch.Tensor:
        """DC loss of one outer step; classes missing from either set contribute nothing.

        Args:
            syn_images: synthetic images ``(M, C, H, W)`` in ``[0, 1]``.
            syn_labels: their integer labels ``(M,)``.
            real_images: real images ``(N, C, H, W)`` in ``[0, 1]``, on the device of the synthetic ones.
            real_labels: their integer labels ``(N,)``.
            step: iteration number (1-based), which places the step in the outer loop and seeds DSA.

        Returns:
            Scalar loss, differentiable with respect to ``syn_images`` (through the gradients: double backward).

        Raises:
            ValueError: for images or labels of the wrong shape, dtype, device or label range.
        """
        self.check_sets(syn_images, syn_labels, real_images, real_labels)
        if step < 1:
            raise ValueError(f"DC steps are numbered from 1, got {step}")
        syn_labels, real_labels = syn_labels.long(), real_labels.long()
        cycle, outer_step = divmod(step - 1, self.outer)
        self.net.to(syn_images.device)
        if outer_step == 0:
            self.net.load_state_dict(self._fresh_net(cycle).state_dict())
        elif self.inner > 0:
            self._train_inner(syn_images, syn_labels, step)
        real = self.normalize(real_images)
        syn = self.normalize(syn_images)
        if self._has_batchnorm():
            self.net.train()
            with torch.no_grad():  # batch statistics from a few real images per class, then frozen
                picks = [
                    (real_labels == c).nonzero().squeeze(1)[: self.bn_real_per_class] for c in range(self.num_classes)
                ]
                self.net(real[torch.cat(picks)])
            self.net.eval()
        else:
            self.net.train()
        if self.augment is not None:
            dsa_seed = derive_seed(self.seed, step, _AUGMENT_STREAM)
            with torch.no_grad():
                real = self.augment(real, dsa_seed, groups=real_labels)
            syn = self.augment(syn, dsa_seed, groups=syn_labels)
        params = [p for p in self.net.parameters() if p.requires_grad]
        total = syn_images.new_zeros(())
        # One class at a time, as the reference: each class needs its own parameter gradient, and the synthetic one
        # keeps its graph for the double backward.
        for c in range(self.num_classes):
            r_index = (real_labels == c).nonzero().squeeze(1)
            s_index = (syn_labels == c).nonzero().squeeze(1)
            if r_index.numel() == 0 or s_index.numel() == 0:
                continue
            real_loss = F.cross_entropy(self.net(real[r_index]), real_labels[r_index])
            g_real = [g.detach() for g in torch.autograd.grad(real_loss, params)]
            syn_loss = F.cross_entropy(self.net(syn[s_index]), syn_labels[s_index])
            g_syn = torch.autograd.grad(syn_loss, params, create_graph=True)
            total = total + gradient_distance(g_syn, g_real, self.distance)
        self.net.train()
        return total
