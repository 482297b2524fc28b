"""bundles/custom end to end on a tiny generated image folder: train, evaluate and export in-process with MONAI's
``ConfigWorkflow`` (the code path of ``python -m monai.bundle run``), then the package read back with
``load_distilled``. MLflow records go to a temporary sqlite store and the artefact folder named by
``mlflow_artifacts``."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from helpers import REPO
from monai.bundle import ConfigWorkflow
from PIL import Image

from monai_pld.formats import load_distilled

BUNDLE = REPO / "bundles" / "custom"
CLASSES = ("benign", "inflamed", "malignant")
# a few iterations of a narrow network through a barely pretrained generator: the wiring, not the quality
TINY = {
    "iterations": 3,
    "ipc": 2,
    "batch_real_per_class": 4,
    "generator_steps": 4,
    "generator_batch_size": 16,
    "generator_min_psnr": 0.0,
    "matching_net_width": 16,
    "matching_net_depth": 2,
    "log_interval": 1,
    "grid_interval": 3,
    "checkpoint_interval": 3,
    "eval_interval": 3,
    "eval_epochs": 2,
}


def _site_folder(root: Path, per_class: int = 14) -> Path:
    """Grey PNGs, brightness by class, plus one RGB JPEG and one larger image per class (converted on reading)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            image = (60 * c + 40 + rng.integers(0, 30, (28, 28))).astype(np.uint8)
            Image.fromarray(image).save(folder / f"{i:03d}.png")
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(folder / "rgb.jpg")
        Image.fromarray(rng.integers(0, 256, (40, 36), dtype=np.uint8)).save(folder / "large.png")
    return root


def run_config(name: str, **overrides):
    workflow = ConfigWorkflow(config_file=str(BUNDLE / name), workflow_type="train", logging_file=False, **overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


@pytest.mark.slow
def test_custom_bundle_train_evaluate_export(tmp_path, monkeypatch):
    site = _site_folder(tmp_path / "site")
    tracking = f"sqlite:///{tmp_path / 'mlruns.db'}"
    before = {p.name for p in REPO.iterdir()}
    monkeypatch.chdir(REPO)  # the bundles' macros are relative to the repository root
    common = {
        "dataset_dir": str(site),
        "description": "Test hospital biopsies 2026",
        "licence": "internal research only",
        "tracking_uri": tracking,
        "mlflow_artifacts": str(tmp_path / "artifacts"),  # instead of mlruns/ beside the store
        "device": "cpu",
        "num_workers": 0,
    }
    out = tmp_path / "run"
    run_config("train.yaml", **common, **TINY, output_dir=str(out), generator_dir=str(tmp_path / "generators"))
    manifest = json.loads((out / "distilled" / "manifest.json").read_text())
    assert manifest["dataset"]["flag"] == "custom"
    assert manifest["dataset"]["attribution"]["licence"] == "internal research only"
    read = manifest["dataset"]["read"]
    assert read["format"] == "folder" and read["images_listed"] == 48 and read["skipped_unreadable"] == 0
    assert read["converted"]["RGB to grey"] == 3 and read["converted"]["cropped to square"] == 3
    assert list((site / ".monai_pld_cache").glob("site_*_split_seed0.json"))

    evaluation = tmp_path / "eval"
    run_config(
        "evaluate.yaml", **common, distilled=str(out), backbones=["convnet"], epochs=2, output_dir=str(evaluation)
    )
    results = json.loads((evaluation / "results.json").read_text())
    assert results["runs"][0]["backbone"] == "convnet"

    package = tmp_path / "package.zip"
    run_config("export.yaml", **common, distilled=str(out), output=str(package), audit_feature_epochs=0, force=True)
    received = load_distilled(package)
    assert received.class_names == list(CLASSES)
    assert received.images.shape[1:] == (1, 28, 28) and len(received.labels) == 6
    assert received.manifest["source"]["licence"] == "internal research only"
    assert received.manifest["source"]["dataset"] == "Test hospital biopsies 2026"
    assert "Licence: internal research only" in received.files["README.md"].read_text()
    drawn = received.manifest["privacy_audit"]["drawn"]
    assert drawn["distribution_samples"]["images"] == 8 * 6 and drawn["generator_prior"]["images"] == 256
    assert "Drawn by a receiving site, generator prior" in received.files["README.md"].read_text()

    # without the generator nothing can be decoded at the receiving site, so nothing more is drawn
    bare = tmp_path / "bare"
    run_config(
        "export.yaml",
        **common,
        distilled=str(out),
        output=str(bare),
        audit_feature_epochs=0,
        force=True,
        include_generator=False,
    )
    card = (bare / "README.md").read_text()
    assert not (bare / "generator.pt").exists() and "not in this package" in card
    assert "drawn" not in json.loads((bare / "manifest.json").read_text())["privacy_audit"]
    client = mlflow.MlflowClient(tracking_uri=tracking)
    assert client.get_experiment_by_name("monai_pld").artifact_location == (tmp_path / "artifacts").as_uri()
    assert (tmp_path / "artifacts").is_dir()
    assert {p.name for p in REPO.iterdir()} <= before | {".pytest_cache"}


@pytest.mark.slow
def test_custom_pretraining_and_experts_read_an_npz(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    images = (60 * labels[:, None, None] + rng.integers(0, 40, (60, 28, 28))).astype(np.uint8)
    np.savez(tmp_path / "site.npz", train_images=images, train_labels=labels, class_names=np.array(CLASSES))
    monkeypatch.chdir(REPO)
    common = {
        "dataset_dir": str(tmp_path / "site.npz"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
        "device": "cpu",
        "cache_dir": str(tmp_path / "cache"),
    }
    generator = tmp_path / "generators" / "custom_site_28px_autoencoderkl.pt"
    run_config(
        "pretrain_generator.yaml",
        **common,
        generator_dir=str(tmp_path / "generators"),
        generator_steps=2,
        generator_batch_size=8,
        generator_min_psnr=0.0,
    )
    assert generator.is_file()
    experts = tmp_path / "experts"
    run_config(
        "train_experts.yaml",
        **common,
        expert_dir=str(experts),
        num_experts=1,
        expert_train_epochs=1,
        expert_batch_size=16,
        matching_net_width=16,
        matching_net_depth=2,
    )
    assert list(experts.glob("expert_*.pt"))
    # the held-out split carved from the npz's training images is written once and shared by both steps
    (split_file,) = (tmp_path / "cache").glob("site_*_split_seed0.json")
    assert len(json.loads(split_file.read_text())["heldout"]["test"]) == 6
