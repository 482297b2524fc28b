"""Privacy audit of a synthetic image set before it leaves the hospital: is any synthetic image a near-copy of a
real training image?

A synthetic image is compared with its nearest training image. "Near" is calibrated on real images the distillation
never saw: the held-out split's nearest-training-image distances tell how close an unrelated real image of the same
kind typically comes to the training set, and a synthetic image closer than the ``percentile``-th of those is
flagged. Distances are RMS per-pixel differences in ``[0, 1]`` (so thresholds compare across image sizes) and,
optionally, Euclidean distances between L2-normalised features of a network trained on the real training split.

What a receiving site can draw is audited with the same rule: many samples of a shipped distribution (several per
slot) and decodes of random latents from the shipped generator's prior (a standard normal over its latent), each
against the training images (:func:`shared_model_images`, the ``drawn`` argument of :func:`audit_privacy`).

A membership-inference AUC summarises the whole set: can training images be told from held-out images by how close
they come to the synthetic set? 0.5 means no signal; near 1 means the synthetic set reveals who was in the training
split.
"""

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
