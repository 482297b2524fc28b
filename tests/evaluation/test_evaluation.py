"""Evaluation: metrics by hand, a separable toy set, mismatched sets, and the evaluation bundle end to end."""

import json

import mlflow
import numpy as np
import pytest
import torch
from helpers import REPO, run_evaluation_bundle

from monai_pld.data import ImageSet
from monai_pld.evaluation import ImageSource, classification_metrics, load_image_source, train_and_test
from monai_pld.networks.classifiers import get_classifier
from monai_pld.utils import ConfigError
from monai_pld.workflows import check_evaluation_config


def colours(n_per_class, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    base = torch.tensor([[220, 30, 30], [30, 220, 30], [30, 30, 220]]).view(3, 3, 1, 1)
    noise = torch.randint(-25, 25, (len(labels), 3, size, size), generator=gen)
    return ImageSet((base[labels] + noise).clamp(0, 255).to(torch.uint8), labels, ["r", "g", "b"], "toy")


def test_metrics_by_hand():
    labels = np.array([0, 0, 1, 1, 2, 2])
    # predictions 0, 1, 1, 1, 2, 0: accuracy 4/6; per class 1/2, 2/2, 1/2
    probs = np.array(
        [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8], [0.5, 0.2, 0.3]]
    )
    m = classification_metrics(probs, labels, 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class_accuracy"] == pytest.approx([0.5, 1.0, 0.5])
    # F1 per class: class 0 p=1/2 r=1/2 -> 1/2; class 1 p=2/3 r=1 -> 0.8; class 2 p=1 r=1/2 -> 2/3
    assert m["f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)

    # one-vs-rest AUC of class 0 by counting ordered pairs: scores of positives 0.8, 0.2 vs negatives
    # 0.1, 0.2, 0.1, 0.5 -> (4 + 1.5) / 8; averaged with classes 1 and 2 computed the same way
    def auc(c):
        pos, neg = probs[labels == c, c], probs[labels != c, c]
        return np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg])

    assert m["auc"] == pytest.approx(np.mean([auc(c) for c in range(3)]))


def test_separable_toy_set_is_learnt():
    train, test = colours(4), colours(20, seed=1)
    source = ImageSource(train.float_images(), train.labels, {"kind": "toy"})
    mean, std = train.normalization()
    for protocol in ("dc", "glad"):
        m = train_and_test(
            "convnet",
            source,
            test,
            mean,
            std,
            protocol=protocol,
            epochs=30,
            device="cpu",
            lr=0.01 if protocol == "glad" else None,
        )
        assert m["accuracy"] > 0.8 and m["epochs"] == 30  # chance is 1/3


def test_mismatched_sets_are_refused(tmp_path):
    train = colours(4)
    images = np.zeros((6, 16, 16, 3), np.uint8)
    np.savez(tmp_path / "images.npz", images=images, labels=np.array([0, 1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="classes"):
        load_image_source(tmp_path / "images.npz", train)
    np.savez(tmp_path / "images.npz", images=np.zeros((3, 28, 28, 3), np.uint8), labels=np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="shape"):
        load_image_source(tmp_path / "images.npz", train)
    with pytest.raises(ConfigError, match="'backbones'"):
        check_evaluation_config(1, 5, ["convnet", "lenet9"], "dc", "mean", "random")
    with pytest.raises(ConfigError, match="'distilled'"):
        check_evaluation_config(1, 5, ["convnet"], "dc", "mean", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="'ipc' must be an integer >= 1"):
        check_evaluation_config(1, 5, ["convnet"], "dc", "mean", "random", ipc=0)
    with pytest.raises(ConfigError, match="'test_split' must be 'test' or 'val'"):
        check_evaluation_config(1, 5, ["convnet"], "dc", "mean", "random", test_split="train")
    # a set of another dataset with as many classes: its class names give it away
    names = np.array([f"other{c}" for c in range(3)])
    np.savez(tmp_path / "images.npz", images=np.zeros((3, 16, 16, 3), np.uint8), labels=np.arange(3), class_names=names)
    with pytest.raises(ValueError, match=r"distilled from 3 classes \['other0', 'other1', 'other2'\], but the data"):
        load_image_source(tmp_path / "images.npz", train)
    np.savez(
        tmp_path / "images.npz",
        images=np.zeros((3, 16, 16, 3), np.uint8),
        labels=np.arange(3),
        class_names=np.array(train.class_names),
    )
    assert load_image_source(tmp_path / "images.npz", train).labels.tolist() == [0, 1, 2]


@pytest.mark.parametrize("name", ["convnet", "alexnet", "vgg11", "resnet18", "vit"])
@pytest.mark.parametrize("channels", [1, 3])
def test_backbones_take_28px_grey_and_rgb(name, channels):
    net = get_classifier(name, channels, 9, 28)
    assert net(torch.rand(2, channels, 28, 28)).shape == (2, 9)


def test_evaluation_bundle_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = run_evaluation_bundle(
        tmp_path, ipc=2, backbones=["convnet", "alexnet"], runs=1, epochs=3, run_name="eval_random"
    )
    results = json.loads((out / "results.json").read_text())
    assert [r["backbone"] for r in results["runs"]] == ["convnet", "alexnet"]
    assert set(results["summary"]["per_backbone"]) == {"convnet", "alexnet"}
    assert (
        results["summary"]["cross_architecture_accuracy"] == results["summary"]["per_backbone"]["alexnet"]["accuracy"]
    )
    assert "| convnet |" in (out / "summary.md").read_text()
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    run = client.search_runs([client.get_experiment_by_name("monai_pld").experiment_id])[0]
    assert {"convnet_accuracy", "alexnet_accuracy", "cross_architecture_accuracy"} <= set(run.data.metrics)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} >= {
        "evaluation/results.json",
        "evaluation/summary.md",
        "evaluation/accuracy.png",
    }


def test_default_output_folder_never_writes_into_a_package(tmp_path):
    from monai_pld.evaluation import default_evaluation_dir

    run = tmp_path / "run"
    (run / "distilled").mkdir(parents=True)
    package = tmp_path / "received"
    package.mkdir()
    (package / "manifest.json").write_text(json.dumps({"format": "monai_pld.package/1"}))
    (tmp_path / "shared.zip").write_bytes(b"")
    assert default_evaluation_dir(run, "pathmnist", 28, "mean") == str(run / "evaluation_mean")
    assert default_evaluation_dir(run / "distilled" / "images.npz", "pathmnist", 28, "mean") == str(
        run / "distilled" / "evaluation_mean"
    )
    assert default_evaluation_dir(package, "pathmnist", 28, "resample") == str(
        tmp_path / "received_evaluation_resample"
    )
    assert default_evaluation_dir(tmp_path / "shared.zip", "pathmnist", 28, "mean") == str(
        tmp_path / "shared_evaluation_mean"
    )
    assert (
        default_evaluation_dir("random", "pathmnist", 28, "mean")
        == "results/baseline_pathmnist_28px_random/evaluation_mean"
    )
