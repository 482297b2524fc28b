"""Reading a shared package: a distilled set as a self-contained, verifiable folder or ``.zip``.

A package holds the same members either way:

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
are the files parsed, with numpy's ``allow_pickle=False`` and torch's ``weights_only=True``. Writing a package is
:func:`monai_pld.sharing.export_package`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from monai_pld.data import ImageSource
from monai_pld.networks.generators import GeneratorCheckpointError, PixelGenerator
from monai_pld.networks.generators import load_generator as read_generator
from monai_pld.utils import sha256_file

from .distribution import load_distribution
from .images import ImagesFileError, as_float_images, read_images

__all__ = [
    "KNOWN_FORMATS",
    "MANIFEST",
    "PACKAGE_FORMAT",
    "RGB24",
    "DistilledPackage",
    "PackageError",
    "is_package",
    "load_distilled",
    "package_sha256",
    "read_nifti_stack",
    "sha256_bytes",
]

PACKAGE_FORMAT = "monai_pld.package/1"
KNOWN_FORMATS = (PACKAGE_FORMAT,)
MANIFEST = "manifest.json"

# the NIfTI stacks keep MONAI's PNG convention (LoadImage reads a PNG as (width, height)), so that the same image
# read from a preview PNG and from the NIfTI file comes out with the same axes
RGB24 = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])


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
        files: where every member can be read (for a ``.zip``, the verified copies in the extraction folder; a
            temporary folder is removed with this package).
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

    def image_source(self, mode: str = "mean", seed: int = 0) -> ImageSource:
        """The set as an evaluation :class:`~monai_pld.data.ImageSource`.

        Args:
            mode: ``mean`` (the package's images), ``sample`` (one fixed-seed draw of the distribution) or
                ``resample`` (a fresh draw every epoch).
            seed: seed of the draws.

        Raises:
            PackageError: ``sample``/``resample`` asked of a package without distribution and generator.
        """
        description = {"kind": "package", "path": str(self.path), "mode": mode, "package_sha256": self.sha256}
        if mode == "mean":
            return ImageSource(self.images, self.labels, description)
        if self.distribution is None or self.generator is None:
            raise PackageError(
                f"{self.path} holds no distribution and generator, so mode {mode!r} cannot draw images; use mode "
                "'mean', or ask the sender for a package exported with include_distribution and include_generator"
            )
        return ImageSource.from_distribution(self.distribution, self.generator, description, mode, seed)


def read_nifti_stack(path: str | os.PathLike) -> np.ndarray:
    """Read a package's class NIfTI file back as images ``(n, H, W, C)`` uint8 (the inverse of the export)."""
    import nibabel as nib

    data = np.asanyarray(nib.load(str(path)).dataobj)
    if data.dtype.names:  # RGB24
        data = np.stack([data[c] for c in ("R", "G", "B")], axis=-1)
    else:
        data = data[..., None]
    return np.ascontiguousarray(data.transpose(2, 1, 0, 3)).astype(np.uint8)


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of bytes (the checksum of a package member)."""
    return hashlib.sha256(data).hexdigest()


def package_sha256(path: str | os.PathLike) -> str:
    """The checksum that names a package: the SHA-256 of the ``.zip``, or of a folder's ``manifest.json`` (which
    holds the SHA-256 of every other member)."""
    path = Path(path)
    return sha256_file(path if path.is_file() else path / MANIFEST)


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
        extract_dir: for a ``.zip``, where the verified members are written for use; ignored for folders. By
            default a new temporary folder, removed with the returned package (when it is garbage-collected, or at
            the latest when the interpreter exits); give a folder to keep the files.

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
        if not isinstance(entry, dict) or len(data) != entry.get("bytes") or sha256_bytes(data) != entry.get("sha256"):
            raise PackageError(
                f"{label}/{name} does not match its SHA-256 in the manifest: it was changed or damaged after export. "
                "Do not use it; ask the sender for a fresh copy"
            )

    try:
        images, labels, names = read_images(members["images.npz"], f"{label}/images.npz")
    except ImagesFileError as e:
        raise PackageError(str(e)) from e
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

    folder, temporary = path, None
    if not path.is_dir():
        if extract_dir is None:
            folder = temporary = Path(tempfile.mkdtemp(prefix="monai_pld_package_"))
        else:
            folder = Path(extract_dir)
        for name, data in members.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
    files = {name: folder / name for name in members}
    distribution = generator = None
    if "distribution.pt" in listed:
        try:
            distribution = load_distribution(files["distribution.pt"], map_location=map_location)
        except ValueError as e:
            raise PackageError(f"{label}/distribution.pt cannot be used: {e}") from e
    if load_generator and "generator.pt" in listed:
        try:
            layer = 0 if distribution is None else distribution.hyper_parameters.get("latent_layer", 0)
            generator = read_generator(files["generator.pt"], map_location=map_location, latent_layer=layer)
        except (GeneratorCheckpointError, ValueError) as e:
            raise PackageError(f"{label}/generator.pt cannot be used: {e}") from e
    elif distribution is not None and (manifest.get("generator") or {}).get("class") == "PixelGenerator":
        generator = PixelGenerator(manifest["generator"]["latent_shape"])  # the identity: nothing to ship
    tensor = as_float_images(images)
    package = DistilledPackage(
        tensor, torch.from_numpy(labels), names, manifest, path, distribution, generator, files, package_sha256(path)
    )
    if temporary is not None:  # the extracted copies live as long as the package that lists them
        weakref.finalize(package, shutil.rmtree, temporary, ignore_errors=True)
    return package
