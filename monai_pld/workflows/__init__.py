"""The top layer: what the bundles, tests and benchmarks call to run the package end to end.

The builders turn configuration values into a generator, a parameterisation, a matcher, an optimiser and a complete
distillation trainer (:mod:`~monai_pld.workflows.builders`); the config checks validate a bundle's values before any
work starts (:mod:`~monai_pld.workflows.config`). Nothing else in the package imports this layer.
"""

from .builders import (
    build_generator,
    build_matcher,
    build_optimizer,
    build_parameterization,
    build_trainer,
    class_latent_prior,
    encode_images,
)
from .config import check_distillation_config, check_evaluation_config, check_export_config

__all__ = [
    "build_generator",
    "build_matcher",
    "build_optimizer",
    "build_parameterization",
    "build_trainer",
    "check_distillation_config",
    "check_evaluation_config",
    "check_export_config",
    "class_latent_prior",
    "encode_images",
]
