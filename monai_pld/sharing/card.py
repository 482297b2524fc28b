"""The card of a shared package (its ``README.md``): what the images are, where they come from, what the privacy
audit found, and how to use them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["package_card"]


def _made_by(manifest: Mapping[str, Any]) -> str:
    method = manifest["method"]
    made = f"Made by `monai_pld` {manifest['versions'].get('monai_pld', '?')} on {manifest['created'][:10]}"
    if method.get("parameterization") in ("random", "full"):
        return f"{made}: **real training images** (the `{method['parameterization']}` baseline), not synthetic ones."
    parts = [
        f"{method['parameterization']} parameterisation" if method.get("parameterization") else None,
        f"{method['matcher']} matcher" if method.get("matcher") else None,
        f"IPC {method['ipc']}" if method.get("ipc") is not None else None,
        f"rank {method['rank']}" if method.get("rank") is not None else None,
        f"seed {method['seed']}" if method.get("seed") is not None else None,
        f"{method['iterations']} iterations" if method.get("iterations") is not None else None,
    ]
    return f"{made}: {', '.join(p for p in parts if p)}."


def _read_note(read: Mapping[str, Any] | None) -> list[str]:
    """How a site's own images were read (input form, conversions, unreadable images left out), for the card."""
    if not read:
        return []
    converted = ", ".join(f"{n} {what}" for what, n in sorted((read.get("converted") or {}).items()))
    return [
        "",
        f"Read from a {read.get('format')} source: {read.get('images_listed')} images listed, "
        f"{read.get('skipped_unreadable', 0)} unreadable left out; converted: {converted or 'none'}.",
    ]


def _drawn_note(drawn: Mapping[str, Any] | None, generator: Mapping[str, Any]) -> list[str]:
    """The audit of what a receiving site can draw from the shipped distribution and generator."""
    lines = [""]
    for name, r in (drawn or {}).items():
        lines.append(
            f"Drawn by a receiving site, {name.replace('_', ' ')} ({r['source']}): {r['near_copies']} near-copies, "
            f"{r['exact_copies']} exact (closest RMS {r['min_distance']:.4f}), same threshold."
        )
    if generator.get("class") == "AutoencoderKLGenerator" and not generator.get("packaged"):
        lines.append("The generator (trained on the source images) is not in this package.")
    elif not drawn:
        lines.append("Nothing beyond the images above can be drawn from this package.")
    return lines


def package_card(manifest: Mapping[str, Any]) -> str:
    """The package's ``README.md`` for people: what the images are, the source data and licence, the privacy
    audit, how to use it and the files."""
    source = manifest["source"]
    audit = manifest.get("privacy_audit") or {}
    shape = manifest["images"]
    counts = ", ".join(f"{n} {c}" for n, c in zip(manifest["images_per_class"], manifest["class_names"], strict=True))
    lines = [
        f"# Distilled {source['dataset']} set",
        "",
        f"{shape['count']} images ({shape['height']} x {shape['width']} px, {shape['channels']} "
        f"channel(s)) of {len(manifest['class_names'])} classes: {counts}.",
        _made_by(manifest),
        "",
        "## Source data",
        "",
        f"{source['dataset']} (`{source['dataset_flag']}`, {source.get('image_size')} px). Licence: "
        f"{source['licence']}. Cite: {source['attribution']}" + (f" ({source['url']})" if source.get("url") else ""),
        *_read_note(source.get("read")),
        "",
        "## Privacy audit",
        "",
    ]
    if audit.get("performed"):
        verdict = "Passed." if audit.get("passed") else "**Near-copies were found and the export was forced.**"
        lines += [
            f"Every synthetic image against its nearest real training image, calibrated on "
            f"{audit.get('heldout_images')} held-out (`{audit.get('heldout_split')}`) images: "
            f"{audit.get('near_copies')} image(s) closer than the {audit.get('percentile')}th percentile of the "
            f"held-out images (threshold {audit.get('pixel_threshold'):.4f} RMS), {audit.get('exact_copies')} exact "
            f"copies; membership-inference AUC {audit.get('membership_auc'):.3f} (0.5 = no signal). {verdict}",
            "See `privacy/audit.json` and `privacy/closest_pairs.png`.",
            *_drawn_note(audit.get("drawn"), manifest.get("generator") or {}),
        ]
    else:
        lines.append("**No privacy audit was run for this package.**")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from monai_pld.formats import load_distilled",
        f'package = load_distilled("{manifest["name"]}")   # verifies every checksum first',
        "images, labels = package.images, package.labels  # float (N, C, H, W) in [0, 1], int64 (N,)",
        "```",
        "",
        "Or evaluate it directly: `python -m monai.bundle run --config_file bundles/<set>/evaluate.yaml "
        "--distilled <this package>`.",
        "",
        "## Files",
        "",
    ]
    lines += [
        f"* `{name}` ({entry['bytes']} bytes, SHA-256 `{entry['sha256'][:16]}...`)"
        for name, entry in manifest["files"].items()
    ]
    return "\n".join(lines) + "\n"
