"""Sharing a distilled set: a verified package (write, verify, load) and the privacy audit that gates it."""

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
