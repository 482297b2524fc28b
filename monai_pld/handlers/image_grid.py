"""PNG grids of the current synthetic images, written every few iterations and logged to MLflow as they appear."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image

from monai_pld.utils import atomic_write

from .parts import take_run_parts

__all__ = ["SyntheticImageGrid", "image_grid", "save_png"]


def image_grid(images: torch.Tensor, labels: torch.Tensor, padding: int = 2) -> np.ndarray:
    """Arrange images in ``[0, 1]`` as one row per class (class-sorted order), returned as ``uint8`` HWC."""
    from torchvision.utils import make_grid

    order = torch.argsort(labels.cpu(), stable=True)
    per_row = int(torch.bincount(labels.cpu()).max().item())
    grid = make_grid(images.detach().cpu()[order].clamp(0, 1), nrow=per_row, padding=padding, pad_value=1.0)
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def first_per_class(images: torch.Tensor, labels: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` images of every class, in their original order."""
    labels_cpu = labels.cpu()
    rank = torch.zeros_like(labels_cpu)
    for c in labels_cpu.unique():  # one vectorised cumulative count per class
        mask = labels_cpu == c
        rank[mask] = torch.arange(int(mask.sum()))
    keep = (rank < limit).nonzero().squeeze(1)
    return images[keep.to(images.device)], labels[keep.to(labels.device)]


def save_png(array: np.ndarray, path: str | os.PathLike, upscale: int = 1) -> Path:
    """Atomically write a ``uint8`` HWC (or HW) array as PNG, optionally enlarged by nearest-neighbour upscaling."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    image = Image.fromarray(array)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


class SyntheticImageGrid:
    """Every ``interval`` iterations (and at the end) render the synthetic set and save ``grids/iter_<n>.png``.

    Args:
        output_dir: folder for the PNG files (created when needed).
        parameterization: object with ``render(generator, mode)``, e.g. ``SLFDistribution`` (default: the engine's,
            taken when the handler is attached).
        generator: the frozen generator (default: the engine's).
        interval: iterations between grids.
        mode: ``mean`` or ``sample`` (what is rendered).
        mlflow_handler: optional MONAI ``MLFlowHandler`` of the same run; grids are logged into its run under
            ``grids/`` as soon as they are written, so they show in the MLflow UI during the run.
        upscale: nearest-neighbour enlargement of small images (28 px) for viewing.
        max_per_class: at most this many images of each class are shown (the ``full`` baseline has thousands).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        parameterization: Any = None,
        generator: Any = None,
        interval: int = 100,
        mode: str = "mean",
        mlflow_handler: Any = None,
        upscale: int = 2,
        max_per_class: int = 20,
    ) -> None:
        if interval < 1:
            raise ValueError(f"grid interval must be >= 1, got {interval}")
        self.output_dir = Path(output_dir)
        self.parameterization = parameterization
        self.generator = generator
        self.interval = interval
        self.mode = mode
        self.mlflow_handler = mlflow_handler
        self.upscale = upscale
        self.max_per_class = int(max_per_class)
        self.logger = logging.getLogger("monai_pld")

    def attach(self, engine: Engine) -> None:
        take_run_parts(self, engine)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        path = self.output_dir / f"iter_{engine.state.iteration:06d}.png"
        if path.exists():  # COMPLETED right after an interval iteration
            return
        images, labels = self.parameterization.render(self.generator, mode=self.mode)
        images, labels = first_per_class(images, labels, self.max_per_class)
        save_png(image_grid(images, labels), path, upscale=self.upscale)
        handler = self.mlflow_handler
        if handler is not None and getattr(handler, "cur_run", None) is not None:
            handler.client.log_artifact(handler.cur_run.info.run_id, str(path), artifact_path="grids")
