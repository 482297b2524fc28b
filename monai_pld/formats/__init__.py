"""Every on-disk format of the package, in one place: each file is written and read by the module of its format.

* :mod:`~monai_pld.formats.images`: ``images.npz`` (the distilled images; one validating reader);
* :mod:`~monai_pld.formats.distribution`: ``distribution.pt`` (a learnt parameterisation);
* :mod:`~monai_pld.formats.distilled`: a run's ``distilled/`` folder (those two and ``manifest.json``);
* :mod:`~monai_pld.formats.experts`: expert trajectories (``expert_NNN.pt``) and their index ``experts.json``;
* :mod:`~monai_pld.formats.package`: reading and verifying a shared package (folder or ``.zip``).
"""

from .distilled import export_distilled_set, read_distilled_folder
from .distribution import DISTILLED_FORMAT, DISTRIBUTION_FILE, load_distribution, save_distribution
from .experts import EXPERT_FORMAT, ExpertBuffer, ExpertFileError, expert_settings, read_expert
from .images import IMAGES_FILE, ImagesFileError, as_float_images, read_images, to_uint8_images, write_images
from .package import (
    PACKAGE_FORMAT,
    DistilledPackage,
    PackageError,
    is_package,
    load_distilled,
    package_sha256,
    read_nifti_stack,
)

__all__ = [
    "DISTILLED_FORMAT",
    "DISTRIBUTION_FILE",
    "EXPERT_FORMAT",
    "IMAGES_FILE",
    "PACKAGE_FORMAT",
    "DistilledPackage",
    "ExpertBuffer",
    "ExpertFileError",
    "ImagesFileError",
    "PackageError",
    "as_float_images",
    "export_distilled_set",
    "expert_settings",
    "is_package",
    "load_distilled",
    "load_distribution",
    "package_sha256",
    "read_distilled_folder",
    "read_expert",
    "read_images",
    "read_nifti_stack",
    "save_distribution",
    "to_uint8_images",
    "write_images",
]
