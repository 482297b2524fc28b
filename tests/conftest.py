"""Fixtures shared by the test files; the helpers they import are in helpers.py."""

import os
from types import SimpleNamespace

import pytest
from helpers import TINY_CLI, checkout_state, new_in_checkout, run_bundle, write_medmnist_npz

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(autouse=True)
def _no_outside_mlflow_store(monkeypatch):
    """A user's ``MLFLOW_TRACKING_URI`` would take precedence over the tests' temporary stores."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def fake_medmnist(tmp_path):
    """A folder with a small synthetic ``pathmnist.npz`` (9 classes, 28 px RGB)."""
    write_medmnist_npz(tmp_path / "pathmnist.npz")
    return tmp_path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The one tiny PathMNIST-shaped bundle run (SLFD, DM, 4 iterations, IPC 2) that every test of a finished run
    reads: a real ``python -m monai.bundle run`` with its generator, outputs and MLflow store in a temporary folder.
    Tests may add files beside it (packages, evaluations) but must not change what the run wrote."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    data = tmp / "data"
    write_medmnist_npz(data / "pathmnist.npz", n_per_split={"train": 90, "val": 18, "test": 36})
    out = tmp / "run"
    before = checkout_state()
    proc = run_bundle(tmp, data, *TINY_CLI, "--output_dir", out, "--run_name", "tiny")
    # what the run left in the repository (its working directory), taken before any other test can add to it
    return SimpleNamespace(tmp=tmp, data=data, out=out, proc=proc, new_in_checkout=new_in_checkout(before))
