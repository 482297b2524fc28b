"""The distillation engine: a MONAI ``Trainer`` whose every iteration is one matching step.

One iteration draws ``samples_per_slot`` latents per slot from the parameterisation (reparameterised, so gradients
flow), renders them through the frozen generator, compares them with a class-balanced real batch using the matcher,
adds the optional KL term, and takes one optimiser step on the slots and the lightweight network.

Every random choice inside an iteration (latent noise, the matcher's random networks and augmentations) is drawn
from a seed derived from ``(seed, iteration)`` inside ``torch.random.fork_rng``; the real batches come from a
position-seeded sampler. A run resumed from a checkpoint therefore continues exactly as an uninterrupted run would.

Under ``torchrun`` (several ranks) every rank holds the whole parameterisation and draws the same latents,
networks and augmentations; the work is split as the matcher's ``class_split`` allows (DM: every rank samples,
decodes, augments and embeds every N-th slot and real image, and the per-class sums are summed over the ranks; DC:
the classes' terms), each rank back-propagates its part, and one all-reduce sums the gradients (and the loss
terms, for logging) before every rank takes the same optimiser step. The result is the single-process one up
to the order of floating-point sums. Only rank 0 runs the handlers (progress, grids, validation, export,
MLflow) and writes checkpoints; every rank resumes from the newest one, whatever the number of ranks that wrote it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import signal
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from monai.engines import Trainer

from monai_pld import distributed
from monai_pld.handlers.resume import AtomicCheckpointSaver, ResumeFromCheckpoint, RunSettings
from monai_pld.utils import derive_seed

__all__ = ["DistillationTrainer"]


class DistillationTrainer(Trainer):
    """Distil a dataset into a latent parameterisation by matching rendered synthetic images to real batches.

    ``max_epochs`` is the number of iterations: every epoch is one iteration (``epoch_length=1``), so MONAI's
    ``train#trainer#max_epochs`` id, ignite's resume logic and MLflow's epoch logging all count matching steps.

    Args:
        device: where to compute.
        max_epochs: number of distillation iterations.
        train_data_loader: infinite iterable of ``{"image", "label"}`` real batches (e.g. ``ClassBalancedBatches``).
        parameterization: ``SLFDistribution`` or ``LatentCodes`` (anything with ``sample`` and ``kl_to_prior``).
        generator: frozen generator with ``decode``.
        matcher: object with ``loss(syn_images, syn_labels, real_images, real_labels, step)`` (and optionally
            ``metrics()``, values logged with the loss); ``None`` only for a fixed real-image baseline.
        optimizer: optimiser over the parameterisation's parameters; ``None`` only for a fixed baseline.
        samples_per_slot: latents drawn per slot and iteration (S).
        antithetic: draw S/2 noise vectors and use each with both signs.
        include_mean: for a stochastic parameterisation (SLFD), also match each slot's mean latent besides its S
            samples, so the images that ``images.npz`` holds (the means) are themselves optimised. Ignored for
            deterministic codes, whose samples are their means.
        decode_chunk: latents per generator call (0: all in one call). Chunks keep the decoder's activation maps in
            the CPU caches: 90 latents forward and backward take 0.076 s in chunks of 30 against 0.096 s in one call
            (``benchmarks/dm_speed.py --parts``). The generator treats every latent on its own, so the images are
            the same.
        kl_weight: weight ``beta`` of the KL of each slot's Gaussian to its class prior (0 disables).
        seed: base of the per-iteration seeds.
        checkpoint_dir: when given, ``AtomicCheckpointSaver`` (MONAI's ``CheckpointSaver``, every file written
            atomically) writes the whole training state there every ``checkpoint_interval`` iterations, at the end
            and when an exception (including Ctrl-C) stops the run.
        checkpoint_interval: iterations between checkpoints (the two newest periodic ones are kept).
        resume: continue from the newest checkpoint in ``checkpoint_dir`` (same results as an uninterrupted run),
            after ``ResumeFromCheckpoint`` has checked that it is this run's; ``False`` moves any checkpoints already
            there into a subfolder and starts anew.
        train_handlers: ignite/MONAI handlers, attached after the engine is complete.

    Example::

        trainer = DistillationTrainer("cpu", 100, batches, slfd, generator, DistributionMatcher(3, 9, 28), opt)
        trainer.run()
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable,
        parameterization: torch.nn.Module,
        generator: torch.nn.Module,
        matcher: Any,
        optimizer: torch.optim.Optimizer,
        samples_per_slot: int = 1,
        antithetic: bool = False,
        kl_weight: float = 0.0,
        seed: int = 0,
        include_mean: bool = False,
        decode_chunk: int = 30,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_interval: int = 50,
        resume: bool = False,
        train_handlers: Sequence[Any] = (),
    ) -> None:
        super().__init__(
            device=device, max_epochs=max_epochs, data_loader=train_data_loader, epoch_length=1, decollate=False
        )
        # An epoch is one iteration here, so ignite's per-epoch INFO line would repeat every step; ProgressLogger
        # reports progress instead.
        self.logger.setLevel(logging.WARNING)
        self.parameterization = parameterization.to(device)
        self.generator = generator.to(device)
        self.matcher = matcher.to(device) if isinstance(matcher, torch.nn.Module) else matcher
        if optimizer is not None:  # no attribute at all for a fixed baseline: MONAI's MLflow handler probes for it
            self.optimizer = optimizer
        # A real-image baseline (``random``/``full``) has nothing to learn: its iterations only let the handlers
        # (export, grids, MLflow) run as for any other row of a comparison.
        self.fixed = bool(getattr(parameterization, "fixed", False))
        if not self.fixed and (matcher is None or optimizer is None):
            raise ValueError("a learnable parameterisation needs a matcher and an optimizer")
        self.samples_per_slot = int(samples_per_slot)
        self.antithetic = bool(antithetic)
        self.include_mean = bool(include_mean) and bool(getattr(parameterization, "stochastic", False))
        # a matcher with the unbiased estimator compares two independent halves of each slot's samples (DM)
        self.paired = getattr(matcher, "estimator", None) == "unbiased" and bool(
            getattr(parameterization, "stochastic", False)
        )
        if self.paired and (self.samples_per_slot % 2 or self.antithetic):
            raise ValueError(
                "the unbiased estimator compares two independent halves of each slot's samples: it needs an even "
                f"'samples_per_slot' (got {self.samples_per_slot}) and antithetic off (got {self.antithetic}); "
                "e.g. samples_per_slot 2, antithetic false"
            )
        self.kl_weight = float(kl_weight)
        if isinstance(decode_chunk, bool) or not isinstance(decode_chunk, int) or decode_chunk < 0:
            raise ValueError(
                f"'decode_chunk' must be 0 (one call) or a positive number of latents, got {decode_chunk!r}"
            )
        self.decode_chunk = decode_chunk
        self.seed = int(seed)
        self._stepped = False  # whether the current iteration's optimiser step has been taken
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        # under torchrun, how the matcher's work is split (None: the whole loss on every rank, or one process)
        self.class_split = getattr(matcher, "class_split", None) if self.world_size > 1 and not self.fixed else None
        self.own_classes: torch.Tensor | None = None  # the classes whose terms this rank computes ("terms")
        self._real_share = slice(None)  # the part of each real batch this rank embeds, if the loader cannot give it
        self.own_slots: torch.Tensor | None = None  # the slots this rank samples, decodes and embeds ("samples")
        if self.world_size > 1 and not self.fixed:
            # every rank starts from rank 0's values, so the identical steps that follow keep them identical
            distributed.broadcast_parameters([*self.parameterization.parameters(), *self.parameterization.buffers()])
            share = f"slots and real images {self.rank}, {self.rank + self.world_size}, ..."
            if self.class_split == "terms":
                self.own_classes = torch.tensor(distributed.shard(range(int(matcher.num_classes))), dtype=torch.long)
                share = f"classes {self.own_classes.tolist()}"
            elif self.class_split == "samples":
                slots = torch.arange(self.parameterization.num_slots)[self.rank :: self.world_size]
                self.own_slots = slots.to(self.parameterization.codes.device)
                if callable(getattr(train_data_loader, "take_share", None)):
                    train_data_loader.take_share(self.rank, self.world_size)
                else:
                    self._real_share = slice(self.rank, None, self.world_size)
            else:
                share = "the whole loss (this matcher is not split)"
            logging.getLogger(__name__).info(f"{distributed.rank_note()}{share}")
        # rank 0 alone reports and writes; the others only compute (and resume, below)
        handlers = list(train_handlers) if distributed.is_main() else []
        if checkpoint_dir is not None:
            # The trainer builds these itself because they must hold the trainer: a config that gave them the
            # trainer while also giving the trainer its handlers would be circular.
            state = self.checkpoint_objects()
            handlers = [
                ResumeFromCheckpoint(checkpoint_dir, state, enabled=resume, map_location=device),
                *handlers,
                AtomicCheckpointSaver(
                    save_dir=str(checkpoint_dir), save_dict=state, save_interval=int(checkpoint_interval)
                ),
            ]
        self._register_handlers(handlers)

    def checkpoint_objects(self) -> dict[str, Any]:
        """Everything a resumed run needs: engine counters, the parameterisation, optimiser moments, the position
        of the real-batch stream (when the loader can report it), the matcher's own state (when it has any) and the
        settings the result depends on (compared, not restored, when resuming)."""
        state: dict[str, Any] = {"trainer": self, "run": RunSettings(self.run_settings())}
        if not self.fixed:
            state.update(parameterization=self.parameterization, optimizer=self.optimizer)
        if callable(getattr(self.data_loader, "state_dict", None)):
            state["data_loader"] = self.data_loader
        if isinstance(self.matcher, torch.nn.Module) and self.matcher.state_dict():
            state["matcher"] = self.matcher  # e.g. DC's inner model mid outer loop, MTT's learnt student lr
        return state

    def run_settings(self) -> dict[str, Any]:
        """What a checkpoint must share with a run that resumes from it: the seeds, the parameterisation's
        settings, the matcher's kind and the real images per class (not the learning rates, which a resume may
        lower, nor speed options, which leave the result as it is)."""
        dataset = getattr(self.data_loader, "dataset", None)
        labels = getattr(dataset, "labels", None)
        hyper = getattr(self.parameterization, "hyper_parameters", None)
        return {
            "seed": self.seed,
            "parameterization": dict(hyper) if isinstance(hyper, dict) else type(self.parameterization).__name__,
            "matcher": type(self.matcher).__name__,
            "matcher_seed": getattr(self.matcher, "seed", None),
            "samples_per_slot": self.samples_per_slot,
            "antithetic": self.antithetic,
            "include_mean": self.include_mean,
            "real_images_per_class": torch.bincount(labels).tolist() if isinstance(labels, torch.Tensor) else None,
        }

    def run(self) -> None:
        """Run the distillation; under several ranks a failure names the rank that failed."""
        try:
            super().run()
        except BaseException as e:
            if self.world_size > 1:
                e.add_note(
                    f"distillation failed on {distributed.rank_note().rstrip(': ')}; a communication error here "
                    "(connection closed, timeout) means another rank stopped first, its own error logged with its rank"
                )
                logging.getLogger(__name__).error(f"{distributed.rank_note()}{type(e).__name__}: {e}")
            raise

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The generator's images of ``latents``, ``decode_chunk`` latents per call."""
        if not self.decode_chunk or len(latents) <= self.decode_chunk:
            return self.generator.decode(latents)
        return torch.cat([self.generator.decode(part) for part in latents.split(self.decode_chunk)])

    def _iteration(self, engine: DistillationTrainer, batchdata: dict[str, torch.Tensor]) -> list[dict[str, float]]:
        if engine.fixed:
            return [{}]
        # a matcher that changes its own state inside its loss (DC's inner model, MTT's learnt rate) is put back too
        stateful = isinstance(engine.matcher, torch.nn.Module) and bool(engine.matcher.state_dict())
        before = copy.deepcopy(engine.matcher.state_dict()) if stateful else None
        engine._stepped = False
        try:
            values = engine._matching_step(batchdata)
        except BaseException:
            if not engine._stepped:
                # The step was not taken: count this iteration and its real batch as not done, and put the matcher
                # back, so that the checkpoint written on this exception (and a run resumed from it) continues
                # exactly where the last whole step ended. (Once the optimiser has stepped, the step is kept.)
                engine.state.iteration -= 1
                if isinstance(getattr(engine.data_loader, "position", None), int):
                    engine.data_loader.position -= 1
                if before is not None:
                    engine.matcher.load_state_dict(before)
            raise
        # A one-element list of dicts is MONAI's decollated output form, so stock handlers and the bundle's
        # `--tracking mlflow` (which reads `from_engine(["loss"], first=True)`) work unchanged.
        metrics = getattr(engine.matcher, "metrics", None)
        extra = metrics() if callable(metrics) else {}
        return [{"loss": values[0], "match_loss": values[1], "kl": values[2], **extra}]

    def _matching_step(self, batchdata: dict[str, torch.Tensor]) -> list[float]:
        """One matching step up to and including the optimiser's; returns the loss, match loss and KL values."""
        device = self.state.device
        real_images = batchdata["image"].to(device, non_blocking=True)
        real_labels = batchdata["label"].to(device, non_blocking=True)
        step = self.state.iteration
        cuda_devices = [device] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(derive_seed(self.seed, step))
            # "samples" split: this rank's slots only (their part of the draw for every slot), and its real images
            own = self.own_slots
            try:
                # the means first when they are matched: (1 + S) * slots latents, sample-major
                latents, syn_labels = self.parameterization.sample(
                    self.samples_per_slot, antithetic=self.antithetic, slots=own, with_mean=self.include_mean
                )
            except torch.linalg.LinAlgError as e:  # the covariance of a slot stopped being positive definite
                raise FloatingPointError(
                    f"the latent distribution became degenerate at iteration {step} ({str(e).splitlines()[0]}); "
                    "lower 'lr_codes'/'lr_network' or resume from the last checkpoint with a smaller learning rate"
                ) from e
            if own is not None:
                real_images, real_labels = real_images[self._real_share], real_labels[self._real_share]
            syn_images = self.decode(latents)
            grouping = {"syn_groups": self._groups(len(syn_labels), syn_labels.device)} if self.paired else {}
            if self.class_split == "terms":
                match_loss = self.matcher.loss(
                    syn_images, syn_labels, real_images, real_labels, step, classes=self.own_classes.tolist()
                )
            elif self.class_split == "samples":
                match_loss = self.matcher.loss(
                    syn_images, syn_labels, real_images, real_labels, step, across_ranks=True, **grouping
                )
            else:
                match_loss = self.matcher.loss(syn_images, syn_labels, real_images, real_labels, step, **grouping)
            loss = match_loss
            kl = torch.zeros((), device=device)
            if self.kl_weight > 0 and (self.class_split is None or self.rank == 0):  # counted once
                kl = self.parameterization.kl_to_prior()
                loss = match_loss + self.kl_weight * kl
            self.optimizer.zero_grad(set_to_none=True)
            if self.class_split is None:
                values = [loss.item(), match_loss.item(), kl.item()]
                if not torch.isfinite(loss):
                    self._non_finite(values[0], step)
                loss.backward()
            else:  # sum the ranks' gradients and loss terms; every rank then takes the same step
                loss.backward()
                params = [p for group in self.optimizer.param_groups for p in group["params"]]
                # "samples": every rank holds the match loss of the whole step; "terms": that of its classes
                match_share = match_loss.item() / (self.world_size if self.class_split == "samples" else 1)
                match_value, kl_value = distributed.all_reduce_gradients(params, [match_share, kl.item()])
                values = [match_value + self.kl_weight * kl_value, match_value, kl_value]
                if not math.isfinite(values[0]):
                    self._non_finite(values[0], step)
            with _interrupt_after():  # a Ctrl-C here would leave some parameters or moments stepped and some not
                self.optimizer.step()
                self._stepped = True
        return values

    def _groups(self, num_images: int, device: torch.device) -> torch.Tensor:
        """Half of every synthetic image: the samples are sample-major, so samples ``0 .. S/2-1`` of every slot
        form half 0 and the rest half 1; the means, first when matched, belong to both (2)."""
        num_samples = self.samples_per_slot
        num_means = num_images // (num_samples + 1) if self.include_mean else 0
        per_sample = (num_images - num_means) // num_samples
        halves = (torch.arange(num_samples, device=device) >= num_samples // 2).long().repeat_interleave(per_sample)
        return torch.cat([torch.full((num_means,), 2, dtype=torch.long, device=device), halves])

    @staticmethod
    def _non_finite(value: float, step: int) -> None:
        raise FloatingPointError(
            f"distillation loss became {value} at iteration {step}; lower 'lr_codes'/'lr_network' "
            "or resume from the last checkpoint with a smaller learning rate"
        )


@contextlib.contextmanager
def _interrupt_after() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) until the block has finished, then raise it (main thread only; elsewhere, or when
    another handler than Python's own is installed, the block runs as it is)."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt
