"""Ignite/MONAI handlers: progress lines, image grids, periodic validation, distilled-set export, resume."""

from .export import DistilledSetExporter, export_distilled_set
from .image_grid import SyntheticImageGrid, image_grid, save_png
from .periodic_eval import PeriodicEvaluation
from .progress import ProgressLogger, format_duration
from .resume import AtomicCheckpointSaver, CheckpointError, ResumeFromCheckpoint, RunSettings, latest_checkpoint

__all__ = [
    "AtomicCheckpointSaver",
    "CheckpointError",
    "DistilledSetExporter",
    "PeriodicEvaluation",
    "ProgressLogger",
    "ResumeFromCheckpoint",
    "RunSettings",
    "SyntheticImageGrid",
    "export_distilled_set",
    "format_duration",
    "image_grid",
    "latest_checkpoint",
    "save_png",
]
