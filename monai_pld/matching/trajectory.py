"""Trajectory matching (MTT): a student trained on the synthetic set for a few steps should land where an expert
trained on real data landed after a few epochs."""

from __future__ import annotations

import logging
import os
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

__all__ = ["TrajectoryMatcher", "UnrollMemoryError"]

logger = logging.getLogger("monai_pld")
_CHOICE_STREAM, _BATCH_STREAM, _AUGMENT_STREAM = 0, 1, 2


class UnrollMemoryError(MemoryError):
    """The unrolled student steps would not fit in memory; the message names the settings to lower."""


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class TrajectoryMatcher(Matcher):
    """MTT loss ``|| w_N - theta*_{t+M} ||^2 / || theta*_t - theta*_{t+M} ||^2``.

    Every step draws (from ``(seed, step)``) an expert and a start epoch ``t <= max_start_epoch``; the student starts
    at the expert's parameters ``theta*_t`` and takes ``syn_steps`` SGD steps ``w <- w - syn_lr * grad CE`` on
    minibatches of the synthetic set (per-sample DSA), keeping the graph, so the loss is differentiable in the
    synthetic images and in the learnable student learning rate ``syn_lr``. The student runs functionally
    (``torch.func.functional_call`` on flat parameter vectors). The real batch is checked but not used: the experts
    carry the real data.

    Memory: the graph of all ``syn_steps`` steps is kept. Before the first step the matcher estimates it as
    ``syn_steps x (3 x activation bytes of batch_syn images + 3 x parameter bytes)`` (activations are measured by a
    forward pass with hooks; the factor 3 covers the saved activations, their gradients and the double backward)
    and raises :class:`UnrollMemoryError` naming ``syn_steps`` and ``batch_syn`` when it exceeds ``max_memory_gb``.

    Args:
        in_channels, num_classes, image_size, mean, std, seed: see :class:`Matcher`. The experts' own ``mean``/``std``
            are used to normalise (the student must see what the experts saw); differing values are logged.
        expert_dir: folder written by :func:`~monai_pld.engines.experts.train_experts`.
        syn_steps: student steps per iteration (N).
        expert_epochs: expert epochs the student must cover (M).
        max_start_epoch: latest start epoch (T+); clamped to ``epochs - expert_epochs`` of the experts.
        lr_teacher: initial student learning rate.
        batch_syn: synthetic images per student step (``None`` = all).
        dsa_strategy: per-sample DSA of the student's batches; ``None``/``""`` disables it.
        max_memory_gb: bound of the estimate above (default: 80 % of the available memory of the device).

    Raises:
        ExpertFileError: no or bad expert files.
        ValueError: experts of another image shape or class count, or bad settings (naming them).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int = 0,
        expert_dir: str | os.PathLike | None = None,
        syn_steps: int = 20,
        expert_epochs: int = 3,
        max_start_epoch: int = 25,
        lr_teacher: float = 0.01,
        batch_syn: int | None = None,
        dsa_strategy: str | None = "color_crop_cutout_flip_scale_rotate",
        max_memory_gb: float | None = None,
    ) -> None:
        from monai_pld.engines.experts import ExpertBuffer

        if expert_dir is None:
            raise ValueError("the MTT matcher needs 'expert_dir', the folder written by train_experts.yaml")
        if syn_steps < 1 or expert_epochs < 1 or max_start_epoch < 0 or (batch_syn is not None and batch_syn < 1):
            raise ValueError(
                "MTT needs syn_steps >= 1, expert_epochs >= 1, max_start_epoch >= 0 and batch_syn >= 1 (or null); "
                f"got {syn_steps}, {expert_epochs}, {max_start_epoch}, {batch_syn}"
            )
        if lr_teacher <= 0:
            raise ValueError(f"'mtt_lr_teacher' must be > 0, got {lr_teacher}")
        self.experts = ExpertBuffer(expert_dir)
        meta = self.experts.meta
        expected = {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size}
        wrong = {k: (meta[k], v) for k, v in expected.items() if meta[k] != v}
        if wrong:
            raise ValueError(
                f"the experts in {expert_dir} do not fit this data: {wrong} (experts, data); train experts for this "
                "dataset and image size (train_experts.yaml) or point expert_dir at them"
            )
        if self.experts.epochs < expert_epochs:
            raise ValueError(
                f"the experts in {expert_dir} have {self.experts.epochs} epochs, fewer than mtt_expert_epochs "
                f"{expert_epochs}; train longer experts or lower mtt_expert_epochs"
            )
        if (
            mean is not None
            and std is not None
            and (
                max(abs(a - b) for a, b in zip(mean, meta["mean"], strict=True)) > 1e-3
                or max(abs(a - b) for a, b in zip(std, meta["std"], strict=True)) > 1e-3
            )
        ):
            logger.info("MTT normalises with the experts' channel statistics, which differ slightly from the data's")
        super().__init__(in_channels, num_classes, image_size, meta["mean"], meta["std"], seed)
        self.expert_dir = str(expert_dir)
        self.syn_steps, self.expert_epochs = int(syn_steps), int(expert_epochs)
        self.max_start_epoch = int(max_start_epoch)
        self.start_limit = min(self.max_start_epoch, self.experts.epochs - self.expert_epochs)
        if self.start_limit < self.max_start_epoch:
            logger.warning(
                f"MTT: the experts have {self.experts.epochs} epochs, so start epochs are drawn from "
                f"0..{self.start_limit} instead of 0..{self.max_start_epoch}"
            )
        self.lr_teacher, self.batch_syn = float(lr_teacher), batch_syn
        self.max_memory_gb = max_memory_gb
        self.dsa_strategy = dsa_strategy or ""
        self.augment = DiffSiameseAugment(dsa_strategy) if dsa_strategy else None
        self.syn_lr = nn.Parameter(torch.tensor(float(lr_teacher)))
        # the student's skeleton: only its structure is used, parameters come from flat vectors
        self.student = get_classifier(meta["model"], in_channels, num_classes, image_size, **meta["model_kwargs"])
        self.student.requires_grad_(False)
        shapes = [tuple(s) for s in meta["param_shapes"]]
        if [tuple(p.shape) for p in self.student.parameters()] != shapes:
            raise ValueError(f"the experts' parameter shapes do not match a {meta['model']} built here")
        self._names = list(meta["param_names"])
        self._shapes = shapes
        self._checked_memory = False

    def hyper_parameters(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "expert_dir": self.expert_dir,
            "num_experts": len(self.experts),
            "expert_train_epochs": self.experts.epochs,
            "expert_model": self.experts.meta["model"],
            "expert_model_kwargs": self.experts.meta["model_kwargs"],
            "syn_steps": self.syn_steps,
            "expert_epochs": self.expert_epochs,
            "max_start_epoch": self.max_start_epoch,
            "effective_max_start_epoch": self.start_limit,
            "lr_teacher": self.lr_teacher,
            "batch_syn": self.batch_syn,
            "dsa_strategy": self.dsa_strategy,
        }

    def metrics(self) -> dict[str, float]:
        return {"syn_lr": float(self.syn_lr.detach())}

    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        pieces = flat.split([int(torch.Size(s).numel()) for s in self._shapes])
        return {n: p.view(s) for n, p, s in zip(self._names, pieces, self._shapes, strict=True)}

    def _check_memory(self, batch: int, device: torch.device) -> None:
        """Estimate the unrolled graph's size and refuse to start when it cannot fit."""
        activations = 0

        def count(_module, _inputs, output):
            nonlocal activations
            if isinstance(output, torch.Tensor):
                activations += output.numel() * output.element_size()

        hooks = [m.register_forward_hook(count) for m in self.student.modules() if not list(m.children())]
        try:
            with torch.no_grad():
                self.student.to(device)(
                    torch.zeros(1, self.in_channels, self.image_size, self.image_size, device=device)
                )
        finally:
            for h in hooks:
                h.remove()
        param_bytes = sum(int(torch.Size(s).numel()) for s in self._shapes) * 4
        estimate = self.syn_steps * (3 * activations * batch + 3 * param_bytes)
        limit = self.max_memory_gb * 2**30 if self.max_memory_gb is not None else 0.8 * _available_bytes(device)
        if estimate > limit:
            raise UnrollMemoryError(
                f"MTT would keep about {estimate / 2**30:.2f} GB of graph ({self.syn_steps} syn_steps x {batch} "
                f"synthetic images per step), more than the {limit / 2**30:.2f} GB available; lower mtt_syn_steps "
                "or set mtt_batch_syn (e.g. --mtt_batch_syn 100)"
            )
        self._checked_memory = True

    def loss(
        self,
        syn_images: torch.Tensor,
        syn_labels: torch.Tensor,
        real_images: torch.Tensor,
        real_labels: torch.Tensor,
        step: int,
    ) -> torch.Tensor:
        """MTT loss of one iteration.

        Args:
            syn_images: synthetic images ``(M, C, H, W)`` in ``[0, 1]``.
            syn_labels: their integer labels ``(M,)``.
            real_images: real images (checked, not used).
            real_labels: their labels.
            step: iteration number, which selects the expert, the start epoch, the batches and the augmentation.

        Returns:
            Scalar loss, differentiable with respect to ``syn_images`` and ``syn_lr``.

        Raises:
            UnrollMemoryError: when the unrolled steps cannot fit (before any heavy work).
            ValueError: for images or labels of the wrong shape, dtype, device or label range.
        """
        self.check_sets(syn_images, syn_labels, real_images, real_labels)
        device = syn_images.device
        batch = len(syn_images) if self.batch_syn is None else min(self.batch_syn, len(syn_images))
        if not self._checked_memory:
            self._check_memory(batch, device)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, step, _CHOICE_STREAM))
        expert = int(torch.randint(len(self.experts), (1,), generator=gen))
        start = int(torch.randint(self.start_limit + 1, (1,), generator=gen))
        trajectory = self.experts.trajectory(expert)
        theta_start = trajectory[start].to(device)
        theta_target = trajectory[start + self.expert_epochs].to(device)
        self.student.to(device).train()
        x_all, y_all = self.normalize(syn_images), syn_labels.long()
        w = theta_start.clone()
        lr = self.syn_lr.to(device)
        for k in range(self.syn_steps):
            order_gen = torch.Generator().manual_seed(derive_seed(self.seed, step, _BATCH_STREAM, k))
            index = torch.randperm(len(x_all), generator=order_gen)[:batch].to(device)
            x = x_all[index]
            if self.augment is not None:
                x = self.augment(x, derive_seed(self.seed, step, _AUGMENT_STREAM, k))
            if not w.requires_grad:
                w.requires_grad_(True)
            logits = functional_call(self.student, self._unflatten(w), (x,))
            ce = F.cross_entropy(logits, y_all[index])
            (grad,) = torch.autograd.grad(ce, w, create_graph=True)
            w = w - lr * grad
        return (w - theta_target).pow(2).sum() / (theta_start - theta_target).pow(2).sum().clamp_min(1e-12)
