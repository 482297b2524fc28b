"""Deprecated alias of :mod:`monai_pld.evaluation`, kept for one release.

Evaluation is its own layer, :mod:`monai_pld.evaluation`; ``check_evaluation_config`` is in
:mod:`monai_pld.workflows`. Import them from there.
"""

from monai_pld.evaluation import (
    EVAL_MODES,
    PROTOCOLS,
    ImageSource,
    classification_metrics,
    default_evaluation_dir,
    evaluate_image_set,
    load_image_source,
    summarise,
    train_and_test,
    train_classifier,
)
from monai_pld.workflows.config import check_evaluation_config

__all__ = [
    "EVAL_MODES",
    "PROTOCOLS",
    "check_evaluation_config",
    "default_evaluation_dir",
    "ImageSource",
    "classification_metrics",
    "evaluate_image_set",
    "load_image_source",
    "summarise",
    "train_and_test",
    "train_classifier",
]
