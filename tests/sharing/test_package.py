"""Shared packages: export -> load round trip, every kind of tampering refused, NIfTI read back with nibabel, the
evaluation engine reading a package, MLflow records, the privacy gate, and the export bundle end to end."""

import datetime
import gc
import json
import pickle
import shutil
import zipfile

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import REPO, run_bundle

from monai_pld.data import ImageSet, load_medmnist
from monai_pld.evaluation import load_image_source
from monai_pld.formats import export_distilled_set
from monai_pld.networks.generators import PixelGenerator
from monai_pld.parameterizations import RealImageSet
from monai_pld.sharing import (
    PACKAGE_FORMAT,
    PackageError,
    PrivacyAuditError,
    export_package,
    load_distilled,
    package_sha256,
    read_nifti_stack,
)
from monai_pld.utils import ConfigError
from monai_pld.workflows import check_export_config

EXPORT = REPO / "bundles" / "pathmnist" / "export.yaml"


@pytest.fixture(scope="module")
def run(tiny_run):
    """The suite's tiny PathMNIST-shaped distillation (SLFD, DM) with its MLflow run (conftest ``tiny_run``)."""
    return tiny_run.tmp, tiny_run.data, tiny_run.out


@pytest.fixture(scope="module")
def package(run, tmp_path_factory):
    tmp, _, out = run
    path = export_package(out, tmp_path_factory.mktemp("pkg") / "package", audit=False)
    return path


def copy_package(package, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(package, target)
    return target


def rewrite_manifest(folder, change):
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def state_layer(run) -> int:
    return torch.load(run / "distilled" / "distribution.pt", weights_only=True)["hyper_parameters"]["latent_layer"]


@pytest.mark.slow
def test_round_trip_is_bit_exact(run, package, tmp_path):
    _, _, out = run
    with np.load(out / "distilled" / "images.npz") as original:
        images, labels, names = original["images"], original["labels"], list(original["class_names"])
    state = torch.load(out / "distilled" / "distribution.pt", weights_only=True)["state_dict"]
    manifest = json.loads((out / "distilled" / "manifest.json").read_text())
    generator_state = torch.load(manifest["generator"]["path"], weights_only=True)["state_dict"]

    zipped = export_package(out, tmp_path / "package.zip", audit=False)
    for path in (package, zipped):
        loaded = load_distilled(path)
        # float in [0, 1] back to the exported uint8 exactly
        assert np.array_equal((loaded.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), images)
        assert np.array_equal(loaded.labels.numpy(), labels) and loaded.class_names == names
        for key, value in state.items():
            assert torch.equal(loaded.distribution.state_dict()[key], value), key
        shipped = getattr(loaded.generator, "base", loaded.generator)  # the checkpoint, read at the run's layer
        assert getattr(loaded.generator, "layer", 0) == state_layer(out)
        for key, value in generator_state.items():
            assert torch.equal(shipped.state_dict()[key], value), key
        assert loaded.manifest["format"] == PACKAGE_FORMAT
    # the package's images are what the distribution and the generator render from the means
    loaded = load_distilled(package)
    rendered, _ = loaded.distribution.render(loaded.generator, "mean")
    assert torch.allclose(rendered.clamp(0, 1), loaded.images, atol=1 / 255 + 1e-6)


@pytest.mark.slow
def test_package_contents_and_card(run, package):
    _, _, out = run
    manifest = json.loads((package / "manifest.json").read_text())
    names = manifest["class_names"]
    listed = set(manifest["files"])
    expected = {"images.npz", "distribution.pt", "generator.pt", "README.md", "previews/all.png"}
    assert expected <= listed
    assert sum(name.startswith("nifti/") and name.endswith(".nii.gz") for name in listed) == len(names)
    assert sum(name.startswith("previews/class_") for name in listed) == len(names)
    assert set(p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()) == listed | {
        "manifest.json"
    }
    assert manifest["source"]["licence"] == "CC BY 4.0" and "MedMNIST v2" in manifest["source"]["attribution"]
    assert manifest["method"]["parameterization"] == "slfd" and manifest["method"]["matcher"] == "dm"
    assert manifest["method"]["ipc"] == 2 and manifest["images_per_class"] == [2] * 9
    assert manifest["privacy_audit"] == {"performed": False}
    card = (package / "README.md").read_text()
    assert "CC BY 4.0" in card and "No privacy audit" in card and "load_distilled" in card


@pytest.mark.slow
def test_nifti_files_equal_the_images(package):
    loaded = load_distilled(package)
    images = (loaded.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for c, _ in enumerate(loaded.class_names):
        (path,) = package.glob(f"nifti/class_{c:02d}_*.nii.gz")
        raw = nib.load(str(path))
        data = np.asanyarray(raw.dataobj)
        own = images[loaded.labels.numpy() == c]
        # RGB24 stack indexed (x = column, y = row, image)
        assert data.shape == (28, 28, len(own)) and data.dtype.names == ("R", "G", "B")
        for k in range(len(own)):
            for channel, field in enumerate("RGB"):
                assert np.array_equal(data[field][:, :, k].T, own[k, :, :, channel])
        assert np.array_equal(read_nifti_stack(path), own)


def test_grayscale_nifti_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8, generator=gen)
    labels = torch.tensor([0, 1, 1, 2, 2, 2])  # a class of one image keeps its stack axis too
    export_distilled_set(
        tmp_path / "run" / "distilled",
        RealImageSet(images, labels, 3),
        PixelGenerator((1, 16, 16)),
        ["a", "b", "c"],
        config={"dataset_flag": "pneumoniamnist"},
    )
    path = export_package(tmp_path / "run", tmp_path / "pkg", audit=False)
    for c in range(3):
        (nifti,) = path.glob(f"nifti/class_{c:02d}_*.nii.gz")
        data = np.asanyarray(nib.load(str(nifti)).dataobj)
        assert data.dtype == np.uint8 and data.shape == (16, 16, int((labels == c).sum()))
        assert np.array_equal(read_nifti_stack(nifti)[..., 0], images[labels == c, 0].numpy())


@pytest.mark.slow
def test_changed_byte_is_refused(package, tmp_path):
    folder = copy_package(package, tmp_path)
    target = folder / "distribution.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"distribution\.pt does not match its SHA-256"):
        load_distilled(folder)


@pytest.mark.slow
def test_missing_file_is_refused(package, tmp_path):
    folder = copy_package(package, tmp_path)
    next(folder.glob("nifti/*.nii.gz")).unlink()
    with pytest.raises(PackageError, match=r"nifti/class_\d\d_.*listed in the manifest but missing"):
        load_distilled(folder)


@pytest.mark.slow
def test_extra_pickle_is_refused(package, tmp_path):
    folder = copy_package(package, tmp_path)
    (folder / "extra.pkl").write_bytes(pickle.dumps({"when": datetime.date(2020, 1, 1)}))
    with pytest.raises(PackageError, match=r"does not list: \['extra\.pkl'\]"):
        load_distilled(folder)


@pytest.mark.slow
def test_unknown_format_version_is_refused(package, tmp_path):
    folder = copy_package(package, tmp_path)
    rewrite_manifest(folder, lambda m: m.update(format="monai_pld.package/99"))
    with pytest.raises(PackageError, match=r"format 'monai_pld.package/99' is not one this monai_pld reads"):
        load_distilled(folder)


@pytest.mark.slow
def test_mislabelled_package_is_refused(package, tmp_path):
    """Labels changed and every checksum made consistent again: the manifest's class counts give it away."""
    import hashlib

    folder = copy_package(package, tmp_path)
    with np.load(folder / "images.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["labels"] = np.roll(arrays["labels"], 1)
    arrays["labels"][0] = 0
    np.savez_compressed(folder / "images.npz", **arrays)
    data = (folder / "images.npz").read_bytes()
    entry = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    rewrite_manifest(folder, lambda m: m["files"].__setitem__("images.npz", entry))
    with pytest.raises(PackageError, match="mislabelled"):
        load_distilled(folder)


@pytest.mark.slow
def test_truncated_and_unsafe_zips_are_refused(run, tmp_path):
    _, _, out = run
    zipped = export_package(out, tmp_path / "package.zip", audit=False)
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(zipped.read_bytes()[: zipped.stat().st_size // 2])
    with pytest.raises(PackageError, match="truncated or corrupted"):
        load_distilled(truncated)
    unsafe = tmp_path / "unsafe.zip"
    shutil.copy(zipped, unsafe)
    with zipfile.ZipFile(unsafe, "a") as archive:
        archive.writestr("../outside.txt", "x")
    with pytest.raises(PackageError, match="points outside the package"):
        load_distilled(unsafe)


@pytest.mark.slow
def test_evaluation_engine_reads_a_package(run, package, tmp_path):
    _, data, out = run
    train = load_medmnist("pathmnist", "train", data, download=False)
    zipped = export_package(out, tmp_path / "package.zip", audit=False)
    for path in (package, zipped):
        source = load_image_source(path, train)
        assert source.images.shape == (18, 3, 28, 28) and source.description["kind"] == "package"
        assert source.description["package_sha256"] == package_sha256(path)
    resampled = load_image_source(package, train, mode="resample")
    first, _ = resampled.epoch(1)
    second, _ = resampled.epoch(2)
    assert not torch.equal(first, second)  # fresh draws of the distribution every epoch
    other = ImageSet(train.images[:, :, :16, :16].contiguous(), train.labels, train.class_names, "small")
    with pytest.raises(ValueError, match="shape"):
        load_image_source(package, other)


@pytest.mark.slow
def test_package_is_logged_to_the_distillation_run(run, tmp_path):
    tmp, _, out = run
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    manifest = json.loads((out / "distilled" / "manifest.json").read_text())
    run_id = manifest["mlflow"]["run_id"]
    path = export_package(out, tmp_path / "shared.zip", audit=False, tracking_uri=uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    record = client.get_run(run_id)
    assert record.data.tags["package_sha256"] == package_sha256(path)
    assert [a.path for a in client.list_artifacts(run_id, "package")] == ["package/shared.zip"]


@pytest.mark.slow
def test_audit_refuses_copies_of_training_images(run, tmp_path):
    """The random baseline *is* a handful of training images: the audit refuses it unless forced."""
    _, data, _ = run
    train = load_medmnist("pathmnist", "train", data, download=False)
    test = load_medmnist("pathmnist", "test", data, download=False)
    pick = torch.arange(0, 18)
    export_distilled_set(
        tmp_path / "random" / "distilled",
        RealImageSet(train.images[pick], train.labels[pick], 9),
        PixelGenerator((3, 28, 28)),
        train.class_names,
        config={"dataset_flag": "pathmnist"},
    )
    target = tmp_path / "random_package"
    with pytest.raises(PrivacyAuditError, match=r"18 of 18 synthetic images are closer.*privacy_audit"):
        export_package(tmp_path / "random", target, train, test, audit_kwargs={"feature_epochs": 0})
    assert not target.exists()  # no package, but the audit is there to look at
    assert json.loads((tmp_path / "random" / "privacy_audit" / "audit.json").read_text())["exact_copies"] == 18
    forced = export_package(tmp_path / "random", target, train, test, force=True, audit_kwargs={"feature_epochs": 0})
    manifest = json.loads((forced / "manifest.json").read_text())
    assert manifest["privacy_audit"]["performed"] and manifest["privacy_audit"]["forced"]
    assert manifest["privacy_audit"]["near_copies"] == 18
    card = (forced / "README.md").read_text()
    assert "forced" in card and "real training images" in card
    assert (forced / "privacy" / "closest_pairs.png").is_file()
    # the audit against another dataset's training split would pass vacuously: refused before it runs
    other = ImageSet(train.images, train.labels, [f"other{c}" for c in range(9)], "other")
    with pytest.raises(PackageError, match=r"distilled from classes .* training split given for the privacy audit"):
        export_package(tmp_path / "random", tmp_path / "other_package", other, test, audit_kwargs={"feature_epochs": 0})


@pytest.mark.slow
def test_export_bundle_end_to_end(run):
    tmp, data, out = run
    proc = run_bundle(
        tmp,
        data,
        "--distilled",
        out,
        "--zip",
        "true",
        "--force",
        "true",
        "--audit_feature_epochs",
        1,
        config=EXPORT,
    )
    path = out / "package.zip"
    assert path.is_file(), proc.stdout[-2000:]
    loaded = load_distilled(path)
    assert loaded.manifest["privacy_audit"]["performed"] and len(loaded.images) == 18
    assert {"privacy/audit.json", "privacy/closest_pairs.png"} <= set(loaded.manifest["files"])


@pytest.mark.slow
def test_export_bundle_bad_value_message_is_last(run):
    tmp, data, out = run
    proc = run_bundle(tmp, data, "--distilled", out, "--heldout_split", "train", config=EXPORT, check=False)
    assert proc.returncode != 0
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]  # the project's message, last
    assert last.startswith("ConfigError: ") and "'heldout_split'" in last, proc.stderr[-2000:]
    assert not (out / "package").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "key, value",
    [
        ("audit_percentile", 0),
        ("audit_percentile", 100),
        ("audit_percentile", float("nan")),
        ("audit_percentile", "5"),
        ("audit_feature_epochs", -1),
        ("audit_feature_epochs", 1.5),
        ("heldout_split", "train"),
        ("distilled", "no/such/folder"),
    ],
)
def test_export_bad_values_name_the_key(run, key, value):
    good = {"distilled": run[2], "audit_percentile": 5, "audit_feature_epochs": 0, "heldout_split": "val"}
    check_export_config(**good)  # the good values pass
    with pytest.raises(ConfigError, match=f"'{key}'"):
        check_export_config(**{**good, key: value})


def test_unfinished_run_is_refused(tmp_path):
    (tmp_path / "run" / "distilled").mkdir(parents=True)
    with pytest.raises(PackageError, match="not a finished distillation output"):
        export_package(tmp_path / "run", tmp_path / "pkg", audit=False)


def test_pixel_package_renders_without_shipping_a_generator(tmp_path):
    from monai_pld.parameterizations import LatentCodes

    codes = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    param = LatentCodes(codes, torch.tensor([0, 0, 1, 1]), 2)
    param.hyper_parameters = {"kind": "pixel", "ipc": 2, "init": "real", "seed": 0}
    export_distilled_set(tmp_path / "run" / "distilled", param, PixelGenerator((3, 16, 16)), ["a", "b"])
    path = export_package(tmp_path / "run", tmp_path / "pkg", audit=False)
    assert "generator.pt" not in json.loads((path / "manifest.json").read_text())["files"]
    loaded = load_distilled(path)
    assert loaded.manifest["source"]["licence"].startswith("unknown")  # no dataset recorded: said, not guessed
    assert isinstance(loaded.generator, PixelGenerator)
    drawn, labels = loaded.image_source("resample").epoch(3)
    assert torch.allclose(drawn, loaded.images, atol=1 / 255 + 1e-6) and labels.tolist() == [0, 0, 1, 1]


def test_a_zip_is_extracted_to_a_folder_that_goes_with_the_package(tmp_path):
    from monai_pld.parameterizations import LatentCodes

    param = LatentCodes(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), 2)
    param.hyper_parameters = {"kind": "pixel", "ipc": 1, "init": "real", "seed": 0}
    export_distilled_set(tmp_path / "run" / "distilled", param, PixelGenerator((1, 8, 8)), ["a", "b"])
    zipped = export_package(tmp_path / "run", tmp_path / "pkg.zip", audit=False, nifti=False)
    loaded = load_distilled(zipped)
    extracted = loaded.files["images.npz"].parent
    assert extracted.is_dir() and not extracted.is_relative_to(tmp_path)  # a temporary folder of its own
    assert (extracted / "images.npz").read_bytes() == zipfile.ZipFile(zipped).read("images.npz")
    del loaded
    gc.collect()
    assert not extracted.exists()  # removed with the package: repeated reads leave nothing behind
    kept = load_distilled(zipped, extract_dir=tmp_path / "kept")
    del kept
    gc.collect()
    assert (tmp_path / "kept" / "images.npz").is_file()  # a folder the caller names is the caller's


@pytest.mark.slow
def test_a_package_is_replaced_only_when_asked_and_then_whole(run, tmp_path):
    _, _, out = run
    target = export_package(out, tmp_path / "pkg", audit=False, nifti=False)
    (target / "stale.txt").write_text("left from before")  # would make the package fail verification
    with pytest.raises(PackageError, match="exists"):  # never replaced unless asked
        export_package(out, target, audit=False)
    export_package(out, target, audit=False, overwrite=True)
    assert load_distilled(target).manifest["files"].keys() >= {"nifti/class_00_adipose.nii.gz"}
    assert not (target / "stale.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]
