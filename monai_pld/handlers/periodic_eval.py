"""Quick evaluation during distillation: every few iterations, train a small classifier on the current synthetic set
and test it on the validation split, so the curve shows in MLflow while the run goes on."""

from __future__ import annotations

import logging
from typing import Any

from ignite.engine import Engine, Events

from monai_pld.data import ImageSet, ImageSource
from monai_pld.evaluation import train_and_test

from .parts import take_run_parts

__all__ = ["PeriodicEvaluation"]


class PeriodicEvaluation:
    """Every ``interval`` iterations (and at the end), train ``backbone`` for ``epochs`` on the rendered synthetic
    set and log its accuracy on ``val`` as ``val_accuracy`` (also ``val_auc``, ``val_f1``).

    Model selection never sees the test split: this handler is given the validation split.

    Args:
        val: the validation split.
        train: the training split (channel statistics for normalisation).
        parameterization: object with ``render(generator, mode)`` (default: the engine's, when attached).
        generator: the frozen generator (default: the engine's).
        interval: iterations between evaluations; 0 disables the handler.
        epochs: training epochs of the quick classifier.
        backbone: classifier registry name.
        mlflow_handler: MONAI ``MLFlowHandler`` of the run (metrics go into its run).
        seed: seed of the quick classifier.
    """

    def __init__(
        self,
        val: ImageSet,
        train: ImageSet,
        parameterization: Any = None,
        generator: Any = None,
        interval: int = 200,
        epochs: int = 100,
        backbone: str = "convnet",
        mlflow_handler: Any = None,
        seed: int = 0,
    ) -> None:
        if interval < 0 or epochs < 1:
            raise ValueError(f"'eval_interval' must be >= 0 and 'eval_epochs' >= 1, got {interval}, {epochs}")
        self.val, self.train = val, train
        self.parameterization, self.generator = parameterization, generator
        self.interval, self.epochs, self.backbone = int(interval), int(epochs), backbone
        self.mlflow_handler, self.seed = mlflow_handler, seed
        self.logger = logging.getLogger("monai_pld")
        self._done: set[int] = set()

    def attach(self, engine: Engine) -> None:
        take_run_parts(self, engine)
        if self.interval:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        iteration = engine.state.iteration
        if getattr(self.parameterization, "fixed", False):  # a real-image baseline does not change
            return
        if iteration in self._done:  # COMPLETED right after an interval iteration
            return
        self._done.add(iteration)
        images, labels = self.parameterization.render(self.generator, mode="mean")
        mean, std = self.train.normalization()
        metrics = train_and_test(
            self.backbone,
            ImageSource(images.cpu(), labels.cpu(), {"kind": "current"}),
            self.val,
            mean,
            std,
            epochs=self.epochs,
            seed=self.seed,
            device=images.device,
        )
        self.logger.info(
            f"validation at iteration {iteration}: {self.backbone} accuracy {100 * metrics['accuracy']:.2f}% "
            f"(AUC {metrics['auc']:.3f}, {metrics['train_seconds']:.1f} s)"
        )
        handler = self.mlflow_handler
        if handler is not None and getattr(handler, "cur_run", None) is not None:
            run_id = handler.cur_run.info.run_id
            for key in ("accuracy", "auc", "f1"):
                if metrics[key] == metrics[key]:  # skip NaN
                    handler.client.log_metric(run_id, f"val_{key}", float(metrics[key]), step=iteration)
