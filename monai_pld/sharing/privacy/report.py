"""The audit on disk (JSON and a picture of the closest pairs), its summary for manifests and cards, and the
refusal of an export that did not pass."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_pld.data import ImageSet
from monai_pld.utils import atomic_save_json, atomic_write

from .audit import PrivacyAuditError, _as_unit_float

logger = logging.getLogger("monai_pld")


def _closest_pairs_png(audit: dict[str, Any], synthetic: torch.Tensor, train: ImageSet, top_k: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = _as_unit_float(synthetic)
    per_image = audit["per_image"]
    order = sorted(range(len(per_image)), key=lambda i: per_image[i]["pixel_distance"])[:top_k]
    # a fixed figure size (no bbox_inches="tight"), so the PNG is 2 panels wide and one row per pair high
    fig, axes = plt.subplots(len(order), 2, figsize=(4.4, 2.4 * len(order)), squeeze=False)
    gray = x.shape[1] == 1
    names = train.class_names
    for row, i in enumerate(order):
        entry = per_image[i]
        k = entry["nearest_train_index"]
        pair = (x[i], train.float_images(slice(k, k + 1))[0])
        titles = (
            f"synthetic #{i} ({names[entry['label']]})",
            f"train #{k} ({names[int(train.labels[k])]})",
        )
        for col, (image, title) in enumerate(zip(pair, titles, strict=True)):
            ax = axes[row, col]
            shown = image[0].numpy() if gray else image.permute(1, 2, 0).numpy()
            ax.imshow(shown, cmap="gray" if gray else None, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        flag = "  FLAGGED" if entry["flagged"] else ""
        axes[row, 0].set_xlabel(
            f"RMS {entry['pixel_distance']:.4f}, percentile {entry['pixel_percentile']:.1f}%{flag}",
            fontsize=7,
            color="red" if entry["flagged"] else "black",
            loc="left",
        )
    threshold = audit["pixel"]["threshold"]
    fig.suptitle(f"closest pairs (threshold {threshold:.4f})", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (2.4 * len(order))))  # keep 0.3 inch free for the title
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_audit(
    audit: dict[str, Any], output_dir: str | os.PathLike, synthetic: torch.Tensor, train: ImageSet, top_k: int = 8
) -> dict[str, Path]:
    """Write ``audit.json`` and ``closest_pairs.png`` (the ``top_k`` synthetic images nearest to a training image,
    each beside that training image, annotated with the distance, its held-out percentile and FLAGGED).

    Args:
        audit: the result of :func:`audit_privacy`.
        output_dir: folder for both files (created when needed).
        synthetic: the audited synthetic images (same order as in the audit).
        train: the training split the audit was run against.
        top_k: number of pairs shown (at most the number of synthetic images).

    Returns:
        ``{"json": path, "png": path}``.

    Raises:
        ValueError: when ``synthetic`` does not have as many images as the audit, or ``top_k < 1``.
    """
    if len(synthetic) != len(audit["per_image"]):
        raise ValueError(
            f"synthetic holds {len(synthetic)} images but the audit covers {len(audit['per_image'])}; pass the "
            "images that were audited"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"'top_k' must be a positive integer, got {top_k!r}")
    out = Path(output_dir)
    json_path = atomic_save_json(audit, out / "audit.json")
    png = _closest_pairs_png(audit, synthetic, train, int(top_k))
    png_path = atomic_write(out / "closest_pairs.png", lambda f: f.write(png))
    return {"json": json_path, "png": png_path}


def audit_summary(audit: dict[str, Any]) -> dict[str, Any]:
    """The compact part of an audit for a manifest: thresholds, flag counts, membership AUCs, the verdict and the
    sizes it rests on."""
    settings = audit["settings"]
    summary: dict[str, Any] = {
        "passed": audit["passed"],
        "near_copies": audit["near_copies"],
        "exact_copies": audit["exact_copies"],
        "percentile": settings["percentile"],
        "pixel_threshold": audit["pixel"]["threshold"],
        "pixel_flagged_fraction": audit["pixel"]["flagged_fraction"],
        "pixel_min_distance": audit["pixel"]["min_distance"],
        "membership_auc": audit["membership_auc"],
        "heldout_split": settings["heldout_split"],
        "synthetic_images": settings["synthetic_images"],
        "reference_images": settings["reference_images"],
        "heldout_images": settings["heldout_images"],
        "member_images": settings["member_images"],
    }
    if "drawn" in audit:
        summary["drawn"] = {
            name: {k: r[k] for k in ("source", "images", "near_copies", "exact_copies", "min_distance")}
            for name, r in audit["drawn"].items()
        }
    if "feature" in audit:
        summary.update(
            {
                "feature_backbone": settings["feature_backbone"],
                "feature_threshold": audit["feature"]["threshold"],
                "feature_flagged_fraction": audit["feature"]["flagged_fraction"],
                "membership_auc_feature": audit.get("membership_auc_feature"),
            }
        )
    return summary


def check_audit(audit: dict[str, Any], force: bool = False) -> None:
    """Refuse an export that the audit flagged, unless forced.

    Args:
        audit: the result of :func:`audit_privacy`.
        force: export anyway; a warning is logged instead.

    Raises:
        PrivacyAuditError: when the audit did not pass and ``force`` is false.
    """
    if audit["passed"]:
        return
    pixel, settings = audit["pixel"], audit["settings"]
    finding = (
        f"{audit['near_copies']} of {settings['synthetic_images']} synthetic images are closer to a training image "
        f"than the {settings['percentile']:g}th percentile of held-out images (worst RMS distance "
        f"{pixel['min_distance']:.4f}, threshold {pixel['threshold']:.4f}; {audit['exact_copies']} exact copies)"
    )
    for name, r in (audit.get("drawn") or {}).items():
        if r["near_copies"]:
            finding += (
                f"; {r['near_copies']} of {r['images']} {name.replace('_', ' ')} ({r['source']}) too (worst "
                f"{r['min_distance']:.4f})"
            )
    if force:
        logger.warning(f"privacy audit failed but export was forced: {finding}")
        return
    raise PrivacyAuditError(
        f"privacy audit failed: {finding}. They may reproduce patient images; see closest_pairs.png. Distil with "
        "--init noise or more --iterations so the images move away from their real initialisation; leave out what "
        "draws near-copies (--include_distribution false, --include_generator false); or export anyway with "
        "--force true"
    )
