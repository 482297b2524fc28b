"""Deprecated alias of :mod:`monai_pld.sharing` (and :mod:`monai_pld.formats` for reading), kept for one release;
import from there (``check_export_config`` from :mod:`monai_pld.workflows`)."""

from .package import (
    PACKAGE_FORMAT,
    DistilledPackage,
    PackageError,
    check_export_config,
    export_package,
    is_package,
    load_distilled,
    package_sha256,
    read_distilled_folder,
    read_nifti_stack,
)
from .privacy import PrivacyAuditError, audit_privacy, audit_summary, check_audit, write_audit

__all__ = [
    "PACKAGE_FORMAT",
    "DistilledPackage",
    "PackageError",
    "PrivacyAuditError",
    "audit_privacy",
    "audit_summary",
    "check_audit",
    "check_export_config",
    "export_package",
    "is_package",
    "load_distilled",
    "package_sha256",
    "read_distilled_folder",
    "read_nifti_stack",
    "write_audit",
]
