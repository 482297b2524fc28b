"""Datasets as ``ImageSet`` (uint8, channel-first, labels, class names) and class-balanced real batches."""

from .base import ImageSet
from .medmnist import DatasetNotFoundError, default_medmnist_root, load_medmnist, medmnist_filename, medmnist_info
from .sampling import ClassBalancedBatches

__all__ = [
    "ClassBalancedBatches",
    "DatasetNotFoundError",
    "ImageSet",
    "default_medmnist_root",
    "load_medmnist",
    "medmnist_filename",
    "medmnist_info",
]
