"""Fixtures shared by the test files; the helpers they import are in helpers.py."""

import os

import pytest
from helpers import write_medmnist_npz

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
