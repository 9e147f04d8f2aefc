"""MLflow after a first run, a cached rerun, a rerun from another folder, a partly cached run and a new model name:
the real CLI on the tiny model (LoRA -> merge -> int4 ONNX) and the real MLflow sqlite store it writes by default
(beside the config). What is asserted is MLflow's own state: runs, registered versions, metric histories."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.conftest import demo_workflow

REPO = Path(__file__).resolve().parents[1]


def orch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # the default store is under test: no MLflow / orch / Azure setting left in this process by an earlier test
    # (the CLI's in-process tests set MLFLOW_LOGGING_LEVEL, --tempdir sets TMPDIR, the stand-ins export theirs)
    leaked = ("MLFLOW_", "ORCH_", "AZURE", "MSI_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(leaked) and k != "TMPDIR"}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env={**env, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
    )


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tone_data: Path) -> Path:
    """A workflow folder as a user keeps one: config.json with paths relative to it, its data beside it."""
    folder = tmp_path_factory.mktemp("job")
    (folder / "data").mkdir()
    shutil.copyfile(tone_data, folder / "data" / "tone.jsonl")
    wf = demo_workflow()
    wf["input_model"]["config"]["hf_config"]["model_name"] = str(tiny_model)
    wf["data_configs"][0]["load_dataset_config"]["params"]["data_files"] = "data/tone.jsonl"
    wf["passes"]["lora"]["config"]["training_args"].update(max_steps=12, logging_steps=3, eval_steps=6)
    wf["engine"].pop("evaluator")
    (folder / "config.json").write_text(json.dumps(wf, indent=2))
    return folder


def store(job: Path) -> mlflow.MlflowClient:
    uri = f"sqlite:///{job / 'mlruns.db'}"
    # the registry named too: without it MLflow reads the process's global registry URI, which an earlier
    # in-process test pointed at its own store (the suite then saw that store's versions here)
    return mlflow.MlflowClient(uri, registry_uri=uri)


def runs_of(client: mlflow.MlflowClient) -> list:
    return client.search_runs([client.get_experiment_by_name("orch").experiment_id], order_by=["start_time ASC"])


def _all_runs(client: mlflow.MlflowClient) -> list[tuple[str, str, str, str, dict]]:
    """Every run of every experiment, deleted ones too (what a failure message needs to say where a run came from)."""
    from mlflow.entities import ViewType

    exps = client.search_experiments(view_type=ViewType.ALL)
    runs = client.search_runs([e.experiment_id for e in exps], run_view_type=ViewType.ALL)
    return [(r.info.run_id, r.info.experiment_id, r.info.status, r.info.lifecycle_stage, r.data.tags) for r in runs]


def history(client: mlflow.MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


def test_reruns_leave_mlflow_clean(job: Path, tmp_path: Path) -> None:
    # 1. the first run, started in the config's folder: one run, one registered version, the loss per step
    first = orch("run", "--config", "config.json", cwd=job)
    assert first.returncode == 0, first.stderr[-3000:]
    client = store(job)
    (run,) = runs_of(client)
    assert run.info.status == "FINISHED"
    versions = client.search_model_versions("name='tone-classification'")  # the workflow_id, not one shared name
    assert [(int(v.version), v.run_id) for v in versions] == [(1, run.info.run_id)], _all_runs(client)
    assert client.search_registered_models() and {m.name for m in client.search_registered_models()} == {
        "tone-classification"
    }
    loss = history(client, run.info.run_id, "lora/train_loss")
    assert [step for step, _ in loss] == [1, 3, 6, 9, 12]  # logging_first_step, then every 3 steps
    artifacts = job / "mlruns"  # the store's artifacts live beside it, not in the folder the run started from
    logged_files = sorted(p.relative_to(artifacts) for p in artifacts.rglob("*") if p.is_file())
    assert any(p.name == "model.onnx" for p in logged_files)
    manifest = json.loads((job / "outputs" / "manifest.json").read_text())
    assert manifest["mlflow"]["run_id"] == run.info.run_id and manifest["mlflow"]["recorded_earlier"] is False
    assert manifest["mlflow"]["tracking_uri"] == f"sqlite:///{job / 'mlruns.db'}"
    # the prompt format LoRA trained on is recorded and carried into the exported ONNX folder
    assert manifest["prompt_format"]["template"] == "### Text: {phrase}\n### The tone is:\n{tone}"
    carried = json.loads((job / "outputs" / "model" / "orch_prompt.json").read_text())
    assert carried["kind"] == "text_template" and carried["template"] == manifest["prompt_format"]["template"]

    # 2. the same run from another folder: every pass cached -> no new run, no model copy, no new version;
    #    it points to the recorded run, and nothing is written where it was started
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = orch("run", "--config", str(job / "config.json"), cwd=elsewhere)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"mlflow: run {run.info.run_id}" in again.stdout and "recorded earlier" in again.stdout
    assert [r.info.run_id for r in runs_of(client)] == [run.info.run_id]
    assert len(client.search_model_versions("name='tone-classification'")) == 1
    assert sorted(p.relative_to(artifacts) for p in artifacts.rglob("*") if p.is_file()) == logged_files
    assert not any(elsewhere.iterdir()), list(elsewhere.iterdir())  # no mlruns.db, no mlruns/, no .orch/
    manifest = json.loads((job / "outputs" / "manifest.json").read_text())
    assert all(p["cached"] for p in manifest["passes"])
    assert manifest["mlflow"]["run_id"] == run.info.run_id and manifest["mlflow"]["recorded_earlier"] is True
    assert manifest["mlflow"]["model_uri"] == run.data.tags["orch.model_uri"]

    # 3. one pass changed: a new run; the cached LoRA pass brings its whole recorded loss history (same steps,
    #    same values), not one point at step 0; the new model is version 2 of the same name
    wf = json.loads((job / "config.json").read_text())
    wf["passes"]["builder"]["config"]["precision"] = "fp32"
    (job / "fp32.json").write_text(json.dumps(wf, indent=2))
    changed = orch("run", "--config", "fp32.json", cwd=job)
    assert changed.returncode == 0, changed.stderr[-3000:]
    second = runs_of(client)[-1]
    assert len(runs_of(client)) == 2 and second.info.run_id != run.info.run_id
    assert history(client, second.info.run_id, "lora/train_loss") == loss
    assert history(client, second.info.run_id, "lora/eval_loss") == history(client, run.info.run_id, "lora/eval_loss")
    assert sorted(int(v.version) for v in client.search_model_versions("name='tone-classification'")) == [1, 2]

    # 4. a model name of one's own: registered under it (a new record: the name is part of what a run records)
    named = orch("run", "--config", "config.json", "--model-name", "tone-int4", cwd=job)
    assert named.returncode == 0, named.stderr[-3000:]
    assert [int(v.version) for v in client.search_model_versions("name='tone-int4'")] == [1]
    assert len(client.search_model_versions("name='tone-classification'")) == 2
