"""Privacy audit of a synthetic image set before it leaves the hospital (how it decides: :mod:`.audit`)."""

from .audit import PrivacyAuditError, audit_privacy, shared_model_images
from .report import audit_summary, check_audit, write_audit

__all__ = [
    "PrivacyAuditError",
    "audit_privacy",
    "write_audit",
    "audit_summary",
    "check_audit",
    "shared_model_images",
]
