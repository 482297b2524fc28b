"""Trajectory matching (MTT): a student trained on the synthetic set for a few steps should land where an expert
trained on real data landed after a few epochs."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from monai_pld.augment import DiffSiameseAugment
from monai_pld.formats.experts import ExpertBuffer
from monai_pld.matching.base import Matcher
from monai_pld.networks.classifiers import get_classifier
from monai_pld.utils import derive_seed

__all__ = ["TrajectoryMatcher", "UnrollMemoryError", "available_memory_bytes"]

logger = logging.getLogger("monai_pld")

# last part of derive_seed(seed, step, stream, ...): expert choice, minibatch order and augmentation draw apart
_CHOICE_STREAM, _BATCH_STREAM, _AUGMENT_STREAM = 0, 1, 2
# memory model of one unrolled student step, see TrajectoryMatcher.estimate_memory
_ACTIVATION_FACTOR = 3.0
_INPUT_COPIES = 4
_PARAMETER_COPIES = 4
_DEFAULT_MEMORY_FRACTION = 0.8
# matcher mean/std further than this from the experts' ones are reported
_STATS_TOLERANCE = 1e-4


class UnrollMemoryError(MemoryError):
    """The unrolled student steps would not fit in memory; the message names the settings to lower."""


def available_memory_bytes(device: torch.device | str) -> int:
    """Memory a new allocation can use: free memory of a CUDA device, ``MemAvailable`` of the host otherwise
    (total physical memory where ``/proc/meminfo`` is missing)."""
    device = torch.device(device)
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

    Every step draws, from ``(seed, step)``, an expert and a start epoch ``t`` uniformly in
    ``0..min(max_start_epoch, expert epochs - expert_epochs)``. The student starts at the expert's parameters
    ``theta*_t`` and takes ``syn_steps`` SGD steps ``w <- w - syn_lr * grad_w CE`` on minibatches of ``batch_syn``
    synthetic images (a fresh seeded permutation per step, normalised, per-sample DSA seeded per step), keeping the
    graph (``create_graph``), so the loss is differentiable in the synthetic images and in the learnable student
    learning rate ``syn_lr``. The student runs functionally: ``torch.func.functional_call`` of a network skeleton,
    built once from the experts' metadata, on the flat parameter vector cut into the named tensors. The real batch
    is checked but not used: the experts carry the real data.

    ``syn_lr`` is an ``nn.Parameter`` (initial value ``lr_teacher``): the distillation optimiser gives it its own
    parameter group and checkpoints carry it (it is the only entry of :meth:`state_dict`; the skeleton is not part
    of the module tree). The learnt value is the learning rate to evaluate the distilled set with (reference).

    Normalisation: the student must see inputs as the experts saw them, so the matcher normalises with the
    ``mean``/``std`` stored in the expert files. The ``mean``/``std`` arguments only serve as a check: when given
    and different from the experts' (by more than 1e-4), a warning names both; the experts' values are used.

    Memory: all ``syn_steps`` steps stay in the graph until the backward pass. Before the first step,
    :meth:`estimate_memory` computes ``syn_steps x (batch_syn x (3 A + 4 I) + 4 P)`` bytes, where ``A`` is the
    size of the outputs of every leaf module for one image (forward hooks on a dummy forward), ``I`` the size of one
    input image (the DSA copies) and ``P`` the size of the parameter vector (a step keeps ``w``, its gradient and
    their graph). The factor 3 on activations is calibrated on the CPU (ConvNets of width 32 and 128 at 28 px,
    batches of 15 to 90 images, 5 to 20 steps): the tensors saved for backward take about 1.35 ``A`` per image and
    step, the peak-RSS growth of a loss and its backward pass 1.8 to 2.9 ``A`` (the backward pass's temporaries and
    the allocator's fragmentation, worst at mid-sized batches). When the estimate exceeds ``max_memory_gb``,
    :meth:`loss` raises :class:`UnrollMemoryError` naming ``syn_steps``, ``batch_syn``, the estimate and the fix,
    before the expert is loaded or any step is taken.

    Args:
        in_channels, num_classes, image_size: shape of the data; must match the experts.
        mean, std: the data's channel statistics, compared with the experts' (see above).
        seed: base seed of the expert/start choices, minibatches and augmentations.
        expert_dir: folder written by :func:`~monai_pld.engines.experts.train_experts` (required).
        syn_steps: student steps per iteration (N).
        expert_epochs: expert epochs the student must cover (M).
        max_start_epoch: latest start epoch (T+); clamped to ``epochs - expert_epochs`` of the experts (warned).
        lr_teacher: initial student learning rate.
        batch_syn: synthetic images per student step (``None`` = all).
        dsa_strategy: per-sample DSA of the student's batches; ``None``/``""`` disables it.
        max_memory_gb: bound of the estimate above; default 80 % of the available memory of the device of the
            images (``MemAvailable`` on the CPU, free memory on CUDA), read at the first step.

    Raises:
        ExpertFileError: no expert files, or bad ones (names the file).
        ValueError: experts of another image shape, class count or architecture (names the field), or bad
            settings (names them).
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
        if expert_dir is None:
            raise ValueError("the MTT matcher needs 'expert_dir', the folder written by train_experts.yaml")
        if syn_steps < 1 or expert_epochs < 1 or max_start_epoch < 0 or (batch_syn is not None and batch_syn < 1):
            raise ValueError(
                "MTT needs mtt_syn_steps >= 1, mtt_expert_epochs >= 1, mtt_max_start_epoch >= 0 and mtt_batch_syn "
                f">= 1 (or null); got {syn_steps}, {expert_epochs}, {max_start_epoch}, {batch_syn}"
            )
        if not lr_teacher > 0:
            raise ValueError(f"'mtt_lr_teacher' must be > 0, got {lr_teacher}")
        if max_memory_gb is not None and not max_memory_gb > 0:
            raise ValueError(f"max_memory_gb must be > 0 (or None for the available memory), got {max_memory_gb}")
        experts = ExpertBuffer(expert_dir)
        meta = experts.meta
        expected = {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size}
        wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
        if wrong:
            raise ValueError(
                f"the experts in {expert_dir} do not fit this data: {wrong} (experts, data); train experts for this "
                "dataset and image size (train_experts.yaml) or point expert_dir at them"
            )
        if experts.epochs < expert_epochs:
            raise ValueError(
                f"the experts in {expert_dir} have {experts.epochs} epochs, fewer than mtt_expert_epochs "
                f"{expert_epochs}; train longer experts (expert_train_epochs) or lower mtt_expert_epochs"
            )
        super().__init__(in_channels, num_classes, image_size, meta["mean"], meta["std"], seed)
        for name, given, stored in (("mean", mean, meta["mean"]), ("std", std, meta["std"])):
            if given is not None and (
                len(given) != len(stored)
                or max(abs(float(a) - b) for a, b in zip(given, stored, strict=True)) > _STATS_TOLERANCE
            ):
                logger.warning(
                    f"MTT: the data's channel {name} {[round(float(v), 5) for v in given]} differs from the experts' "
                    f"{[round(v, 5) for v in stored]}; normalising with the experts' values, as they were trained"
                )
        self.experts = experts
        self.expert_dir = str(expert_dir)
        self.syn_steps, self.expert_epochs = int(syn_steps), int(expert_epochs)
        self.max_start_epoch = int(max_start_epoch)
        self.start_limit = min(self.max_start_epoch, experts.epochs - self.expert_epochs)
        if self.start_limit < self.max_start_epoch:
            logger.warning(
                f"MTT: the experts have {experts.epochs} epochs, so start epochs are drawn from "
                f"0..{self.start_limit} instead of 0..{self.max_start_epoch} (mtt_max_start_epoch)"
            )
        self.lr_teacher = float(lr_teacher)
        self.batch_syn = None if batch_syn is None else int(batch_syn)
        self.max_memory_gb = max_memory_gb
        self.dsa_strategy = dsa_strategy or ""
        self.augment = DiffSiameseAugment(dsa_strategy) if dsa_strategy else None
        self.syn_lr = nn.Parameter(torch.tensor(self.lr_teacher))
        # The skeleton supplies only the structure (its parameters are replaced by slices of the flat vector), so
        # it stays out of the module tree: not in parameters(), state_dict() or .to().
        self.__dict__["student"] = self._build_student(meta, expert_dir)
        self._names = list(meta["param_names"])
        self._shapes = [tuple(int(d) for d in s) for s in meta["param_shapes"]]
        self._sizes = [math.prod(s) for s in self._shapes]
        self._memory_checked: tuple[int, str] | None = None
        # checkpoints of earlier versions carried the skeleton's random weights under "student."
        self.register_load_state_dict_pre_hook(_drop_student_keys)

    def _build_student(self, meta: dict[str, Any], expert_dir: str | os.PathLike) -> nn.Module:
        try:
            student = get_classifier(
                meta["model"], self.in_channels, self.num_classes, self.image_size, **meta["model_kwargs"]
            )
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"the experts in {expert_dir} name model {meta['model']!r} with {meta['model_kwargs']}, which "
                f"cannot be built here: {e}"
            ) from e
        layout = [(n, list(p.shape)) for n, p in student.named_parameters()]
        stored = [(n, list(s)) for n, s in zip(meta["param_names"], meta["param_shapes"], strict=True)]
        if layout != stored:
            diff = [(a, b) for a, b in zip(stored, layout, strict=False) if a != b][:3] or (len(stored), len(layout))
            raise ValueError(
                f"the experts in {expert_dir} have a parameter layout (param_names/param_shapes) that a "
                f"{meta['model']} {meta['model_kwargs']} built here does not have; first differences (experts, "
                f"here): {diff}; retrain the experts with this version"
            )
        return student.requires_grad_(False)

    def hyper_parameters(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "expert_dir": self.expert_dir,
            "num_experts": len(self.experts),
            "expert_train_epochs": self.experts.epochs,
            "expert_model": self.experts.meta["model"],
            "expert_model_kwargs": dict(self.experts.meta["model_kwargs"]),
            "expert_mean": list(self.experts.meta["mean"]),
            "expert_std": list(self.experts.meta["std"]),
            "syn_steps": self.syn_steps,
            "expert_epochs": self.expert_epochs,
            "max_start_epoch": self.max_start_epoch,
            "effective_max_start_epoch": self.start_limit,
            "lr_teacher": self.lr_teacher,
            "batch_syn": self.batch_syn,
            "dsa_strategy": self.dsa_strategy,
            "max_memory_gb": self.max_memory_gb,
        }

    def metrics(self) -> dict[str, float]:
        return {"syn_lr": float(self.syn_lr.detach())}

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cut a flat parameter vector into the named tensors of the skeleton (views, so gradients flow)."""
        return {n: p.view(s) for n, p, s in zip(self._names, flat.split(self._sizes), self._shapes, strict=True)}

    def estimate_memory(self, batch: int, device: torch.device | str = "cpu") -> int:
        """Bytes the unrolled graph of one :meth:`loss` needs (see the class docstring for the model).

        Args:
            batch: synthetic images per student step.
            device: where the student runs.

        Returns:
            ``syn_steps x (batch x (3 A + 4 I) + 4 P)``.
        """
        activations = 0

        def count(_module: nn.Module, _inputs: Any, output: Any) -> None:
            nonlocal activations
            for t in output if isinstance(output, (tuple, list)) else (output,):
                if isinstance(t, torch.Tensor):
                    activations += t.numel() * t.element_size()

        student = self.student.to(device)
        leaves = [m for m in student.modules() if not list(m.children())]
        hooks = [m.register_forward_hook(count) for m in leaves]
        try:
            student.eval()  # no running-statistics update; two images so batch norm has a batch
            with torch.no_grad():
                student(torch.zeros(2, self.in_channels, self.image_size, self.image_size, device=device))
        finally:
            student.train()
            for h in hooks:
                h.remove()
        per_image = activations / 2
        input_bytes = self.in_channels * self.image_size**2 * 4
        param_bytes = sum(self._sizes) * 4
        per_step = batch * (_ACTIVATION_FACTOR * per_image + _INPUT_COPIES * input_bytes)
        return int(self.syn_steps * (per_step + _PARAMETER_COPIES * param_bytes))

    def check_memory(self, batch: int, device: torch.device | str) -> None:
        """Refuse to unroll when :meth:`estimate_memory` exceeds ``max_memory_gb`` (or the default bound).

        Raises:
            UnrollMemoryError: naming ``syn_steps``, ``batch_syn``, the estimate, the bound and the fix.
        """
        estimate = self.estimate_memory(batch, device)
        if self.max_memory_gb is not None:
            limit, source = self.max_memory_gb * 2**30, "max_memory_gb"
        else:
            limit = _DEFAULT_MEMORY_FRACTION * available_memory_bytes(device)
            source = f"{_DEFAULT_MEMORY_FRACTION:.0%} of the memory available on {torch.device(device)}"
        if estimate > limit:
            raise UnrollMemoryError(
                f"MTT would keep about {estimate / 2**30:.2f} GB of unrolled graph (mtt_syn_steps {self.syn_steps} "
                f"x mtt_batch_syn {batch} synthetic images per step), more than the {limit / 2**30:.2f} GB allowed "
                f"({source}); lower mtt_syn_steps or set a smaller mtt_batch_syn (e.g. --mtt_batch_syn "
                f"{max(1, int(batch * limit / estimate))})"
            )
        logger.info(
            f"MTT: unrolled graph estimated at {estimate / 2**30:.2f} GB ({self.syn_steps} steps x {batch} images), "
            f"bound {limit / 2**30:.2f} GB"
        )

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
            step: iteration number, which selects the expert, the start epoch, the minibatches and the
                augmentations.

        Returns:
            Scalar loss, differentiable with respect to ``syn_images`` and ``syn_lr``.

        Raises:
            UnrollMemoryError: when the unrolled steps cannot fit (before any heavy work).
            ValueError: for images or labels of the wrong shape, dtype, device or label range.
        """
        self.check_sets(syn_images, syn_labels, real_images, real_labels)
        device = syn_images.device
        batch = len(syn_images) if self.batch_syn is None else min(self.batch_syn, len(syn_images))
        if self._memory_checked != (batch, str(device)):
            self.check_memory(batch, device)
            self._memory_checked = (batch, str(device))
        gen = torch.Generator().manual_seed(derive_seed(self.seed, step, _CHOICE_STREAM))
        expert = int(torch.randint(len(self.experts), (1,), generator=gen))
        start = int(torch.randint(self.start_limit + 1, (1,), generator=gen))
        trajectory = self.experts.trajectory(expert)
        theta_start = trajectory[start].to(device, syn_images.dtype)
        theta_target = trajectory[start + self.expert_epochs].to(device, syn_images.dtype)
        student = self.student.to(device).train()
        x_all, y_all = self.normalize(syn_images), syn_labels.long()
        lr = self.syn_lr.to(device, syn_images.dtype)
        w = theta_start.clone().requires_grad_(True)
        for k in range(self.syn_steps):
            order = torch.Generator().manual_seed(derive_seed(self.seed, step, _BATCH_STREAM, k))
            index = torch.randperm(len(x_all), generator=order)[:batch].to(device)
            x = x_all.index_select(0, index)
            if self.augment is not None:
                x = self.augment(x, derive_seed(self.seed, step, _AUGMENT_STREAM, k))
            ce = F.cross_entropy(functional_call(student, self.unflatten(w), (x,)), y_all.index_select(0, index))
            (grad,) = torch.autograd.grad(ce, w, create_graph=True)
            w = w - lr * grad
        return (w - theta_target).pow(2).sum() / (theta_start - theta_target).pow(2).sum().clamp_min(1e-12)


def _drop_student_keys(
    module: nn.Module,  # noqa: ARG001 - the hook signature
    state_dict: dict[str, Any],
    prefix: str,
    *args: Any,  # noqa: ARG001
) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "student.")]:
        del state_dict[key]
