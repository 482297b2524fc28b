"""Datasets as ``ImageSet`` (uint8, channel-first, labels, class names), the seeded initial selection, class-balanced
real batches, and ``ImageSource`` (the images a classifier trains on).

MedMNIST 2D (any flag), CIFAR-10, ten-class ImageNet subsets and ``custom`` (a site's own images: an image folder,
a MONAI datalist, a CSV or an npz); :func:`load_dataset` dispatches by name.
"""

from .base import ImageSet
from .cifar import CIFAR10_CLASSES, load_cifar10
from .custom import CUSTOM_FORMATS, DEFAULT_DATA_OPTIONS, check_data_options, load_custom, source_summary
from .image_source import EVAL_MODES, ImageSource
from .imagenet import IMAGENET_SUBSETS, load_imagenet_subset
from .medmnist import DatasetNotFoundError, default_medmnist_root, load_medmnist, medmnist_filename, medmnist_info
from .registry import (
    check_dataset,
    dataset_attribution,
    dataset_names,
    default_data_root,
    default_image_size,
    load_dataset,
)
from .sampling import ClassBalancedBatches, select_initial_images, select_initial_indices

__all__ = [
    "CIFAR10_CLASSES",
    "CUSTOM_FORMATS",
    "DEFAULT_DATA_OPTIONS",
    "EVAL_MODES",
    "IMAGENET_SUBSETS",
    "ClassBalancedBatches",
    "DatasetNotFoundError",
    "ImageSet",
    "ImageSource",
    "check_data_options",
    "check_dataset",
    "dataset_attribution",
    "dataset_names",
    "default_data_root",
    "default_image_size",
    "default_medmnist_root",
    "load_cifar10",
    "load_custom",
    "load_dataset",
    "load_imagenet_subset",
    "load_medmnist",
    "medmnist_filename",
    "medmnist_info",
    "select_initial_images",
    "select_initial_indices",
    "source_summary",
]
