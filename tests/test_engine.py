"""The engine end to end on LocalSystem: the real passes on the tiny model, the cache, resume after kill -9,
MLflow, and the CLI's contract (one-line errors, dry-run plan)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from orchestrator.core.cache import Cache
from orchestrator.engine import Engine
from orchestrator.engine.mlflow_model import mlflow_store
from orchestrator.olive import load_workflow

REPO = Path(__file__).resolve().parents[1]


def orch(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean_env(), "PYTHONPATH": str(REPO), "COLUMNS": "200", **(env or {})},
    )


def clean_env() -> dict[str, str]:
    """This process's environment less the MLflow URIs an earlier test may have left (a registry URI there would
    take the model version these tests look for in their own store)."""
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model, tone_data):
    """One full run of the demo workflow (LoRA -> merge -> int4 ONNX -> evaluate) shared by several tests."""
    from tests.conftest import demo_workflow

    tmp = tmp_path_factory.mktemp("full")
    wf = demo_workflow()
    wf["input_model"]["config"]["hf_config"]["model_name"] = str(tiny_model)
    wf["data_configs"][0]["load_dataset_config"]["params"]["data_files"] = str(tone_data)
    wf["passes"]["lora"]["config"]["training_args"].update(max_steps=40, logging_steps=5, eval_steps=20)
    wf["engine"].update(cache_dir=str(tmp / "cache"), output_dir=str(tmp / "out"))
    cfg = tmp / "config.json"
    cfg.write_text(json.dumps(wf))
    uri = f"sqlite:///{tmp / 'mlruns.db'}"
    started = time.time()
    proc = orch("run", "--config", str(cfg), "--tracking-uri", uri, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "cfg": cfg, "uri": uri, "proc": proc, "seconds": time.time() - started}


def test_full_run_writes_model_and_manifest(full_run):
    out = full_run["tmp"] / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p["name"] for p in manifest["passes"]] == ["lora", "merge_adapter_weights", "builder", "evaluate"]
    assert all(not p["cached"] for p in manifest["passes"])
    assert (out / "model" / "genai_config.json").exists()
    assert manifest["final_model"]["format"] == "onnx_genai"
    assert manifest["final_model"]["sha256"]
    assert (out / "training.png").stat().st_size > 1000  # the loss curves, beside the model
    lora = manifest["passes"][0]
    assert lora["metrics"]["train_loss"] > 0 and lora["versions"]["peft"]
    ev = manifest["passes"][-1]["metrics"]
    assert 0.0 <= ev["accuracy-accuracy"] <= 1.0 and ev["perplexity-perplexity"] > 1.0
    assert ev["throughput-decode_tokens_per_s"] > 0 and ev["latency-prefill_p50_ms"] > 0


def test_metrics_and_model_reach_mlflow(full_run):
    client = mlflow.MlflowClient(full_run["uri"], registry_uri=full_run["uri"])  # not the process's global one
    exp = client.get_experiment_by_name("orch")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    history = client.get_metric_history(run.info.run_id, "lora/train_loss")
    assert len(history) >= 4  # one per logging step, streamed while the pass ran
    assert history[-1].value < history[0].value  # the loss went down
    for key in (
        "builder/duration_s",
        "builder/model_size_bytes",
        "evaluate/accuracy-accuracy",
        "evaluate/perplexity-perplexity",
    ):
        assert key in run.data.metrics, key
    assert run.data.params["passes.lora.config.lora_r"] == "16"
    versions = client.search_model_versions("name='tone-classification'")
    assert len(versions) == 1 and versions[0].run_id == run.info.run_id
    recorded = json.loads((full_run["tmp"] / "out" / "manifest.json").read_text())["mlflow"]
    assert recorded["registry_uri"] == full_run["uri"] and recorded["run_id"] == run.info.run_id
    assert recorded["registered_model"] == {"name": "tone-classification", "version": str(versions[0].version)}
    assert f"(registered as 'tone-classification' version {versions[0].version})" in full_run["proc"].stdout
    # the registered model is a pyfunc that generates with onnxruntime-genai; loaded with MLflow's URIs pointed
    # at the store for the call only (mlflow.set_registry_uri would also export MLFLOW_REGISTRY_URI to every later
    # test's subprocesses, which would then register their models here)
    with mlflow_store(full_run["uri"], full_run["uri"]):
        model = mlflow.pyfunc.load_model(f"models:/tone-classification/{versions[0].version}")
    completions = model.predict(["### Text: I won the lottery\n### The tone is:\n"], params={"max_new_tokens": 4})
    assert isinstance(completions[0], str)


def test_rerun_is_all_cache_hits_and_fast(full_run):
    started = time.time()
    proc = orch("run", "--config", str(full_run["cfg"]), "--no-tracking", cwd=full_run["tmp"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((full_run["tmp"] / "out" / "manifest.json").read_text())
    assert all(p["cached"] for p in manifest["passes"])
    # no model code ran: every cache entry's job.log is from the first run only
    assert time.time() - started < full_run["seconds"]


def test_dry_run_prints_plan(full_run, tmp_path):
    wf = json.loads(full_run["cfg"].read_text())
    wf["passes"]["builder"]["config"]["precision"] = "fp32"  # change one pass: it and what follows rerun
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(wf))
    proc = orch("run", "--config", str(cfg), "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "2 pass(es) would run, 2 from the cache" in proc.stdout
    engine = Engine(load_workflow(cfg), tracking=False)
    plan = {s.name: s.cached for s in engine.plan()}
    assert plan == {"lora": True, "merge_adapter_weights": True, "builder": False, "evaluate": False}


def test_evaluate_input_model_scores_the_starting_point(full_run, tmp_path):
    """Olive's engine.evaluate_input_model: the evaluator also scores the input model, on the same held-out rows,
    so the fine-tune's gain is a number in the manifest; the passes themselves come from the cache."""
    wf = json.loads(full_run["cfg"].read_text())
    wf["engine"].update(evaluate_input_model=True, output_dir=str(tmp_path / "out"))
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(wf))
    proc = orch("run", "--config", str(cfg), "--no-tracking", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    passes = json.loads((tmp_path / "out" / "manifest.json").read_text())["passes"]
    assert [(p["name"], p["cached"]) for p in passes] == [
        ("evaluate_input", False),
        ("lora", True),
        ("merge_adapter_weights", True),
        ("builder", True),
        ("evaluate", True),
    ]
    before, after = passes[0]["metrics"], passes[-1]["metrics"]
    assert 0.0 <= before["accuracy-accuracy"] <= 1.0
    assert not any(k.startswith(("latency", "throughput")) for k in before)  # the HF input has no ONNX runtime
    job_log = (full_run["tmp"] / "cache" / "runs" / passes[0]["cache_key"] / "job.log").read_text()
    assert "latency (latency) skipped: measured on ONNX models only, this is hf" in job_log
    assert after["perplexity-perplexity"] < before["perplexity-perplexity"]  # the fine-tune learned the data


def test_config_error_is_one_line_without_traceback(tmp_path, workflow_factory):
    cfg = workflow_factory()
    wf = json.loads(cfg.read_text())
    wf["passes"]["lora"]["config"]["lora_rr"] = 8
    cfg.write_text(json.dumps(wf))
    proc = orch("run", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2
    assert "lora_rr" in proc.stderr and "lora_r" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_kill_9_leaves_no_cache_entry_and_resume_continues(tmp_path, workflow_factory):
    cfg = workflow_factory(max_steps=20)
    cache = Cache(tmp_path / "cache")
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "run", "--config", str(cfg), "--no-tracking"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    # wait until the third pass (the ONNX builder) is running, then kill -9 the CLI and its job together
    deadline = time.time() + 300
    while time.time() < deadline:
        jobs = [p.read_text() for p in (tmp_path / "cache" / "tmp").glob("*/job.json")]
        if any('"ModelBuilder"' in j for j in jobs):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the builder pass never started")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {e.result.pass_type for e in cache.entries()}
    assert finished == {"LoRA", "MergeAdapterWeights"}  # the killed pass left no cache entry
    # resume: the same command runs only what did not finish
    done = orch("run", "--config", str(cfg), "--no-tracking", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [p["cached"] for p in manifest["passes"]] == [True, True, False]
    assert not any((tmp_path / "cache" / "tmp").iterdir())  # the killed run's staging folder was cleaned


def test_two_runs_sharing_a_cache(tmp_path, workflow_factory):
    cfg = workflow_factory(max_steps=20, passes=["lora", "merge_adapter_weights"])
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "run", "--config", str(cfg), "--no-tracking"],
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    entries = Cache(tmp_path / "cache").entries()
    assert len(entries) == 2  # each pass ran once; the second run waited on the lock and took the hit
    for e in entries:
        assert e.result.status.value == "Completed"
