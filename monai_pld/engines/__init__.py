"""Engines: distillation, generator pretraining."""

from .distillation import DistillationTrainer
from .generator import GeneratorTrainer, ensure_generator, pretrain_generator, reconstruction_metrics

__all__ = [
    "DistillationTrainer",
    "GeneratorTrainer",
    "ensure_generator",
    "pretrain_generator",
    "reconstruction_metrics",
]
