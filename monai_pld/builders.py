"""Deprecated alias of :mod:`monai_pld.workflows.builders`, kept for one release.

The builders live in :mod:`monai_pld.workflows`; the initial selection in :mod:`monai_pld.data` and
``load_distribution`` in :mod:`monai_pld.formats`. Import them from there.
"""

from monai_pld.data.sampling import select_initial_images, select_initial_indices
from monai_pld.formats.distribution import load_distribution
from monai_pld.workflows.builders import (
    build_generator,
    build_matcher,
    build_optimizer,
    build_parameterization,
    build_trainer,
    class_latent_prior,
    encode_images,
)

__all__ = [
    "build_generator",
    "select_initial_indices",
    "select_initial_images",
    "encode_images",
    "class_latent_prior",
    "build_parameterization",
    "build_matcher",
    "build_optimizer",
    "load_distribution",
    "build_trainer",
]
