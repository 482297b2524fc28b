"""Write a distilled set as a self-contained, verifiable package that one site hands to another.

The members and the checks a receiving site makes are described in :mod:`monai_pld.formats.package` (which reads
and verifies a package). Writing runs the privacy audit first (:mod:`monai_pld.sharing.privacy`) and refuses to
write a package that holds near-copies of training images unless forced; the package appears complete or not at all.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_pld.data import dataset_attribution
from monai_pld.formats.distilled import read_distilled_folder
from monai_pld.formats.distribution import load_distribution
from monai_pld.formats.images import IMAGES_FILE, ImagesFileError, read_images
from monai_pld.formats.package import MANIFEST, PACKAGE_FORMAT, RGB24, PackageError, package_sha256, sha256_bytes
from monai_pld.handlers.image_grid import image_grid
from monai_pld.networks.generators import PixelGenerator, load_generator
from monai_pld.utils import atomic_write, library_versions, mlflow_run, sha256_file

from .card import package_card
from .privacy import PrivacyAuditError, audit_privacy, audit_summary, check_audit, shared_model_images, write_audit

__all__ = ["class_stem", "export_package"]

logger = logging.getLogger("monai_pld")


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:40] or "class"


def class_stem(index: int, name: str) -> str:
    """File stem of one class's NIfTI and preview files, e.g. ``class_03_lymphocytes``."""
    return f"class_{index:02d}_{_slug(name)}"


def _nifti_bytes(images: np.ndarray, description: str) -> bytes:
    """One class's images ``(n, H, W, C)`` as a gzipped NIfTI-1 stack ``(W, H, n)`` (uint8, or RGB24 colour)."""
    import gzip

    import nibabel as nib

    stack = np.ascontiguousarray(images.transpose(2, 1, 0, 3))  # (W, H, n, C)
    data = stack[..., 0] if stack.shape[3] == 1 else stack.view(RGB24)[..., 0]
    image = nib.Nifti1Image(data, np.eye(4))
    image.header["descrip"] = description.encode()[:79]
    image.header.set_xyzt_units("mm")
    return gzip.compress(image.to_bytes(), mtime=0)


def _png_bytes(images: np.ndarray, labels: np.ndarray, upscale: int = 2) -> bytes:
    from PIL import Image

    grid = image_grid(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, torch.from_numpy(labels))
    picture = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    picture = picture.resize((picture.width * upscale, picture.height * upscale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


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
        audit: run the privacy audit (:func:`monai_pld.sharing.privacy.audit_privacy`).
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
    if output.exists() and not overwrite:
        raise PackageError(f"{output} exists; choose another output or pass overwrite=True (--overwrite true)")
    try:
        images, labels, names = read_images(folder / IMAGES_FILE, str(folder / IMAGES_FILE))
    except ImagesFileError as e:
        raise PackageError(str(e)) from e
    config = dict(run_manifest.get("config") or {})
    flag = (run_manifest.get("dataset") or {}).get("flag") or config.get("dataset_flag") or getattr(train, "name", "")
    if audit and train is not None:
        _check_training_split(folder, run_manifest, names, train)
    # the cheap checks of the inputs first, the audit (minutes on a large training split) after them
    members = {"images.npz": (folder / "images.npz").read_bytes()}
    members.update(_model_members(folder, run_manifest, include_distribution, include_generator, generator_path))
    audit_record: dict[str, Any] = {"performed": False}
    if audit:
        audit_members, audit_record = _audit_members(
            folder,
            run_manifest,
            images,
            labels,
            members,
            train,
            heldout,
            heldout_split,
            force,
            audit_kwargs,
            audit_samples_per_slot,
            audit_prior_samples,
            generator_path,
        )
        members.update(audit_members)
    members.update(_image_members(images, labels, names, flag, nifti, previews))
    manifest = _package_manifest(output.name, folder, run_manifest, images, labels, names, flag, members, attribution)
    manifest["privacy_audit"] = audit_record
    manifest["files"] = _file_table(members)
    members["README.md"] = package_card(manifest).encode()
    manifest["files"].update(_file_table({"README.md": members["README.md"]}))
    members[MANIFEST] = (json.dumps(manifest, indent=2) + "\n").encode()
    _write(members, output, output.suffix.lower() == ".zip")
    logger.info(
        f"package written to {output}: {len(images)} images, {len(members)} files"
        + ("" if audit_record["performed"] else " (no privacy audit)")
    )
    if tracking_uri:
        _log_mlflow(output, run_manifest, tracking_uri, experiment_name)
    return output


def _generator_file(folder: Path, run_manifest: Mapping[str, Any], generator_path: Any) -> Path:
    """The generator checkpoint the set was distilled with, checked against the SHA-256 the run recorded."""
    record = run_manifest.get("generator") or {}
    path = Path(generator_path or record.get("path") or "")
    if not path.is_file():
        raise PackageError(
            f"the generator {path} recorded by {folder / MANIFEST} is not there; give generator_path "
            "(--generator_path) or export without it (include_generator false)"
        )
    if record.get("sha256") and sha256_file(path) != record["sha256"]:
        raise PackageError(
            f"{path} is not the generator this set was distilled with (SHA-256 differs from "
            f"{folder / MANIFEST}); give the right generator_path"
        )
    return path


def _check_training_split(folder: Path, run_manifest: dict[str, Any], names: list[str], train: Any) -> None:
    """The audit compares the set with the split it was distilled from; another dataset would pass it vacuously."""
    theirs = [str(n) for n in getattr(train, "class_names", [])]
    if names and [str(n) for n in names] != theirs:
        raise PackageError(
            f"{folder} was distilled from classes {list(names)}, but the training split given for the privacy audit "
            f"has {theirs}; give the dataset (dataset_flag, dataset_dir) the set was distilled from"
        )
    recorded = (run_manifest.get("dataset") or {}).get("train_images")
    if isinstance(recorded, int) and recorded != len(train):
        raise PackageError(
            f"{folder} was distilled from {recorded} training images, but the training split given for the privacy "
            f"audit has {len(train)}; give the dataset (dataset_flag, dataset_dir, data_options) it was distilled from"
        )


def _model_members(
    folder: Path, run_manifest: Mapping[str, Any], include_distribution: bool, include_generator: bool, generator_path
) -> dict[str, bytes]:
    """``distribution.pt`` (when the run has one and it is wanted) and the AutoencoderKL's ``generator.pt``."""
    if not (include_distribution and (folder / "distribution.pt").is_file()):
        return {}
    members = {"distribution.pt": (folder / "distribution.pt").read_bytes()}
    kind = (run_manifest.get("generator") or {}).get("class")
    if include_generator and kind == "AutoencoderKLGenerator":
        members["generator.pt"] = _generator_file(folder, run_manifest, generator_path).read_bytes()
    elif include_generator and kind != "PixelGenerator":
        logger.warning(f"the generator {kind} is not packaged (only AutoencoderKL weights are)")
    return members


def _audit_members(
    folder: Path,
    run_manifest: Mapping[str, Any],
    images: np.ndarray,
    labels: np.ndarray,
    members: Mapping[str, bytes],
    train: Any,
    heldout: Any,
    heldout_split: str,
    force: bool,
    audit_kwargs: Mapping[str, Any] | None,
    samples_per_slot: int,
    prior_samples: int,
    generator_path: Any,
) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Run the privacy audit on the images and on what the packaged distribution and generator draw; write it beside
    the run (so a refused export still shows what was found) and refuse unless it passed or ``force``. Returns the
    audit's package files and its manifest record."""
    if train is None or heldout is None:
        raise PackageError("the privacy audit needs the real training split and a held-out split (train, heldout)")
    synthetic = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    kwargs = dict(audit_kwargs or {})
    drawn = {}
    if "distribution.pt" in members:
        drawn = _shared_model_draws(
            folder / "distribution.pt",
            _generator_file(folder, run_manifest, generator_path) if "generator.pt" in members else None,
            dict(run_manifest.get("generator") or {}),
            samples_per_slot,
            prior_samples,
            int(kwargs.get("seed", 0)),
        )
    result = audit_privacy(synthetic, torch.from_numpy(labels), train, heldout, drawn=drawn, **kwargs)
    result["settings"]["heldout_split"] = heldout_split
    written = write_audit(result, folder.parent / "privacy_audit", synthetic, train)
    try:
        check_audit(result, force=force)  # refuses before anything of the package is written
    except PrivacyAuditError as e:
        raise PrivacyAuditError(f"{e}. The audit is in {written['json'].parent}") from None
    files = {
        "privacy/audit.json": written["json"].read_bytes(),
        "privacy/closest_pairs.png": written["png"].read_bytes(),
    }
    return files, {"performed": True, "forced": bool(force and not result["passed"]), **audit_summary(result)}


def _image_members(
    images: np.ndarray, labels: np.ndarray, names: list[str], flag: str, nifti: bool, previews: bool
) -> dict[str, bytes]:
    """One NIfTI stack and one PNG preview per class, and a preview of the whole set."""
    members = {}
    for c, name in enumerate(names):
        chosen = labels == c
        if not chosen.any():
            continue
        stem = class_stem(c, name)
        if nifti:
            members[f"nifti/{stem}.nii.gz"] = _nifti_bytes(images[chosen], f"{flag} {name}")
        if previews:
            members[f"previews/{stem}.png"] = _png_bytes(images[chosen], labels[chosen])
    if previews:
        members["previews/all.png"] = _png_bytes(images, labels)
    return members


def _package_manifest(
    name: str,
    folder: Path,
    run_manifest: Mapping[str, Any],
    images: np.ndarray,
    labels: np.ndarray,
    names: list[str],
    flag: str,
    members: Mapping[str, bytes],
    attribution: Mapping[str, str] | None,
) -> dict[str, Any]:
    """The package's manifest.json (its ``files`` and ``privacy_audit`` are filled in by the caller)."""
    config = dict(run_manifest.get("config") or {})
    dataset_record = dict(run_manifest.get("dataset") or {})
    generator_record = dict(run_manifest.get("generator") or {})
    parameterization = dict(run_manifest.get("parameterization") or {})
    height, width, channels = images.shape[1:]
    return {
        "format": PACKAGE_FORMAT,
        "name": name,
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
            **(dict(attribution or {}) or dataset_record.get("attribution") or _attribution(flag)),
            **({"read": dataset_record["read"]} if dataset_record.get("read") else {}),
        },
        # where the generator lives at the sending site means nothing at the receiving one
        "generator": {
            **{k: v for k, v in generator_record.items() if k != "path"},
            "packaged": "generator.pt" in members,
        },
        "privacy_audit": {},
        "distilled_from": {"run_manifest_sha256": sha256_file(folder / MANIFEST), "mlflow": run_manifest.get("mlflow")},
        "versions": library_versions(),
        "files": {},
    }


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
    try:
        return dataset_attribution(flag)
    except ValueError:
        logger.warning(f"the source dataset {flag!r} is not one monai_pld knows: state its licence in the package card")
        unknown = "unknown: not recorded by monai_pld; state it before sharing"
        return {"dataset": flag or "unknown", "licence": unknown, "attribution": unknown, "url": ""}


def _file_table(members: Mapping[str, bytes]) -> dict[str, dict[str, Any]]:
    return {name: {"sha256": sha256_bytes(data), "bytes": len(data)} for name, data in sorted(members.items())}


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


def _log_mlflow(output: Path, run_manifest: Mapping[str, Any], tracking_uri: str, experiment_name: str) -> None:
    """The package as artefacts of the distillation run that made it, or of a new run when that one is gone."""
    import mlflow

    run_id = (run_manifest.get("mlflow") or {}).get("run_id")
    if run_id:
        try:
            mlflow.MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
        except Exception:  # another store, or the run was deleted: log into a new run instead
            run_id = None
    with mlflow_run(tracking_uri, experiment_name, f"export_{output.stem}", run_id=run_id) as (client, run_id):
        if output.is_dir():
            client.log_artifacts(run_id, str(output), artifact_path=f"package/{output.name}")
        else:
            client.log_artifact(run_id, str(output), artifact_path="package")
        client.set_tag(run_id, "package_sha256", package_sha256(output))
        client.set_tag(run_id, "package_name", output.name)
    logger.info(f"package logged to MLflow run {run_id} ({tracking_uri})")
