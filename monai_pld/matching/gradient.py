"""Gradient matching (DC) with differentiable Siamese augmentation: make the training gradients of the synthetic
images look like those of the real ones, on a network that is itself trained on the synthetic images."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from monai_pld.augment import DiffSiameseAugment
from monai_pld.matching.base import Matcher
from monai_pld.networks.classifiers import get_classifier
from monai_pld.utils import derive_seed

__all__ = ["DISTANCES", "REFERENCE_LOOPS", "GradientMatcher", "gradient_distance"]

# (outer, inner) per images-per-class in the reference: matching steps per network, training epochs between them
REFERENCE_LOOPS: dict[int, tuple[int, int]] = {
    1: (1, 1),
    10: (10, 50),
    20: (20, 25),
    30: (30, 20),
    40: (40, 15),
    50: (50, 10),
}
DISTANCES = ("ours", "mse", "cos")
# middle part of derive_seed(seed, ..., stream, ...): keeps the random streams of the matcher apart
_NET_STREAM, _AUGMENT_STREAM, _INNER_STREAM = 0, 1, 2


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def gradient_distance(syn: Sequence[torch.Tensor], real: Sequence[torch.Tensor], kind: str = "ours") -> torch.Tensor:
    """Distance between two lists of parameter gradients, paired by position.

    ``ours`` is the reference's layer-wise distance. Every gradient with two or more dimensions is viewed as one row
    per output unit (conv ``(out, in, kh, kw)`` -> ``(out, in*kh*kw)``, linear as is, 3-D ``(C, rest)``) and adds
    ``sum_rows 1 - <g_syn, g_real> / (|g_syn| |g_real| + 1e-6)``; 1-D and 0-D gradients (biases, normalisation
    affine parameters) add nothing. Because of the ``1e-6``, identical gradients give a small positive value, and
    a row that is zero in either list adds 1. ``mse`` is the squared distance and ``cos`` one minus the cosine
    (same ``1e-6``) of the concatenated flattened gradients, biases included.

    Args:
        syn: gradients of the synthetic loss.
        real: gradients of the real loss, same shapes in the same order.
        kind: ``ours``, ``mse`` or ``cos``.

    Returns:
        A scalar in the dtype of ``syn``; zero for ``ours`` when no gradient has two dimensions.

    Raises:
        ValueError: for an unknown ``kind``, lists of different lengths or gradients of different shapes.
    """
    if kind not in DISTANCES:
        raise ValueError(f"'distance' must be one of {list(DISTANCES)}, got {kind!r}")
    if len(syn) != len(real) or not syn:
        raise ValueError(f"gradient lists must be non-empty and of one length, got {len(syn)} and {len(real)}")
    for k, (gs, gr) in enumerate(zip(syn, real, strict=True)):
        if gs.shape != gr.shape:
            raise ValueError(f"gradient {k} has shape {tuple(gs.shape)} (synthetic) but {tuple(gr.shape)} (real)")
    if kind == "ours":
        total = syn[0].new_zeros(())
        for gs, gr in zip(syn, real, strict=True):
            if gs.ndim < 2:
                continue
            a, b = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
            cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-6)
            total = total + (1 - cos).sum()
        return total
    a = torch.cat([g.reshape(-1) for g in syn])
    b = torch.cat([g.reshape(-1) for g in real])
    if kind == "mse":
        return (a - b).pow(2).sum()
    return 1 - (a * b).sum() / (a.norm() * b.norm() + 1e-6)


class GradientMatcher(Matcher):
    """DC loss ``sum_c D(grad_theta CE(net(A(x_syn,c))), grad_theta CE(net(A(x_real,c))))``.

    The sum runs over the classes present in both sets; ``D`` is :func:`gradient_distance`; ``A`` is DSA with one
    transform per class, shared by the real and the synthetic images of the class (one seed per step). The real
    gradients are constants; the synthetic ones keep their graph, so the loss back-propagates to the synthetic
    pixels through a double backward. Each class takes one forward and backward pass per set: on a CPU this beat
    ``torch.func.vmap`` over the classes (about 3 s against 5 s per step for 9 classes of 10 synthetic and 64 real
    images, 28 px, ConvNet width 128, one thread).

    The trainer calls :meth:`loss` once per iteration ``step`` (1, 2, ...), which is one *outer* step of the
    reference. With loops ``(outer, inner)``, step ``t`` is outer step ``o = (t - 1) % outer`` of cycle
    ``(t - 1) // outer``. At ``o == 0`` the network is re-initialised from a seed derived from ``(seed, cycle)``;
    at ``o > 0`` it is first trained for ``inner`` epochs (plain SGD ``lr_net``, shuffled batches of
    ``batch_train``, per-sample DSA) on the synthetic images of this call, which are the ones the previous step
    updated: the reference's "train the network after every outer step but the last". The network and the number
    of the last step are the matcher's state: a ``state_dict`` taken after any step and loaded into a new matcher
    gives the same later losses, and steps within a cycle must follow each other.

    The network's parameters never require grad, so optimisers built from the matcher's parameters (MTT's learnt
    learning rate) leave them alone; gradients are taken with respect to detached copies.

    Batch-norm networks (``convnetbn``): before matching, ``bn_real_per_class`` real images per class (not
    augmented) go through the network in train mode, which updates the running statistics; the batch-norm layers
    then match in eval mode, with those statistics frozen, and return to train mode for the inner training.

    Args:
        in_channels: image channels.
        num_classes: number of classes.
        image_size: side of the square images.
        mean: per-channel mean used to normalise ``[0, 1]`` inputs (default 0.5).
        std: per-channel std (default 0.5).
        seed: base seed of the networks, augmentations and inner-training batches.
        dsa_strategy: DSA families joined by ``_``; ``None`` or ``""`` disables augmentation.
        model: classifier registry name of the network (see :func:`~monai_pld.networks.get_classifier`).
        model_kwargs: its constructor arguments (``width``, ``depth``, ``norm``...).
        ipc: images per class; selects the loops when ``loops="reference"``, recorded otherwise.
        loops: ``"reference"`` (by ``ipc``: 1 -> (1, 1), 10 -> (10, 50), 20 -> (20, 25), 30 -> (30, 20),
            40 -> (40, 15), 50 -> (50, 10); other IPCs are rejected, as in the reference), ``"glad"`` ((1, 1) for
            every IPC: a fresh network every step, never trained) or an explicit ``(outer, inner)`` pair with
            ``outer >= 1`` and ``inner >= 0``.
        lr_net: learning rate of the inner SGD.
        batch_train: inner-training batch size.
        distance: ``"ours"`` (the reference's layer-wise distance), ``"mse"`` or ``"cos"``.
        bn_real_per_class: real images per class that set the batch-norm statistics (batch-norm networks only).

    Raises:
        ValueError: naming the argument, for an unknown distance, loops the reference does not define for ``ipc``,
            a bad loop pair, a non-positive ``lr_net``/``batch_train``/``bn_real_per_class``, an unknown DSA family,
            or a model that cannot be built.
    """

    class_split = "terms"  # per-class terms, but the inner network trains on the whole synthetic set

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
        if ipc is not None and not (_is_int(ipc) and ipc >= 1):
            raise ValueError(f"'ipc' must be an integer >= 1 or None, got {ipc!r}")
        self.outer, self.inner = self._resolve_loops(loops, ipc)
        self.loops_rule = loops if isinstance(loops, str) else "explicit"
        if isinstance(lr_net, bool) or not isinstance(lr_net, numbers.Real) or not math.isfinite(lr_net) or lr_net <= 0:
            raise ValueError(f"'lr_net' must be a finite number > 0, got {lr_net!r}")
        if not (_is_int(batch_train) and batch_train >= 1):
            raise ValueError(f"'batch_train' must be an integer >= 1, got {batch_train!r}")
        if not (_is_int(bn_real_per_class) and bn_real_per_class >= 1):
            raise ValueError(f"'bn_real_per_class' must be an integer >= 1, got {bn_real_per_class!r}")
        self.ipc = None if ipc is None else int(ipc)
        self.lr_net, self.batch_train, self.distance = float(lr_net), int(batch_train), distance
        self.bn_real_per_class = int(bn_real_per_class)
        self.dsa_strategy = dsa_strategy or ""
        self.augment = DiffSiameseAugment(dsa_strategy) if dsa_strategy else None
        self.model_name, self.model_kwargs = model, dict(model_kwargs or {})
        self.net = self.build_network(0)  # a bad name or argument fails here, not at the first step
        self.register_buffer("last_step", torch.zeros((), dtype=torch.long))

    @staticmethod
    def _resolve_loops(loops: str | Sequence[int], ipc: int | None) -> tuple[int, int]:
        if isinstance(loops, str):
            if loops == "glad":
                return 1, 1
            if loops != "reference":
                raise ValueError(f"'loops' must be 'reference', 'glad' or a pair (outer, inner), got {loops!r}")
            if ipc not in REFERENCE_LOOPS:
                raise ValueError(
                    f"loops='reference' is defined for 'ipc' in {sorted(REFERENCE_LOOPS)}, got ipc={ipc!r}; pass "
                    "loops='glad' (one matching step per fresh network) or an explicit pair (outer, inner), e.g. "
                    "the one of the nearest listed ipc"
                )
            return REFERENCE_LOOPS[ipc]
        pair = tuple(loops) if isinstance(loops, Sequence) else ()
        if len(pair) != 2 or not all(_is_int(v) for v in pair) or pair[0] < 1 or pair[1] < 0:
            raise ValueError(
                f"'loops' must be 'reference', 'glad' or a pair (outer, inner) of integers with outer >= 1 and "
                f"inner >= 0, got {loops!r}"
            )
        return int(pair[0]), int(pair[1])

    def build_network(self, cycle: int) -> nn.Module:
        """The freshly initialised network of ``cycle``: the same one whenever it is asked for.

        It is built on the CPU inside a forked RNG (only the CPU generator is re-seeded), so the caller's global RNG
        state is untouched.

        Args:
            cycle: index of the outer loop, ``(step - 1) // outer``.

        Returns:
            The network on the CPU, in train mode, its parameters not requiring grad.
        """
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(derive_seed(self.seed, cycle, _NET_STREAM))
            net = get_classifier(
                self.model_name, self.in_channels, self.num_classes, self.image_size, **self.model_kwargs
            )
        return net.requires_grad_(False).train()

    def hyper_parameters(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "ipc": self.ipc,
            "loops": [self.outer, self.inner],
            "loops_rule": self.loops_rule,
            "lr_net": self.lr_net,
            "batch_train": self.batch_train,
            "distance": self.distance,
            "model": self.model_name,
            "model_kwargs": self.model_kwargs,
            "dsa_strategy": self.dsa_strategy,
            "bn_real_per_class": self.bn_real_per_class,
        }

    def _batchnorms(self) -> list[nn.Module]:
        return [m for m in self.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def _param_gradients(
        self, x: torch.Tensor, y: torch.Tensor, params: dict[str, torch.Tensor], create_graph: bool
    ) -> tuple[torch.Tensor, ...]:
        """Gradients of the cross-entropy of the network on ``(x, y)`` with respect to the leaf tensors ``params``
        (zeros for parameters the forward does not use)."""
        loss = F.cross_entropy(functional_call(self.net, params, (x,)), y)
        return torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, materialize_grads=True)

    def _train_inner(self, images: torch.Tensor, labels: torch.Tensor, step: int) -> None:
        """``inner`` epochs of plain SGD on the detached synthetic set, in train mode, with per-sample DSA."""
        names, params = zip(*self.net.named_parameters(), strict=True)
        x_all = self.normalize(images.detach())
        self.net.train()
        for epoch in range(self.inner):
            gen = torch.Generator().manual_seed(derive_seed(self.seed, step, _INNER_STREAM, epoch))
            order = torch.randperm(len(x_all), generator=gen).to(x_all.device)
            for b, index in enumerate(order.split(self.batch_train)):
                x = x_all[index]
                if self.augment is not None:
                    x = self.augment(x, derive_seed(self.seed, step, _INNER_STREAM, epoch, b + 1))
                leaves = {n: p.detach().requires_grad_(True) for n, p in zip(names, params, strict=True)}
                grads = self._param_gradients(x, labels[index], leaves, create_graph=False)
                with torch.no_grad():
                    for p, g in zip(params, grads, strict=True):
                        p.add_(g, alpha=-self.lr_net)

    def loss(
        self,
        syn_images: torch.Tensor,
        syn_labels: torch.Tensor,
        real_images: torch.Tensor,
        real_labels: torch.Tensor,
        step: int,
        classes: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """DC loss of one outer step; classes missing from either set contribute nothing.

        Moves the network to the device of the images, and re-initialises or trains it as the step requires.

        Args:
            syn_images: synthetic images ``(M, C, H, W)`` in ``[0, 1]``.
            syn_labels: their integer labels ``(M,)``.
            real_images: real images ``(N, C, H, W)`` in ``[0, 1]``, on the device of the synthetic ones.
            real_labels: their integer labels ``(N,)``.
            step: iteration number, from 1; it places the call in the outer loop and seeds DSA and the inner
                training.
            classes: only these classes' terms (a rank's share; ``None``: every class). The network's
                re-initialisation and inner training still use the whole synthetic set, so every rank's network
                is the single-process one.

        Returns:
            Scalar loss, differentiable with respect to ``syn_images`` (zero when no class is in both sets).

        Raises:
            ValueError: for images or labels of the wrong shape, dtype, device or label range, a step below 1, or a
                step that does not follow the previous one within an outer loop (load the matcher's state first).
        """
        self.check_sets(syn_images, syn_labels, real_images, real_labels)
        if not _is_int(step) or step < 1:
            raise ValueError(f"DC 'step' must be an integer >= 1 (iterations count from 1), got {step!r}")
        cycle, outer_step = divmod(int(step) - 1, self.outer)
        if outer_step > 0 and int(self.last_step) != step - 1:
            raise ValueError(
                f"DC step {step} continues the network of step {step - 1}, but the matcher's last step is "
                f"{int(self.last_step)}; call the steps in order, or load the matcher's state_dict saved after step "
                f"{step - 1}"
            )
        syn_labels, real_labels = syn_labels.long(), real_labels.long()
        self.to(syn_images.device)
        with torch.enable_grad():
            if outer_step == 0:
                self.net.load_state_dict(self.build_network(cycle).state_dict())
            elif self.inner > 0:
                self._train_inner(syn_images, syn_labels, step)
            self.last_step.fill_(int(step))
            real = self.normalize(real_images)
            syn = self.normalize(syn_images)
            self.net.train()
            batchnorms = self._batchnorms()
            if batchnorms:
                with torch.no_grad():
                    picks = torch.cat(
                        [
                            (real_labels == c).nonzero().squeeze(1)[: self.bn_real_per_class]
                            for c in range(self.num_classes)
                        ]
                    )
                    if picks.numel():
                        self.net(real[picks])
                for module in batchnorms:
                    module.eval()
            if self.augment is not None:
                dsa_seed = derive_seed(self.seed, step, _AUGMENT_STREAM)
                with torch.no_grad():
                    real = self.augment(real, dsa_seed, groups=real_labels)
                syn = self.augment(syn, dsa_seed, groups=syn_labels)
            params = {n: p.detach().requires_grad_(True) for n, p in self.net.named_parameters()}
            total = None
            for c in range(self.num_classes) if classes is None else sorted(int(c) for c in classes):
                real_c = (real_labels == c).nonzero().squeeze(1)
                syn_c = (syn_labels == c).nonzero().squeeze(1)
                if real_c.numel() == 0 or syn_c.numel() == 0:
                    continue
                g_real = self._param_gradients(real[real_c], real_labels[real_c], params, create_graph=False)
                g_syn = self._param_gradients(syn[syn_c], syn_labels[syn_c], params, create_graph=True)
                d = gradient_distance(g_syn, g_real, self.distance)
                total = d if total is None else total + d
            self.net.train()
        if total is None:  # no class in both sets: a zero that still back-propagates
            return syn_images.sum() * 0.0
        return total
