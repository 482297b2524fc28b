"""MLflow records stay where the user put the tracking store: the experiment's artefacts go beside the store's
database (or to ``mlflow_artifacts``), never into the working directory, so a bundle run from the repository root
leaves nothing in the checkout. Also: a bundle error under ``python -m monai.bundle`` ends with the project's
message."""

import logging
import sys

import mlflow
import pytest
from helpers import REPO, checkout_state, new_in_checkout, run_evaluation_bundle

from monai_pld import bundle_errors
from monai_pld.utils import ConfigError, default_artifact_location, mlflow_experiment, mlflow_run


def test_default_artifact_location_is_beside_the_database(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_artifact_location("sqlite:///mlruns.db") == (tmp_path / "mlruns").as_uri()
    assert default_artifact_location(f"sqlite:///{tmp_path}/a/store.db") == (tmp_path / "a" / "mlruns").as_uri()
    assert default_artifact_location("sqlite:///with%20space/m.db") == (tmp_path / "with space" / "mlruns").as_uri()
    for uri in ("http://127.0.0.1:5000", "sqlite://", "sqlite:///:memory:", "", None):
        assert default_artifact_location(uri) is None


def test_experiment_created_with_its_artefact_folder(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path / "..")  # anywhere but beside the store
    uri = f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}"
    (tmp_path / "store").mkdir()
    client = mlflow.MlflowClient(tracking_uri=uri)
    default_id = mlflow_experiment(uri, "beside")
    assert client.get_experiment(default_id).artifact_location == (tmp_path / "store" / "mlruns").as_uri()
    chosen_id = mlflow_experiment(uri, "chosen", tmp_path / "elsewhere")
    assert client.get_experiment(chosen_id).artifact_location == (tmp_path / "elsewhere").as_uri()
    assert mlflow_experiment(uri, "beside") == default_id  # found again, not created twice
    with caplog.at_level(logging.WARNING, logger="monai_pld.utils"):
        assert mlflow_experiment(uri, "beside", tmp_path / "other") == default_id
    assert "already exists" in caplog.text and "stay there" in caplog.text
    assert mlflow_experiment(None, "anything") is None and mlflow_experiment("", "anything") is None


def test_one_run_helper_ends_runs_finished_or_failed_and_reuses_a_given_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    with mlflow_run(uri, "exp", "ok", {"a": 1, "nested": {"b": 2}, "xs": [1, 2]}) as (_, ok_id):
        assert client.get_run(ok_id).info.status == "RUNNING"
    run = client.get_run(ok_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "ok"
    assert run.data.params == {"a": "1", "nested": "{'b': 2}", "xs": "1,2"}
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri())  # the experiment's folder
    with pytest.raises(KeyError), mlflow_run(uri, "exp", "broken") as (_, failed_id):
        raise KeyError("boom")
    assert client.get_run(failed_id).info.status == "FAILED"
    with mlflow_run(uri, "exp", "ignored", run_id=ok_id) as (c, same_id):  # an existing run: logged into, not ended
        c.set_tag(same_id, "later", "yes")
    assert same_id == ok_id and client.get_run(ok_id).data.tags["later"] == "yes"
    assert len(client.search_runs([client.get_experiment_by_name("exp").experiment_id])) == 2


def test_a_bundle_run_from_the_repository_root_leaves_nothing_there(tmp_path, monkeypatch):
    """The evaluation bundle logs result files as MLflow artefacts: they go to ``mlruns/`` beside the temporary
    store, while the working directory is the repository root (as the bundles' macros require)."""
    before = checkout_state()
    monkeypatch.chdir(REPO)
    run_evaluation_bundle(
        tmp_path,
        n_per_split={"train": 36, "val": 9, "test": 18},
        ipc=1,
        backbones=["convnet"],
        epochs=1,
        run_name="repository_root",
    )
    assert new_in_checkout(before) == []
    logged = sorted(p.name for p in (tmp_path / "mlruns").rglob("*") if p.is_file())
    assert {"results.json", "summary.md", "accuracy.png"} <= set(logged)


def _chain():
    try:
        try:
            raise ConfigError("'ipc' must be an integer >= 1, got 0; e.g. --ipc 1")
        except ConfigError as error:
            raise RuntimeError("Failed to evaluate ConfigExpression: $monai_pld.utils.check(...)") from error
    except RuntimeError as wrapped:
        return wrapped


def test_bundle_excepthook_prints_the_project_message_last(capsys, monkeypatch):
    calls = []
    hook = bundle_errors._hook(lambda *exc: calls.append(exc))
    error = _chain()
    hook(type(error), error, error.__traceback__)
    assert calls == [] and capsys.readouterr().err.strip() == (
        "ConfigError: 'ipc' must be an integer >= 1, got 0; e.g. --ipc 1"
    )
    monkeypatch.setenv("MONAI_PLD_TRACEBACK", "1")  # the whole traceback first, the message still last
    hook(type(error), error, error.__traceback__)
    assert len(calls) == 1 and capsys.readouterr().err.strip().splitlines()[-1].startswith("ConfigError: 'ipc'")
    try:  # any other error wrapped by MONAI: traceback as usual, then the innermost error
        try:
            raise FileNotFoundError("no pathmnist.npz in /data")
        except FileNotFoundError as inner:
            raise RuntimeError("Failed to evaluate ConfigExpression") from inner
    except RuntimeError as outer:
        hook(type(outer), outer, outer.__traceback__)
    assert len(calls) == 2 and capsys.readouterr().err.strip() == "FileNotFoundError: no pathmnist.npz in /data"
    plain = ValueError("not wrapped")
    hook(ValueError, plain, None)
    assert len(calls) == 3 and capsys.readouterr().err == ""


def test_bundle_excepthook_only_under_the_bundle_command_line(monkeypatch):
    assert not bundle_errors.running_bundle_cli()  # pytest is not `python -m monai.bundle`
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    assert bundle_errors.install() is False and sys.excepthook is sys.__excepthook__
    assert bundle_errors.install(force=True) is True and sys.excepthook is not sys.__excepthook__
    installed = sys.excepthook
    assert bundle_errors.install(force=True) is True and sys.excepthook is installed  # once only


def test_innermost_error_follows_causes_and_contexts():
    error = _chain()
    assert isinstance(bundle_errors.innermost_error(error), ConfigError)
    assert [type(e) for e in bundle_errors.error_chain(error)] == [RuntimeError, ConfigError]
    lone = KeyError("x")
    assert bundle_errors.innermost_error(lone) is lone


def test_an_unusable_tracking_uri_is_named():
    from monai_pld.utils import mlflow_experiment

    with pytest.raises(ValueError, match=r"'tracking_uri' 'foo://bar' cannot be used .*sqlite:///mlruns.db"):
        mlflow_experiment("foo://bar", "x")
