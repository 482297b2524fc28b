"""Fixtures shared by the test files; the helpers they import are in helpers.py."""

import os
from types import SimpleNamespace

import pytest
from helpers import TINY_CLI, checkout_state, new_in_checkout, run_bundle, write_medmnist_npz

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # several workers (pytest-xdist's -n) share the cores: each worker, and the bundle processes it starts, gets
    # its share of threads rather than all of them (torch's default), which would oversubscribe the machine
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    import torch

    torch.set_num_threads(_threads)


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


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups from the marks
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``-n``, with ``--dist loadgroup``) the tests of one file stay on one worker, so that
    its module-scoped fixtures are built once, and so do all the tests that read the session's tiny bundle run
    (``tiny_run``), whatever their file."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        group = "tiny_run" if "tiny_run" in item.fixturenames else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
