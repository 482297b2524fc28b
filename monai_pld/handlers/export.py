"""Write the distilled set when distillation completes: ``images.npz``, ``distribution.pt`` and ``manifest.json``
(the format of :mod:`monai_pld.formats.distilled`), and log it into the run's MLflow run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ignite.engine import Engine, Events

from monai_pld.formats.distilled import export_distilled_set
from monai_pld.formats.distribution import DISTILLED_FORMAT
from monai_pld.utils import flatten_params

from .parts import take_run_parts

__all__ = ["DistilledSetExporter", "export_distilled_set", "DISTILLED_FORMAT"]


class DistilledSetExporter:
    """Ignite handler that calls :func:`export_distilled_set` when the engine completes.

    With ``mlflow_handler`` (MONAI's ``MLFlowHandler`` of the same run) the files are logged into that run under
    ``distilled/``; register the exporter *before* the MLflow handler, which closes the run at completion.

    Args:
        output_dir: target folder.
        parameterization, generator, class_names, mode, seed: see :func:`export_distilled_set`; the
            parameterisation and generator default to the engine's (taken when the handler is attached).
        config: configuration values recorded in the manifest.
        dataset: dataset description recorded in the manifest (flag, image size, split sizes...).
        mlflow_handler: optional ``MLFlowHandler`` whose run receives the files as artefacts.
        matcher: the matcher used (default: the engine's); its settings go into the manifest and, as
            ``matcher.<key>`` params, into MLflow.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        parameterization: Any = None,
        generator: Any = None,
        class_names: Sequence[str] | None = None,
        mode: str = "mean",
        seed: int = 0,
        config: Mapping[str, Any] | None = None,
        dataset: Mapping[str, Any] | None = None,
        mlflow_handler: Any = None,
        matcher: Any = None,
    ) -> None:
        if mode not in ("mean", "sample"):
            raise ValueError(f"export mode must be 'mean' or 'sample', got {mode!r}")
        if class_names is None:
            raise ValueError("DistilledSetExporter needs the class names (e.g. the training split's class_names)")
        self.output_dir = output_dir
        self.parameterization = parameterization
        self.generator = generator
        self.class_names = list(class_names)
        self.mode = mode
        self.seed = seed
        self.config = dict(config or {})
        self.dataset = dict(dataset or {})
        self.mlflow_handler = mlflow_handler
        self.matcher = matcher
        self.logger = logging.getLogger("monai_pld")
        self._start = 0.0
        self._start_iteration = 0

    def attach(self, engine: Engine) -> None:
        take_run_parts(self, engine, ("parameterization", "generator", "matcher"))
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        self._start = time.perf_counter()
        self._start_iteration = engine.state.iteration

    def completed(self, engine: Engine) -> None:
        seconds = time.perf_counter() - self._start
        done = engine.state.iteration - self._start_iteration
        handler = self.mlflow_handler
        run = getattr(handler, "cur_run", None) if handler is not None else None
        # recorded so that a later export can attach the shared package to the run that produced the set
        tracking = {"tracking_uri": str(handler.client.tracking_uri), "run_id": run.info.run_id} if run else None
        manifest = export_distilled_set(
            self.output_dir,
            self.parameterization,
            self.generator,
            self.class_names,
            mode=self.mode,
            seed=self.seed,
            config=self.config,
            matcher=self.matcher,
            extra={
                "dataset": self.dataset,
                "iterations": int(engine.state.iteration),
                "timings": {
                    "distillation_seconds_this_process": round(seconds, 3),
                    "iterations_this_process": int(done),
                    "seconds_per_iteration": round(seconds / max(done, 1), 4),
                },
                "mlflow": tracking,
            },
        )
        if run is not None:
            run_id = run.info.run_id
            handler.client.log_artifacts(run_id, str(self.output_dir), artifact_path="distilled")
            for key, value in manifest["timings"].items():
                handler.client.log_metric(run_id, key, float(value), step=int(engine.state.iteration))
            self._log_matcher_params(handler, run_id, manifest.get("matcher") or {})
        per_class = manifest["ipc"] if manifest["ipc"] is not None else "varying"
        self.logger.info(
            f"distilled set written to {self.output_dir}: {manifest['images']['shape'][0]} images "
            f"({per_class} per class, {manifest['num_classes']} classes)"
        )

    @staticmethod
    def _log_matcher_params(handler: Any, run_id: str, settings: Mapping[str, Any]) -> None:
        """The matcher's settings as ``matcher.<key>`` params, skipping keys a resumed run has already logged."""
        from mlflow.entities import Param

        logged = handler.client.get_run(run_id).data.params
        params = [
            Param(f"matcher.{k}", str(v)[:6000])
            for k, v in flatten_params(settings).items()
            if f"matcher.{k}" not in logged
        ]
        if params:
            handler.client.log_batch(run_id, params=params)
