"""Sharing a distilled set: a package written for another site, its card, and the privacy audit that gates it.

Reading and verifying a package is :mod:`monai_pld.formats.package`; it is re-exported here so that both sides of a
hand-over are in one place.
"""

from monai_pld.formats.package import (
    PACKAGE_FORMAT,
    DistilledPackage,
    PackageError,
    is_package,
    load_distilled,
    package_sha256,
    read_nifti_stack,
)

from .card import package_card
from .package import class_stem, export_package
from .privacy import PrivacyAuditError, audit_privacy, audit_summary, check_audit, shared_model_images, write_audit

__all__ = [
    "PACKAGE_FORMAT",
    "DistilledPackage",
    "PackageError",
    "PrivacyAuditError",
    "audit_privacy",
    "audit_summary",
    "check_audit",
    "class_stem",
    "export_package",
    "is_package",
    "load_distilled",
    "package_card",
    "package_sha256",
    "read_nifti_stack",
    "shared_model_images",
    "write_audit",
]
