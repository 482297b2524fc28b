"""A distilled set as a self-contained, verifiable package that one site hands to another.

A package is a folder or a ``.zip`` with the same members:

* ``images.npz``: ``images`` uint8 ``(N, H, W, C)``, ``labels`` int64 ``(N,)``, ``class_names`` (loads without pickle);
* ``distribution.pt`` and ``generator.pt`` (optional): the distilled distribution and the generator's weights, to
  draw more images (both load with ``torch.load(weights_only=True)``);
* ``nifti/class_NN_<name>.nii.gz``: the images of one class as a stack, for tools that read NIfTI;
* ``previews/class_NN_<name>.png`` and ``previews/all.png``: what the images look like;
* ``privacy/audit.json`` and ``privacy/closest_pairs.png``: the privacy audit (when it was run);
* ``README.md``: a short card for people; ``manifest.json``: everything else, and the SHA-256 and size of every
  other member.

:func:`load_distilled` trusts nothing it has not checked: the manifest's format version, that the members are
exactly those listed, every checksum, and that the images, labels and class names agree with the manifest. Only then
are the files parsed, with numpy's ``allow_pickle=False`` and torch's ``weights_only=True``.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from monai_pld.utils import atomic_write, library_versions, mlflow_experiment, sha256_file

__all__ = [
    "PACKAGE_FORMAT",
    "check_export_config",
    "DistilledPackage",
    "PackageError",
    "export_package",
    "is_package",
    "load_distilled",
    "package_sha256",
    "read_distilled_folder",
    "read_nifti_stack",
]

PACKAGE_FORMAT = "monai_pld.package/1"
KNOWN_FORMATS = (PACKAGE_FORMAT,)
MANIFEST = "manifest.json"
logger = logging.getLogger("monai_pld")

# the NIfTI stacks keep MONAI's PNG convention (LoadImage reads a PNG as (width, height)), so that the same image
# read from a preview PNG and from the NIfTI file comes out with the same axes
_RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])


class PackageError(ValueError):
    """A package cannot be written or used; the message names the file, what is wrong and what to do."""


@dataclass
class DistilledPackage:
    """A verified package, ready for the evaluation engine.

    Attributes:
        images: float images ``(N, C, H, W)`` in ``[0, 1]``.
        labels: int64 labels ``(N,)``.
        class_names: name of every class, index = label.
        manifest: the package's manifest.
        path: where it was read from.
        distribution: the distilled distribution (``render(generator, mode)``), when the package has one.
        generator: the generator to render it, when the package has one (the identity for pixel sets).
        files: where every member can be read (for a ``.zip``, the verified copies in the extraction folder).
        sha256: the package's checksum (:func:`package_sha256`).
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    manifest: dict[str, Any]
    path: Path
    distribution: torch.nn.Module | None = None
    generator: torch.nn.Module | None = None
    files: dict[str, Path] = field(default_factory=dict)
    sha256: str = ""

    def image_source(self, mode: str = "mean", seed: int = 0) -> Any:
        """The set as an evaluation :class:`~monai_pld.engines.evaluation.ImageSource`.

        Args:
            mode: ``mean`` (the package's images), ``sample`` (one fixed-seed draw of the distribution) or
                ``resample`` (a fresh draw every epoch).
            seed: seed of the draws.

        Raises:
            PackageError: ``sample``/``resample`` asked of a package without distribution and generator.
        """
        from monai_pld.engines.evaluation import ImageSource

        description = {"kind": "package", "path": str(self.path), "mode": mode, "package_sha256": self.sha256}
        if mode == "mean":
            return ImageSource(self.images, self.labels, description)
        if self.distribution is None or self.generator is None:
            raise PackageError(
                f"{self.path} holds no distribution and generator, so mode {mode!r} cannot draw images; use mode "
                "'mean', or ask the sender for a package exported with include_distribution and include_generator"
            )
        return ImageSource.from_distribution(self.distribution, self.generator, description, mode, seed)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:40] or "class"


def class_stem(index: int, name: str) -> str:
    """File stem of one class's NIfTI and preview files, e.g. ``class_03_lymphocytes``."""
    return f"class_{index:02d}_{_slug(name)}"


def read_distilled_folder(folder: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """The ``distilled/`` folder of a run (given the run or the folder itself) and its verified manifest.

    Raises:
        PackageError: no manifest (the run did not finish), or a file whose checksum differs from the manifest.
    """
    folder = Path(folder)
    if (folder / "distilled").is_dir():
        folder = folder / "distilled"
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise PackageError(
            f"{folder} has no {MANIFEST}: it is not a finished distillation output. Give the run folder of a "
            "completed train.yaml run (the manifest is written last), or resume the run with --resume true"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise PackageError(f"{manifest_path} is not readable JSON ({e}); run the distillation again") from e
    for name, entry in (manifest.get("files") or {}).items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != entry.get("sha256"):
            raise PackageError(
                f"{path} is missing or differs from the checksum in {manifest_path}: the distilled set was changed "
                "after it was written; run the distillation again"
            )
    if "images.npz" not in (manifest.get("files") or {}):
        raise PackageError(f"{manifest_path} lists no images.npz; it is not a monai_pld distillation output")
    return folder, manifest


def _read_images(data: bytes | Path, what: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with np.load(source, allow_pickle=False) as npz:
            missing = [k for k in ("images", "labels", "class_names") if k not in npz.files]
            if missing:
                raise PackageError(f"{what} lacks the arrays {missing} (it has {sorted(npz.files)})")
            images, labels, names = npz["images"], npz["labels"], [str(n) for n in npz["class_names"]]
    except PackageError:
        raise
    except Exception as e:  # a pickled object array, a truncated zip, not an npz at all
        raise PackageError(f"{what} is not a plain images.npz ({type(e).__name__}: {e})") from e
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise PackageError(
            f"{what}: 'images' must be uint8 (N, H, W, C) with C 1 or 3, got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise PackageError(
            f"{what}: 'labels' must be integers of shape ({len(images)},), got {labels.dtype} {labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
        raise PackageError(f"{what}: labels must lie in [0, {len(names)}) for {len(names)} class names")
    return images, labels.astype(np.int64), names


def _nifti_bytes(images: np.ndarray, description: str) -> bytes:
    """One class's images ``(n, H, W, C)`` as a gzipped NIfTI-1 stack ``(W, H, n)`` (uint8, or RGB24 colour)."""
    import gzip

    import nibabel as nib

    stack = np.ascontiguousarray(images.transpose(2, 1, 0, 3))  # (W, H, n, C)
    data = stack[..., 0] if stack.shape[3] == 1 else stack.view(_RGB24)[..., 0]
    image = nib.Nifti1Image(data, np.eye(4))
    image.header["descrip"] = description.encode()[:79]
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), mtime=0)


def read_nifti_stack(path: str | os.PathLike) -> np.ndarray:
    """Read a package's class NIfTI file back as images ``(n, H, W, C)`` uint8 (the inverse of the export)."""
    import nibabel as nib

    data = np.asanyarray(nib.load(str(path)).dataobj)
    if data.dtype.names:  # RGB24
        data = np.stack([data[c] for c in ("R", "G", "B")], axis=-1)
    else:
        data = data[..., None]
    return np.ascontiguousarray(data.transpose(2, 1, 0, 3)).astype(np.uint8)


def _png_bytes(images: np.ndarray, labels: np.ndarray, upscale: int = 2) -> bytes:
    from PIL import Image

    from monai_pld.handlers.image_grid import image_grid

    grid = image_grid(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, torch.from_numpy(labels))
    picture = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    picture = picture.resize((picture.width * upscale, picture.height * upscale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


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


def _card(manifest: Mapping[str, Any]) -> str:
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
        "from monai_pld.export import load_distilled",
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


def export_package(
    distilled: str | os.PathLike,
    output: str | os.PathLike,
    train: Any = None,
    heldout: Any = None,
    heldout_split: str = "test",
    audit: bool = True,
    force: bool = False,
    include_distribution: bool = True,
    include_generator: bool = True,
    generator_path: str | os.PathLike | None = None,
    nifti: bool = True,
    previews: bool = True,
    overwrite: bool = False,
    audit_kwargs: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    experiment_name: str = "monai_pld",
    attribution: Mapping[str, str] | None = None,
    audit_samples_per_slot: int = 8,
    audit_prior_samples: int = 256,
) -> Path:
    """Write the distilled set of a finished run as a package (a folder, or a ``.zip`` when ``output`` ends so).

    The privacy audit runs first and is written to ``<run>/privacy_audit/``; when it flags near-copies of training
    images no package is written unless ``force``. The package appears complete or not at all (written beside
    ``output`` and renamed into place, or written to a temporary file and renamed for a ``.zip``).

    Args:
        distilled: the run folder (or its ``distilled/``) of a finished ``train.yaml`` run.
        output: the package folder, or a path ending in ``.zip``.
        train, heldout: the real training split and a held-out split (``ImageSet``), needed by the audit.
        heldout_split: which split ``heldout`` is (recorded with the audit).
        audit: run the privacy audit (:func:`monai_pld.export.privacy.audit_privacy`).
        force: export even when the audit flags near-copies (recorded in the manifest and the card).
        include_distribution: add ``distribution.pt`` when the run has one.
        include_generator: add the generator's weights (``generator.pt``) with the distribution.
        generator_path: the generator checkpoint (default: the one recorded in the run's manifest; its SHA-256
            must match the record).
        nifti, previews: write the per-class NIfTI stacks and the PNG previews.
        overwrite: replace an existing package at ``output``.
        audit_kwargs: further :func:`audit_privacy` arguments (``percentile``, ``feature_epochs``...).
        tracking_uri: MLflow store; the package is logged into the distillation run recorded in the manifest (or a
            new run ``export_<run>``) with its checksum as tag ``package_sha256``.
        experiment_name: MLflow experiment of a new run.
        attribution: ``{"dataset", "licence", "attribution", "url"}`` of the source data for the card and manifest
            (a site's own ``description`` and ``licence`` for custom data); default: what the run's manifest
            recorded, else :func:`monai_pld.data.dataset_attribution` of its dataset.
        audit_samples_per_slot, audit_prior_samples: what the audit draws from a shipped distribution (samples per
            slot) and generator (decodes of prior latents) besides the images (:func:`shared_model_images`).

    Returns:
        the package path.

    Raises:
        PackageError: bad input (no finished run, changed files, generator mismatch, existing output).
        PrivacyAuditError: the audit flagged near-copies and ``force`` is false.
    """
    folder, run_manifest = read_distilled_folder(distilled)
    output = Path(output)
    as_zip = output.suffix.lower() == ".zip"
    if output.exists() and not overwrite:
        raise PackageError(f"{output} exists; choose another output or pass overwrite=True (--overwrite true)")
    images, labels, names = _read_images(folder / "images.npz", str(folder / "images.npz"))
    members: dict[str, bytes] = {"images.npz": (folder / "images.npz").read_bytes()}
    config = dict(run_manifest.get("config") or {})
    dataset_record = dict(run_manifest.get("dataset") or {})
    flag = dataset_record.get("flag") or config.get("dataset_flag") or getattr(train, "name", "")

    # the cheap checks of the inputs first, the audit (minutes on a large training split) after them
    generator_record = dict(run_manifest.get("generator") or {})
    has_distribution = include_distribution and (folder / "distribution.pt").is_file()
    gen_path = None
    if has_distribution:
        members["distribution.pt"] = (folder / "distribution.pt").read_bytes()
        if include_generator and generator_record.get("class") == "AutoencoderKLGenerator":
            gen_path = Path(generator_path or generator_record.get("path") or "")
            if not gen_path.is_file():
                raise PackageError(
                    f"the generator {gen_path} recorded by {folder / MANIFEST} is not there; give generator_path "
                    "(--generator_path) or export without it (include_generator false)"
                )
            expected = generator_record.get("sha256")
            if expected and sha256_file(gen_path) != expected:
                raise PackageError(
                    f"{gen_path} is not the generator this set was distilled with (SHA-256 differs from "
                    f"{folder / MANIFEST}); give the right generator_path"
                )
            members["generator.pt"] = gen_path.read_bytes()
        elif include_generator and generator_record.get("class") != "PixelGenerator":
            logger.warning(
                f"the generator {generator_record.get('class')} is not packaged (only AutoencoderKL weights are)"
            )

    audit_record: dict[str, Any] = {"performed": False}
    if audit:
        if train is None or heldout is None:
            raise PackageError("the privacy audit needs the real training split and a held-out split (train, heldout)")
        from monai_pld.export.privacy import PrivacyAuditError, audit_privacy, audit_summary, check_audit, write_audit

        synthetic = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        kwargs = dict(audit_kwargs or {})
        drawn = {}
        if has_distribution:
            drawn = _shared_model_draws(
                folder / "distribution.pt",
                gen_path if "generator.pt" in members else None,
                generator_record,
                audit_samples_per_slot,
                audit_prior_samples,
                int(kwargs.get("seed", 0)),
            )
        result = audit_privacy(synthetic, torch.from_numpy(labels), train, heldout, drawn=drawn, **kwargs)
        result["settings"]["heldout_split"] = heldout_split
        # written beside the distilled set first, so that a refused export still shows what was found
        written = write_audit(result, folder.parent / "privacy_audit", synthetic, train)
        try:
            check_audit(result, force=force)  # refuses before anything of the package is written
        except PrivacyAuditError as e:
            raise PrivacyAuditError(f"{e}. The audit is in {written['json'].parent}") from None
        members["privacy/audit.json"] = written["json"].read_bytes()
        members["privacy/closest_pairs.png"] = written["png"].read_bytes()
        audit_record = {"performed": True, "forced": bool(force and not result["passed"]), **audit_summary(result)}

    stems = [class_stem(i, n) for i, n in enumerate(names)]
    for c, stem in enumerate(stems):
        chosen = labels == c
        if not chosen.any():
            continue
        if nifti:
            members[f"nifti/{stem}.nii.gz"] = _nifti_bytes(images[chosen], f"{flag} {names[c]}")
        if previews:
            members[f"previews/{stem}.png"] = _png_bytes(images[chosen], labels[chosen])
    if previews:
        members["previews/all.png"] = _png_bytes(images, labels)

    height, width, channels = images.shape[1:]
    parameterization = dict(run_manifest.get("parameterization") or {})
    manifest: dict[str, Any] = {
        "format": PACKAGE_FORMAT,
        "name": output.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "class_names": names,
        "num_classes": len(names),
        "images_per_class": np.bincount(labels, minlength=len(names)).tolist(),
        "images": {
            "count": len(images),
            "height": height,
            "width": width,
            "channels": channels,
            "layout": "NHWC",
            "dtype": "uint8",
            "render_mode": (run_manifest.get("images") or {}).get("render_mode"),
        },
        "method": {
            "parameterization": parameterization.get("kind", config.get("parameterization")),
            "matcher": config.get("matcher"),
            "ipc": run_manifest.get("ipc"),
            "rank": parameterization.get("rank"),
            "seed": config.get("seed", parameterization.get("seed")),
            "iterations": run_manifest.get("iterations"),
            "matcher_settings": run_manifest.get("matcher"),
        },
        "source": {
            "dataset_flag": flag,
            "image_size": config.get("image_size", height),
            **(dict(attribution or {}) or (run_manifest.get("dataset") or {}).get("attribution") or _attribution(flag)),
            **({"read": dataset_record["read"]} if dataset_record.get("read") else {}),
        },
        # where the generator lives at the sending site means nothing at the receiving one
        "generator": {
            **{k: v for k, v in generator_record.items() if k != "path"},
            "packaged": "generator.pt" in members,
        },
        "privacy_audit": audit_record,
        "distilled_from": {"run_manifest_sha256": sha256_file(folder / MANIFEST), "mlflow": run_manifest.get("mlflow")},
        "versions": library_versions(),
        "files": {},
    }
    manifest["files"] = _file_table(members)
    members["README.md"] = _card(manifest).encode()
    manifest["files"].update(_file_table({"README.md": members["README.md"]}))
    members[MANIFEST] = (json.dumps(manifest, indent=2) + "\n").encode()
    _write(members, output, as_zip)
    logger.info(
        f"package written to {output}: {len(images)} images, {len(members)} files"
        + ("" if audit_record["performed"] else " (no privacy audit)")
    )
    if tracking_uri:
        _log_mlflow(output, run_manifest, tracking_uri, experiment_name)
    return output


def _shared_model_draws(
    distribution_path: Path,
    generator_path: Path | None,
    generator_record: Mapping[str, Any],
    samples_per_slot: int,
    prior_samples: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """What a receiving site can draw from the shipped distribution and generator (nothing to decode the
    distribution with when the generator stays home, unless it is the pixel identity)."""
    from monai_pld.builders import load_distribution
    from monai_pld.export.privacy import shared_model_images
    from monai_pld.networks.generators import PixelGenerator, load_generator

    distribution = load_distribution(distribution_path)
    layer = int(distribution.hyper_parameters.get("latent_layer", 0) or 0)
    base = generator = None
    if generator_path is not None:
        base = load_generator(generator_path)
        generator = base if not layer else load_generator(generator_path, latent_layer=layer)
    elif generator_record.get("class") == "PixelGenerator":
        generator = PixelGenerator(tuple(generator_record["latent_shape"]))
    return shared_model_images(distribution, generator, samples_per_slot, prior_samples, seed, prior_generator=base)


def _attribution(flag: str) -> dict[str, str]:
    from monai_pld.data import dataset_attribution

    try:
        return dataset_attribution(flag)
    except ValueError:
        logger.warning(f"the source dataset {flag!r} is not one monai_pld knows: state its licence in the package card")
        unknown = "unknown: not recorded by monai_pld; state it before sharing"
        return {"dataset": flag or "unknown", "licence": unknown, "attribution": unknown, "url": ""}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_table(members: Mapping[str, bytes]) -> dict[str, dict[str, Any]]:
    return {name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in sorted(members.items())}


def _write(members: Mapping[str, bytes], output: Path, as_zip: bool) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    if as_zip:

        def write_zip(f) -> None:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for name, data in members.items():
                    archive.writestr(name, data)

        atomic_write(output, write_zip)
        return
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for name, data in members.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        old = None
        if output.exists():  # moved aside, not deleted, until the new package is in place
            old = output.with_name(f".{output.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(output, old)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def package_sha256(path: str | os.PathLike) -> str:
    """The checksum that names a package: the SHA-256 of the ``.zip``, or of a folder's ``manifest.json`` (which
    holds the SHA-256 of every other member)."""
    path = Path(path)
    return sha256_file(path if path.is_file() else path / MANIFEST)


def _log_mlflow(output: Path, run_manifest: Mapping[str, Any], tracking_uri: str, experiment_name: str) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    recorded = run_manifest.get("mlflow") or {}
    run_id = None
    if recorded.get("run_id"):
        try:
            run_id = client.get_run(recorded["run_id"]).info.run_id
        except Exception:  # another store, or the run was deleted: log into a new run instead
            run_id = None
    if run_id is None:
        experiment_id = mlflow_experiment(tracking_uri, experiment_name)
        run_id = client.create_run(experiment_id, run_name=f"export_{output.stem}").info.run_id
        client.set_terminated(run_id)
    if output.is_dir():
        client.log_artifacts(run_id, str(output), artifact_path=f"package/{output.name}")
    else:
        client.log_artifact(run_id, str(output), artifact_path="package")
    client.set_tag(run_id, "package_sha256", package_sha256(output))
    client.set_tag(run_id, "package_name", output.name)
    logger.info(f"package logged to MLflow run {run_id} ({tracking_uri})")


def check_export_config(distilled: Any, audit_percentile: Any, audit_feature_epochs: Any, heldout_split: Any) -> None:
    """Check the export bundle's values before any data are read.

    Raises:
        ConfigError: naming the key, the value and what is accepted.
    """
    from monai_pld.utils import ConfigError

    try:
        read_distilled_folder(distilled)
    except PackageError as e:
        raise ConfigError(f"'distilled': {e}") from e
    ok = isinstance(audit_percentile, (int, float)) and not isinstance(audit_percentile, bool)
    if not ok or not 0 < audit_percentile < 100:
        raise ConfigError(f"'audit_percentile' must be a number in (0, 100), got {audit_percentile!r}")
    epochs = audit_feature_epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ConfigError(f"'audit_feature_epochs' must be an integer >= 0 (0 = pixel distances only), got {epochs!r}")
    if heldout_split not in ("val", "test"):
        raise ConfigError(f"'heldout_split' must be 'val' or 'test' (never the training split), got {heldout_split!r}")


def is_package(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a package (a ``.zip``, or a folder whose manifest says so); not a verification."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".zip"
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return str(json.loads(manifest.read_text()).get("format", "")).startswith("monai_pld.package/")
    except (OSError, ValueError, AttributeError):
        return False


def _read_members(path: Path) -> dict[str, bytes]:
    """Every member of a package folder or zip, as bytes, with unsafe names refused."""
    members: dict[str, bytes] = {}
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file() or p.is_symlink()):
            name = file.relative_to(path).as_posix()
            if file.is_symlink():
                raise PackageError(f"{path}: member {name} is a symbolic link; packages hold plain files only")
            members[name] = file.read_bytes()
        return members
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.is_dir():
                    continue
                name = PurePosixPath(info.filename)
                if name.is_absolute() or ".." in name.parts or "\\" in info.filename:
                    raise PackageError(f"{path}: member {info.filename!r} points outside the package; refusing it")
                if info.filename in members:
                    raise PackageError(f"{path}: member {info.filename} appears twice")
                members[info.filename] = archive.read(info)
    except PackageError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, zipfile.LargeZipFile) as e:
        raise PackageError(
            f"{path} is not a readable zip ({type(e).__name__}: {e}); it is truncated or corrupted"
        ) from e
    return members


def load_distilled(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    load_generator: bool = True,
    extract_dir: str | os.PathLike | None = None,
) -> DistilledPackage:
    """Verify a package and load it.

    Checks, in order: the manifest parses and has a known format version; the members are exactly the files it
    lists (a missing or an extra file is refused); every member's size and SHA-256 match; the images, labels and
    class names agree with the manifest. Files are parsed only after that, without pickle.

    Args:
        path: the package folder or ``.zip``.
        map_location: device for the distribution and the generator.
        load_generator: also load ``generator.pt`` (needed to draw new images).
        extract_dir: for a ``.zip``, where the verified members are written for use (default: a new temporary
            folder); ignored for folders.

    Returns:
        the :class:`DistilledPackage`.

    Raises:
        PackageError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.exists():
        raise PackageError(f"no package at {path}; give the folder or .zip written by export")
    members = _read_members(path)
    label = f"{path}"
    if MANIFEST not in members:
        raise PackageError(f"{label} has no {MANIFEST}; it is not a monai_pld package (or was cut short)")
    try:
        manifest = json.loads(members[MANIFEST].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise PackageError(f"{label}/{MANIFEST} is not valid JSON ({e}); the package is damaged") from e
    if not isinstance(manifest, dict):
        raise PackageError(f"{label}/{MANIFEST} is not a JSON object; the package is damaged")
    found_format = manifest.get("format")
    if found_format not in KNOWN_FORMATS:
        raise PackageError(
            f"{label}: package format {found_format!r} is not one this monai_pld reads ({list(KNOWN_FORMATS)}); "
            "upgrade monai_pld, or ask the sender to export with your version"
        )
    listed = manifest.get("files")
    if not isinstance(listed, dict) or "images.npz" not in listed:
        raise PackageError(f"{label}/{MANIFEST} lists no files (or no images.npz); the package is damaged")
    extra = sorted(set(members) - set(listed) - {MANIFEST})
    if extra:
        raise PackageError(
            f"{label} holds files its manifest does not list: {extra}; they were added after export. Refusing the "
            "package: ask the sender for a fresh export"
        )
    for name, entry in listed.items():
        if name not in members:
            raise PackageError(f"{label}/{name} is listed in the manifest but missing; the package is incomplete")
        data = members[name]
        if not isinstance(entry, dict) or len(data) != entry.get("bytes") or _sha256(data) != entry.get("sha256"):
            raise PackageError(
                f"{label}/{name} does not match its SHA-256 in the manifest: it was changed or damaged after export. "
                "Do not use it; ask the sender for a fresh copy"
            )

    images, labels, names = _read_images(members["images.npz"], f"{label}/images.npz")
    counts = np.bincount(labels, minlength=len(names)).tolist()
    mismatch = []
    if names != list(manifest.get("class_names") or []):
        mismatch.append(f"class names {names} vs manifest {manifest.get('class_names')}")
    if counts != list(manifest.get("images_per_class") or []):
        mismatch.append(f"images per class {counts} vs manifest {manifest.get('images_per_class')}")
    shape = manifest.get("images") or {}
    if [shape.get(k) for k in ("count", "height", "width", "channels")] != list((len(images), *images.shape[1:])):
        mismatch.append(f"image array {images.shape} vs manifest {shape}")
    if mismatch:
        raise PackageError(
            f"{label}/images.npz disagrees with the manifest ({'; '.join(mismatch)}); the package is mislabelled"
        )

    folder = path
    if not path.is_dir():
        folder = Path(extract_dir) if extract_dir is not None else Path(tempfile.mkdtemp(prefix="monai_pld_package_"))
        for name, data in members.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
    files = {name: folder / name for name in members}
    distribution = generator = None
    if "distribution.pt" in listed:
        from monai_pld.builders import load_distribution

        try:
            distribution = load_distribution(files["distribution.pt"], map_location=map_location)
        except ValueError as e:
            raise PackageError(f"{label}/distribution.pt cannot be used: {e}") from e
    if load_generator and "generator.pt" in listed:
        from monai_pld.networks.generators import GeneratorCheckpointError
        from monai_pld.networks.generators import load_generator as read_generator

        try:
            layer = 0 if distribution is None else distribution.hyper_parameters.get("latent_layer", 0)
            generator = read_generator(files["generator.pt"], map_location=map_location, latent_layer=layer)
        except (GeneratorCheckpointError, ValueError) as e:
            raise PackageError(f"{label}/generator.pt cannot be used: {e}") from e
    elif distribution is not None and (manifest.get("generator") or {}).get("class") == "PixelGenerator":
        from monai_pld.networks.generators import PixelGenerator

        generator = PixelGenerator(manifest["generator"]["latent_shape"])  # the identity: nothing to ship
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0)
    return DistilledPackage(
        tensor, torch.from_numpy(labels), names, manifest, path, distribution, generator, files, package_sha256(path)
    )
