"""Write the distilled set when distillation completes: ``images.npz``, ``distribution.pt`` and ``manifest.json``.

Each file is written atomically and the manifest last, with the SHA-256 of the others: a folder with a manifest is
complete, and a crash during export never leaves a half-written set that looks finished.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from monai_pld.utils import (
    atomic_save_json,
    atomic_save_torch,
    atomic_savez,
    flatten_params,
    library_versions,
    sha256_file,
)

__all__ = ["DistilledSetExporter", "export_distilled_set", "DISTILLED_FORMAT"]

DISTILLED_FORMAT = 1


def _generator_record(generator: Any) -> dict[str, Any]:
    # the class of the checkpoint (generator.pt); a decoder split at a feature map is that checkpoint read at
    # ``latent_layer``, and ``latent_shape`` is the shape of the distilled latents
    base = getattr(generator, "base", generator)
    record: dict[str, Any] = {"class": type(base).__name__, "latent_shape": list(generator.latent_shape)}
    for attr in ("checkpoint_path", "checkpoint_sha256"):
        if getattr(generator, attr, None) is not None:
            record[attr.replace("checkpoint_", "")] = getattr(generator, attr)
    if getattr(generator, "config", None) is not None:
        record["config"] = generator.config
    record["latent_layer"] = int(getattr(generator, "layer", 0))
    return record


def export_distilled_set(
    output_dir: str | os.PathLike,
    parameterization: Any,
    generator: Any,
    class_names: Sequence[str],
    mode: str = "mean",
    seed: int = 0,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    matcher: Any = None,
) -> dict[str, Any]:
    """Render and write the distilled set into ``output_dir``; returns the manifest.

    A fixed real-image baseline (``RealImageSet``: ``random``/``full``) gets the same ``images.npz`` and manifest
    but no ``distribution.pt``, since there is no distribution to sample from.

    Args:
        output_dir: target folder (``<run>/distilled``).
        parameterization: the trained ``SLFDistribution``/``LatentCodes``, or a ``RealImageSet``.
        generator: the frozen generator used in training.
        class_names: names of the classes, index = label.
        mode: ``mean`` (default: the strict IPC budget from the means) or ``sample`` (one fixed-seed sample).
        seed: seed of the ``sample`` mode.
        config: the run's configuration values, recorded verbatim.
        extra: more manifest entries (timings, iterations done...).
        matcher: the matcher used; its ``hyper_parameters()`` are recorded under ``matcher``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = parameterization.render(generator, mode=mode, seed=seed)
    images_u8 = (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    labels_np = labels.detach().cpu().numpy().astype(np.int64)
    atomic_savez(out / "images.npz", images=images_u8, labels=labels_np, class_names=np.asarray(class_names, dtype=str))
    hyper = dict(getattr(parameterization, "hyper_parameters", {}) or {})
    ipc = None if parameterization.ipc is None else int(parameterization.ipc)
    names = ["images.npz"]
    if not getattr(parameterization, "fixed", False):
        state = {k: v.detach().cpu() for k, v in parameterization.state_dict().items()}
        atomic_save_torch(
            {
                "format": DISTILLED_FORMAT,
                "parameterization": type(parameterization).__name__,
                "hyper_parameters": hyper,
                "state_dict": state,
                "num_classes": len(class_names),
                "ipc": ipc,
                "latent_shape": list(generator.latent_shape),
            },
            out / "distribution.pt",
        )
        names.append("distribution.pt")
    elif (out / "distribution.pt").exists():  # left over from an earlier run into the same folder
        (out / "distribution.pt").unlink()
    files = {name: {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size} for name in names}
    manifest = {
        "format": DISTILLED_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "ipc": ipc,
        "images_per_class": torch.bincount(labels.cpu(), minlength=len(class_names)).tolist(),
        "parameterization": hyper,
        "matcher": dict(matcher.hyper_parameters()) if matcher is not None else None,
        "images": {"shape": list(images_u8.shape), "layout": "NHWC", "dtype": "uint8", "render_mode": mode},
        "generator": _generator_record(generator),
        "files": files,
        "versions": library_versions(),
        "config": dict(config or {}),
        **dict(extra or {}),
    }
    atomic_save_json(manifest, out / "manifest.json")
    return manifest


class DistilledSetExporter:
    """Ignite handler that calls :func:`export_distilled_set` when the engine completes.

    With ``mlflow_handler`` (MONAI's ``MLFlowHandler`` of the same run) the files are logged into that run under
    ``distilled/``; register the exporter *before* the MLflow handler, which closes the run at completion.

    Args:
        output_dir: target folder.
        parameterization, generator, class_names, mode, seed: see :func:`export_distilled_set`.
        config: configuration values recorded in the manifest.
        dataset: dataset description recorded in the manifest (flag, image size, split sizes...).
        mlflow_handler: optional ``MLFlowHandler`` whose run receives the files as artefacts.
        matcher: the matcher used; its settings go into the manifest and, as ``matcher.<key>`` params, into MLflow.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        parameterization: Any,
        generator: Any,
        class_names: Sequence[str],
        mode: str = "mean",
        seed: int = 0,
        config: Mapping[str, Any] | None = None,
        dataset: Mapping[str, Any] | None = None,
        mlflow_handler: Any = None,
        matcher: Any = None,
    ) -> None:
        if mode not in ("mean", "sample"):
            raise ValueError(f"export mode must be 'mean' or 'sample', got {mode!r}")
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
