"""Where orch registers the final model: in the registry of the store the run is tracked in, whatever an earlier
Tracker in the same process did, unless $MLFLOW_REGISTRY_URI names another registry. Real MLflow on sqlite
stores, the tiny Phi-3 folder logged as orch logs a final model (Tracker.log_model); every store is read with a
client that names its registry (MlflowClient(uri) alone reads the process's global registry URI)."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils

from orchestrator.engine.mlflow_model import mlflow_store
from orchestrator.engine.tracking import Tracker, resolve_tracking_uri

NAME = "tone-classification"  # the same model name in every store: a leak shows as a second version


@pytest.fixture(autouse=True)
def no_uri_from_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a fresh `python` has: no MLflow URI in the environment or in MLflow's globals (monkeypatch puts back
    whatever an earlier test in this process left)."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)


def store(uri: str) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(uri, registry_uri=uri)


def versions(uri: str) -> list[tuple[int, str]]:
    """(version, run id) of every registered version of NAME in the store's own registry."""
    return sorted((int(v.version), v.run_id) for v in store(uri).search_model_versions(f"name='{NAME}'"))


def process_globals() -> tuple:
    return (
        tracking_utils._tracking_uri,
        registry_utils._registry_uri,
        os.environ.get("MLFLOW_TRACKING_URI"),
        os.environ.get("MLFLOW_REGISTRY_URI"),
    )


def run_and_register(uri: str, model: Path) -> Tracker:
    tracker = Tracker(uri, "orch", "wf")
    tracker.log_model(model, "hf_model", NAME)
    tracker.end("FINISHED")
    return tracker


def test_two_trackers_one_after_the_other_each_register_in_their_own_store(tmp_path: Path, tiny_model: Path) -> None:
    """A notebook runs two workflows: the first names its store, the second leaves it to orch's default (the
    store beside its config). Before, the first Tracker's mlflow.set_tracking_uri was left in the process (and
    exported as MLFLOW_TRACKING_URI), so the second run and its model version went into the first store."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = f"sqlite:///{tmp_path / 'a' / 'mlruns.db'}"
    before = process_globals()
    first = run_and_register(a, tiny_model)
    assert process_globals() == before  # nothing of store a is left for whoever runs next in this process

    b = resolve_tracking_uri(None, None, base_dir=tmp_path / "b")  # what Engine does for a config without one
    assert b == f"sqlite:///{tmp_path / 'b' / 'mlruns.db'}"
    second = run_and_register(b, tiny_model)
    assert process_globals() == before

    assert first.registry_uri == a and second.registry_uri == b
    assert versions(a) == [(1, first.run_id)]  # exactly its own version, and the run that logged it
    assert versions(b) == [(1, second.run_id)]
    assert first.registered_version == second.registered_version == "1"
    assert [r.info.run_id for r in store(a).search_runs([store(a).get_experiment_by_name("orch").experiment_id])] == [
        first.run_id
    ]
    tags = store(b).get_run(second.run_id).data.tags
    assert tags["orch.model_uri"] == second.model_uri and tags["orch.registered_version"] == "1"
    # each version's files are the ones its own store logged, beside that store
    for uri, folder in ((a, tmp_path / "a"), (b, tmp_path / "b")):
        source = Path(store(uri).get_model_version_download_uri(NAME, "1").removeprefix("file://"))
        assert source.is_relative_to(folder / "mlruns"), source
        assert (source / "MLmodel").is_file() and (source / "artifacts" / tiny_model.name / "config.json").is_file()

    # the registered version is a model that loads and generates, resolved through store b's registry only
    with mlflow_store(b, b):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    assert process_globals() == before
    (completion,) = model.predict(["### Text: I won the lottery\n### The tone is:\n"], params={"max_new_tokens": 2})
    assert isinstance(completion, str)


def test_two_trackers_open_side_by_side_log_into_their_own_runs(tmp_path: Path, tiny_model: Path) -> None:
    """Both Trackers open before either logs its model (before, the fluent log_model read the last one's store:
    the first one's run was "not found" there)."""
    a, b = (f"sqlite:///{tmp_path / n}.db" for n in ("a", "b"))
    first, second = Tracker(a, "orch", "wf"), Tracker(b, "orch", "wf")
    first.log_model(tiny_model, "hf_model", NAME)
    second.log_model(tiny_model, "hf_model", NAME)
    assert versions(a) == [(1, first.run_id)] and versions(b) == [(1, second.run_id)]


def test_a_registry_the_user_names_gets_the_version_and_the_runs_stay_in_the_tracking_store(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$MLFLOW_REGISTRY_URI (MLflow's own setting for a separate registry) is honoured, relative like the
    tracking URI, from the current folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "sqlite:///registry.db")
    tracked = f"sqlite:///{tmp_path / 'mlruns.db'}"
    registry = f"sqlite:///{tmp_path / 'registry.db'}"
    tracker = run_and_register(tracked, tiny_model)
    assert tracker.registry_uri == registry
    assert versions(registry) == [(1, tracker.run_id)]
    assert versions(tracked) == []
    assert store(tracked).get_run(tracker.run_id).info.status == "FINISHED"
    assert os.environ["MLFLOW_REGISTRY_URI"] == "sqlite:///registry.db"  # the user's setting, as it was


@pytest.mark.azure
def test_the_workspace_mlflow_gets_its_version_between_two_local_runs(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run tracked in the Azure ML workspace's MLflow (its https endpoint with a token, what orch reads the
    workspace with; the stand-in's real MLflow server behind it) registers in the workspace's registry, between two
    runs tracked in local stores in the same process: each of the three registries holds exactly its own version."""
    from tests.azure_standin import start_standin

    for name in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "MLFLOW_TRACKING_SERVER_CERT_PATH"):
        monkeypatch.delenv(name, raising=False)  # the stand-in exports its CA; put back as it was afterwards
    with start_standin(tmp_path / "standin") as s:
        for name, value in s.settings["env"].items():
            if name != "MLFLOW_TRACKING_URI":  # the URI is named to the Tracker, not left in the environment
                monkeypatch.setenv(name, value)
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", s.mlflow_token())
        before = process_globals()
        a, b = (f"sqlite:///{tmp_path / n}.db" for n in ("a", "b"))
        first = run_and_register(a, tiny_model)
        workspace = run_and_register(s.mlflow_uri, tiny_model)
        last = run_and_register(b, tiny_model)
        assert process_globals() == before
        assert workspace.registry_uri == s.mlflow_uri
        assert versions(s.mlflow_uri) == [(1, workspace.run_id)]
        assert versions(a) == [(1, first.run_id)] and versions(b) == [(1, last.run_id)]
        assert store(s.mlflow_uri).get_run(workspace.run_id).data.tags["orch.registered_version"] == "1"
