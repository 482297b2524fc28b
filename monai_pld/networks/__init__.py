"""Networks: generators, latent parameterisations, classifiers."""

from .classifiers import ConvNet, get_classifier
from .generators import AutoencoderKLGenerator, ExternalGenerator, LatentGenerator, PixelGenerator, load_generator
from .latent_distribution import LatentCodes, LatentParameterization, SLFDistribution

__all__ = [
    "AutoencoderKLGenerator",
    "ConvNet",
    "ExternalGenerator",
    "LatentCodes",
    "LatentGenerator",
    "LatentParameterization",
    "PixelGenerator",
    "SLFDistribution",
    "get_classifier",
    "load_generator",
]
