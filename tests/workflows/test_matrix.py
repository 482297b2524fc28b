"""The experimental matrix through the real bundle: every matcher x parameterisation, and the real-image baselines,
each a few iterations of `bundles/pathmnist/train.yaml` on tiny synthetic data, run in-process with MONAI's
``ConfigWorkflow`` (the same code path as ``python -m monai.bundle run``)."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from helpers import REPO, write_cifar, write_medmnist_npz, write_subset
from monai.bundle import ConfigWorkflow

from monai_pld.data import load_medmnist, select_initial_indices

BUNDLE = REPO / "bundles" / "pathmnist"

# tiny and fast: 9 classes x 8 training images, a narrow matching network, short matcher loops
TINY = {
    "ipc": 2,
    "iterations": 3,
    "batch_real_per_class": 4,
    "generator_steps": 2,
    "log_interval": 1,
    "grid_interval": 3,
    "checkpoint_interval": 3,
    "device": "cpu",
    "download": False,
    "matching_net_width": 16,
    "matching_net_depth": 2,
    "dc_loops": [2, 1],
    "dc_batch_train": 8,
    "mtt_syn_steps": 3,
    "mtt_expert_epochs": 1,
    "mtt_max_start_epoch": 1,
    "eval_interval": 2,
    "eval_epochs": 2,
}


def run_config(config_file, **overrides):
    workflow = ConfigWorkflow(config_file=str(config_file), workflow_type="train", logging_file=False, **overrides)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data, a shared pretrained generator, and expert trajectories written by the experts bundle."""
    tmp = tmp_path_factory.mktemp("matrix")
    data = tmp / "data"
    write_medmnist_npz(data / "pathmnist.npz", n_per_split={"train": 72, "val": 18, "test": 18})
    common = {
        "dataset_dir": str(data),
        "generator_dir": str(tmp / "generators"),
        "tracking_uri": f"sqlite:///{tmp / 'mlruns.db'}",
        "expert_dir": str(tmp / "experts"),
    }
    mp = pytest.MonkeyPatch()
    mp.chdir(REPO)  # the bundles' macros are relative to the repository root
    run_config(
        BUNDLE / "train_experts.yaml",
        **{k: v for k, v in common.items() if k != "generator_dir"},
        num_experts=2,
        expert_train_epochs=3,
        expert_batch_size=32,
        matching_net_width=16,
        matching_net_depth=2,
        device="cpu",
        download=False,
    )
    yield tmp, common
    mp.undo()


def _outputs(out: Path):
    with np.load(out / "distilled" / "images.npz", allow_pickle=False) as npz:
        images, labels = npz["images"], npz["labels"]
    manifest = json.loads((out / "distilled" / "manifest.json").read_text())
    return images, labels, manifest


def _mlflow_run(common, name):
    """The MLflow client of the module's store and the run called ``name``."""
    client = mlflow.MlflowClient(tracking_uri=common["tracking_uri"])
    experiment = client.get_experiment_by_name("monai_pld").experiment_id
    return client, client.search_runs([experiment], filter_string=f"attributes.run_name = '{name}'")[0]


def test_experts_bundle_writes_trajectories(setup):
    tmp, _ = setup
    files = sorted((tmp / "experts").glob("expert_*.pt"))
    assert [f.name for f in files] == ["expert_000.pt", "expert_001.pt"]
    record = torch.load(files[0], weights_only=True)
    assert record["trajectory"].shape[0] == 4  # the initial parameters and one copy per epoch


@pytest.mark.parametrize("matcher", ["dm", "dc", "mtt"])
@pytest.mark.parametrize("parameterization", ["slfd", "latent", "pixel"])
def test_every_matcher_with_every_parameterization(setup, matcher, parameterization):
    tmp, common = setup
    out = tmp / f"{matcher}_{parameterization}"
    run_config(
        BUNDLE / "train.yaml",
        **common,
        **TINY,
        matcher=matcher,
        parameterization=parameterization,
        output_dir=str(out),
        run_name=out.name,
    )
    images, labels, manifest = _outputs(out)
    assert images.shape == (18, 28, 28, 3) and images.dtype == np.uint8
    assert np.array_equal(labels, np.repeat(np.arange(9), 2))
    assert (out / "distilled" / "distribution.pt").is_file() and list((out / "grids").glob("*.png"))
    assert manifest["iterations"] == 3 and manifest["config"]["matcher"] == matcher
    assert manifest["parameterization"]["kind"] == parameterization
    # the matcher's own settings are recorded in the manifest and as MLflow params
    settings = manifest["matcher"]
    assert settings is not None
    client, run = _mlflow_run(common, out.name)
    assert run.info.status == "FINISHED" and "loss" in run.data.metrics
    # the validation curve: after iteration 2 and at the end (3)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [2, 3]
    assert any(k.startswith("matcher.") for k in run.data.params)
    if matcher == "dc":
        assert settings["loops"] in ([2, 1], (2, 1)) or settings.get("outer_loop") == 2
    if matcher == "mtt":
        assert "syn_lr" in run.data.metrics  # the learnt student learning rate is tracked
        assert settings["syn_steps"] == 3


def test_dm_kernel_reaches_the_matcher_and_the_records(setup):
    tmp, common = setup
    out = tmp / "dm_slfd_gaussian"
    run_config(BUNDLE / "train.yaml", **common, **TINY, dm_kernel="gaussian", output_dir=str(out), run_name=out.name)
    _, _, manifest = _outputs(out)
    assert manifest["matcher"]["kernel"] == "gaussian" and manifest["config"]["dm_kernel"] == "gaussian"
    client, run = _mlflow_run(common, out.name)
    assert run.data.params["dm_kernel"] == "gaussian" and run.data.params["matcher.kernel"] == "gaussian"
    assert np.isfinite([m.value for m in client.get_metric_history(run.info.run_id, "match_loss")]).all()
    out = tmp / "dm_slfd_std"
    run_config(BUNDLE / "train.yaml", **common, **TINY, dm_std_weight=0.5, output_dir=str(out), run_name=out.name)
    _, _, manifest = _outputs(out)
    assert manifest["matcher"]["std_weight"] == 0.5 and manifest["matcher"]["kernel"] == "linear"


@pytest.mark.parametrize("baseline", ["random", "full"])
def test_real_image_baselines_give_the_same_kind_of_output(setup, baseline):
    tmp, common = setup
    out = tmp / baseline
    run_config(
        BUNDLE / "train.yaml", **common, **TINY, parameterization=baseline, output_dir=str(out), run_name=baseline
    )
    images, labels, manifest = _outputs(out)
    train = load_medmnist("pathmnist", "train", common["dataset_dir"], download=False)
    real = train.images.permute(0, 2, 3, 1).numpy()
    if baseline == "full":
        assert np.array_equal(images, real) and np.array_equal(labels, train.labels.numpy())
        assert manifest["ipc"] == 8
    else:
        assert images.shape == (18, 28, 28, 3) and np.array_equal(labels, np.repeat(np.arange(9), 2))
        # every image is a real training image of its class, none repeats, and they are exactly the seeded choice
        # that initialises the slots of the learnable parameterisations
        for image, label in zip(images, labels, strict=True):
            matches = np.flatnonzero((real == image).all(axis=(1, 2, 3)))
            assert matches.size and (train.labels.numpy()[matches] == label).all()
        assert len({img.tobytes() for img in images}) == 18
        order, _ = select_initial_indices(train, 2, seed=0)
        assert np.array_equal(images, real[order.numpy()])
    assert not (out / "distilled" / "distribution.pt").exists()
    assert manifest["parameterization"]["kind"] == baseline and manifest["iterations"] == 1


def test_external_generator_by_override(setup, tmp_path):
    """A user's own decoder (TorchScript) replaces the pretrained generator through one config override."""
    _, common = setup
    decoder = torch.nn.Sequential(
        torch.nn.ConvTranspose2d(4, 3, 4, stride=4), torch.nn.Tanh()
    )  # (4, 7, 7) -> (3, 28, 28) in [-1, 1]
    scripted = torch.jit.script(decoder)
    path = tmp_path / "decoder.ts"
    scripted.save(str(path))
    out = tmp_path / "external"
    generator = {
        "_target_": "monai_pld.networks.ExternalGenerator",
        "decoder": str(path),
        "latent_shape": [4, 7, 7],
        "image_shape": [3, 28, 28],
        "output_range": [-1, 1],
    }
    run_config(
        BUNDLE / "train.yaml", **common, **TINY, **{"train#generator": generator}, output_dir=str(out), run_name="ext"
    )
    images, _, manifest = _outputs(out)
    assert images.shape == (18, 28, 28, 3)
    assert manifest["generator"]["class"] == "ExternalGenerator" and manifest["generator"]["latent_shape"] == [4, 7, 7]


def test_cifar10_bundle_with_a_preset(tmp_path, monkeypatch):
    """CIFAR-10 through its own bundle, composed with the IPC 1 preset, on a tiny copy of the torchvision layout;
    the generator is pretrained for 32 px on first use."""
    write_cifar(tmp_path / "data", per_batch=20)
    monkeypatch.chdir(REPO)
    out = tmp_path / "cifar"
    files = [
        str(REPO / "bundles" / "cifar10" / "train.yaml"),
        str(REPO / "bundles" / "cifar10" / "presets" / "ipc1.yaml"),
    ]
    workflow = ConfigWorkflow(
        config_file=files,
        workflow_type="train",
        logging_file=False,
        dataset_dir=str(tmp_path / "data"),
        generator_dir=str(tmp_path / "generators"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}",
        output_dir=str(out),
        **{k: v for k, v in TINY.items() if k != "ipc"},
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    images, labels, manifest = _outputs(out)
    assert images.shape == (10, 32, 32, 3) and manifest["ipc"] == 1
    assert manifest["config"]["dataset_flag"] == "cifar10"
    assert (tmp_path / "generators" / "cifar10_32px_autoencoderkl.pt").is_file()
    assert manifest["generator"]["latent_shape"] == [32, 16, 16]  # decoder block 2 of the 4 x 16 x 16 generator
    assert manifest["generator"]["latent_layer"] == 2


def test_imagenet_subset_bundle(tmp_path, monkeypatch):
    write_subset(tmp_path / "data", per_class=3)
    monkeypatch.chdir(REPO)
    out = tmp_path / "imagenette"
    run_config(
        REPO / "bundles" / "imagenet_subsets" / "train.yaml",
        dataset_dir=str(tmp_path / "data"),
        generator_dir=str(tmp_path / "generators"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}",
        output_dir=str(out),
        **{**TINY, "image_size": 32, "ipc": 1, "matching_net_depth": 2},
    )
    images, labels, manifest = _outputs(out)
    assert images.shape == (10, 32, 32, 3) and manifest["config"]["dataset_flag"] == "imagenette"
