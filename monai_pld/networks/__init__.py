"""Networks: generators and classifiers. (``LatentCodes``, ``LatentParameterization`` and ``SLFDistribution`` are
re-exported from :mod:`monai_pld.parameterizations` for one release.)"""

from monai_pld.parameterizations import LatentCodes, LatentParameterization, SLFDistribution

from .classifiers import ConvNet, get_classifier
from .generators import AutoencoderKLGenerator, ExternalGenerator, LatentGenerator, PixelGenerator, load_generator

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
