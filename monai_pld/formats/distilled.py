"""The ``distilled/`` folder of a run: ``images.npz``, ``distribution.pt`` and ``manifest.json``.

Each file is written atomically and the manifest last, with the SHA-256 of the others: a folder with a manifest is
complete, and a crash during export never leaves a half-written set that looks finished. :func:`read_distilled_folder`
checks those checksums before a folder is used.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_pld.utils import atomic_save_json, library_versions, sha256_file

from .distribution import DISTILLED_FORMAT, DISTRIBUTION_FILE, save_distribution
from .images import IMAGES_FILE, to_uint8_images, write_images
from .package import MANIFEST, PackageError

__all__ = ["export_distilled_set", "read_distilled_folder"]


def _generator_record(generator: Any) -> dict[str, Any]:
    # the class of the checkpoint (generator.pt); a decoder split at a feature map is that checkpoint read at
    # ``latent_layer``, and ``latent_shape`` is the shape of the distilled latents
    base = getattr(generator, "base", generator)
    record: dict[str, Any] = {"class": type(base).__name__, "latent_shape": list(generator.latent_shape)}
    for attr in ("checkpoint_path", "checkpoint_sha256"):
        if getattr(generator, attr, None) is not None:
            record[attr.replace("checkpoint_", "")] = getattr(generator, attr)
    if getattr(generator, "config", None) is not None:
        record["config"] = generator.config
    record["latent_layer"] = int(getattr(generator, "layer", 0))
    return record


def export_distilled_set(
    output_dir: str | os.PathLike,
    parameterization: Any,
    generator: Any,
    class_names: Sequence[str],
    mode: str = "mean",
    seed: int = 0,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    matcher: Any = None,
) -> dict[str, Any]:
    """Render and write the distilled set into ``output_dir``; returns the manifest.

    A fixed real-image baseline (``RealImageSet``: ``random``/``full``) gets the same ``images.npz`` and manifest
    but no ``distribution.pt``, since there is no distribution to sample from.

    Args:
        output_dir: target folder (``<run>/distilled``).
        parameterization: the trained ``SLFDistribution``/``LatentCodes``, or a ``RealImageSet``.
        generator: the frozen generator used in training.
        class_names: names of the classes, index = label.
        mode: ``mean`` (default: the strict IPC budget from the means) or ``sample`` (one fixed-seed sample).
        seed: seed of the ``sample`` mode.
        config: the run's configuration values, recorded verbatim.
        extra: more manifest entries (timings, iterations done...).
        matcher: the matcher used; its ``hyper_parameters()`` are recorded under ``matcher``.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = parameterization.render(generator, mode=mode, seed=seed)
    images_u8 = to_uint8_images(images)
    write_images(out / IMAGES_FILE, images_u8, labels.detach().cpu().numpy(), class_names)
    hyper = dict(getattr(parameterization, "hyper_parameters", {}) or {})
    ipc = None if parameterization.ipc is None else int(parameterization.ipc)
    names = [IMAGES_FILE]
    if not getattr(parameterization, "fixed", False):
        save_distribution(out / DISTRIBUTION_FILE, parameterization, len(class_names), generator.latent_shape)
        names.append(DISTRIBUTION_FILE)
    elif (out / DISTRIBUTION_FILE).exists():  # left over from an earlier run into the same folder
        (out / DISTRIBUTION_FILE).unlink()
    files = {name: {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size} for name in names}
    manifest = {
        "format": DISTILLED_FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "ipc": ipc,
        "images_per_class": torch.bincount(labels.cpu(), minlength=len(class_names)).tolist(),
        "parameterization": hyper,
        "matcher": dict(matcher.hyper_parameters()) if matcher is not None else None,
        "images": {"shape": list(images_u8.shape), "layout": "NHWC", "dtype": "uint8", "render_mode": mode},
        "generator": _generator_record(generator),
        "files": files,
        "versions": library_versions(),
        "config": dict(config or {}),
        **dict(extra or {}),
    }
    atomic_save_json(manifest, out / MANIFEST)
    return manifest


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
