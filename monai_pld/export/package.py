"""Deprecated alias, kept for one release: writing a package is :mod:`monai_pld.sharing.package`, reading and
verifying one :mod:`monai_pld.formats.package`, ``read_distilled_folder`` :mod:`monai_pld.formats.distilled` and
``check_export_config`` :mod:`monai_pld.workflows`. Import them from there.
"""

from monai_pld.formats.distilled import read_distilled_folder
from monai_pld.formats.package import (
    KNOWN_FORMATS,
    MANIFEST,
    PACKAGE_FORMAT,
    DistilledPackage,
    PackageError,
    is_package,
    load_distilled,
    package_sha256,
    read_nifti_stack,
)
from monai_pld.sharing.package import class_stem, export_package
from monai_pld.workflows.config import check_export_config

__all__ = [
    "KNOWN_FORMATS",
    "MANIFEST",
    "PACKAGE_FORMAT",
    "check_export_config",
    "class_stem",
    "DistilledPackage",
    "PackageError",
    "export_package",
    "is_package",
    "load_distilled",
    "package_sha256",
    "read_distilled_folder",
    "read_nifti_stack",
]
