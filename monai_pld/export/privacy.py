"""Deprecated alias of :mod:`monai_pld.sharing.privacy`, kept for one release; import from there."""

from monai_pld.sharing.privacy import (
    PrivacyAuditError,
    audit_privacy,
    audit_summary,
    check_audit,
    shared_model_images,
    write_audit,
)

__all__ = ["PrivacyAuditError", "audit_privacy", "audit_summary", "check_audit", "shared_model_images", "write_audit"]
