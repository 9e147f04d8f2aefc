"""Azure ML runs that never lose work, on real parts: the unpatched azure-ai-ml SDK against the local stand-in, Azurite
as the workspace's default datastore, real jobs in containers, a real MLflow server.

The workspace cache (orch-cache/ in the default datastore): commit semantics on flat blob storage (an interrupted
upload or a corrupt entry is never read; two writers of one key both end valid), a second submit from another client
folder that changes only the evaluation runs only the evaluation; training preempted in the middle resumes from its
last checkpoint in the same job (no step logged twice), a cancelled job's training resumes in the next submit; a Spot
job tier reaches the job body (and a wrong one is refused); `orch status` shows a cost."""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.azure

REPO = Path(__file__).resolve().parents[1]
REGISTRY = "orch-registry"


@pytest.fixture(scope="module")
def aml(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tone_data: Path) -> Iterator[dict[str, Any]]:
    """One stand-in for the module: the tiny model in a registry, the tone data in the default datastore, this
    process's workspace settings pointing at it."""
    from tests.azure_standin import start_standin

    tmp = tmp_path_factory.mktemp("amlcache")
    saved = dict(os.environ)
    # Timing knobs only: each job state held 0.2 s (not 0.5: no test here polls for a passing state), and orch
    # polls a followed job every 0.2 s (ORCH_AZURE_POLL_S, a user setting; 2 s by default) so a job's end is
    # seen at once.
    with start_standin(tmp / "standin", state_delay_s=0.2) as s:
        os.environ.update(s.settings["env"])
        os.environ["MLFLOW_TRACKING_TOKEN"] = s.mlflow_token()
        os.environ["ORCH_AZURE_CLOUD"] = s.cloud_name
        os.environ["ORCH_AZURE_CLOUD_METADATA"] = json.dumps(s.cloud_metadata())
        os.environ["ORCH_PROFILE"] = str(tmp / "profile.json")
        os.environ["ORCH_CACHE_DIR"] = str(tmp / "client-cache")
        os.environ["ORCH_AZURE_POLL_S"] = "0.2"
        os.environ["ORCH_CHECKPOINT_SYNC_S"] = "1"
        model_uri = s.seed_registry_model(REGISTRY, "tiny-phi3", "1", tiny_model)
        data_uri = s.seed_datastore_files(tone_data, "datasets/tone/tone.jsonl")
        try:
            yield {"s": s, "model_uri": model_uri, "data_uri": data_uri, "tmp": tmp}
        finally:
            os.environ.clear()
            os.environ.update(saved)
        assert s.unknown_requests == [], s.unknown_requests


def _cache() -> Any:
    from orchestrator.systems.azureml.workspace import make_ml_client, resolve_settings
    from orchestrator.systems.azureml.workspace_cache import WorkspaceCache

    return WorkspaceCache.for_client(make_ml_client(resolve_settings()))


def _entry_folder(root: Path, payload: bytes) -> Path:
    """A finished local cache entry: result.json (a model folder), the model, events."""
    from orchestrator.core.job import JobResult, JobState, ModelArtifact

    root.mkdir(parents=True)
    (root / "model").mkdir()
    (root / "model" / "weights.bin").write_bytes(payload)
    (root / "events.jsonl").write_text('{"type":"metric","name":"loss","value":1.0,"step":1}\n')
    JobResult(job_id="j", pass_type="MergeAdapterWeights", status=JobState.COMPLETED,
              model=ModelArtifact(format="hf", path="model"), metrics={"m": 1.0}).write(root)  # fmt: skip
    return root


# ---- commit semantics on flat-namespace blob storage -----------------------------------------------------------
def test_uncommitted_and_corrupt_entries_are_never_read(aml: dict[str, Any], tmp_path: Path) -> None:
    from orchestrator.systems.azureml.cache_blobs import CacheUnreadable
    from orchestrator.systems.azureml.workspace_cache import COMMIT

    cache = _cache()
    key = uuid.uuid4().hex
    # an upload cut short: objects without a marker
    cache.container.upload_blob(cache.objects_prefix(key, "dead") + "model/weights.bin", b"half")
    assert cache.lookup(key) is None
    assert {r.key: r.state for r in cache.status()}[key] == "uncommitted"

    payload = os.urandom(4096)
    entry = cache.publish(key, _entry_folder(tmp_path / "e", payload), meta={"pass": "merge"}, input_model=None)
    assert entry is not None and cache.lookup(key) is not None
    assert entry.files["model/weights.bin"]["size"] == 4096 and len(entry.files["model/weights.bin"]["sha256"]) == 64
    got = tmp_path / "got"
    cache.materialize(cache.lookup(key), got)
    assert (got / "model" / "weights.bin").read_bytes() == payload

    prefix = cache._blob_prefix(entry.uri)
    # the same size, other bytes: found by the listing, refused by the download's sha256 check
    cache.container.upload_blob(prefix + "model/weights.bin", os.urandom(4096), overwrite=True)
    with pytest.raises(CacheUnreadable, match="does not match its manifest"):
        cache.materialize(cache.lookup(key), tmp_path / "got2")
    # a file gone: the entry is not read at all
    cache.container.delete_blob(prefix + "model/weights.bin")
    assert cache.lookup(key) is None
    assert {r.key: r.state for r in cache.status()}[key] == "corrupt"
    # a marker that is not JSON
    cache.container.upload_blob(f"{cache.prefix}/entries/{key}/{COMMIT}", b"{not json", overwrite=True)
    assert cache.lookup(key) is None
    # a new writer of the key replaces the corrupt marker with a valid entry
    again = cache.publish(key, _entry_folder(tmp_path / "e2", payload), meta={"pass": "merge"}, input_model=None)
    assert again is not None and cache.lookup(key) is not None

    res = _orch("cache", "ls", "--workspace", "--json")
    assert res.exit_code == 0, res.output
    listed = {e["key"]: e for e in json.loads(res.stdout)}
    assert listed[key]["state"] == "committed" and listed[key]["pass"] == "merge"
    res = _orch("cache", "clean", "--workspace", "--key", key)
    assert res.exit_code == 0 and "removed 1 workspace cache entry" in res.output, res.output
    assert cache.lookup(key) is None and not list(cache.container.list_blobs(name_starts_with=prefix))


def test_two_writers_of_one_key_both_end_valid(aml: dict[str, Any], tmp_path: Path) -> None:
    cache = _cache()
    key = uuid.uuid4().hex
    folders = [_entry_folder(tmp_path / f"w{i}", os.urandom(200_000)) for i in range(2)]
    results: list[Any] = [None, None]
    barrier = threading.Barrier(2)

    def write(i: int) -> None:
        barrier.wait()
        results[i] = _cache().publish(key, folders[i], meta={"pass": "merge", "writer": i}, input_model=None)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] is not None and results[1] is not None
    assert results[0].uri == results[1].uri  # both writers hand back the one committed entry
    got = tmp_path / "got"
    cache.materialize(cache.lookup(key), got)
    assert (got / "model" / "weights.bin").read_bytes() in {(f / "model" / "weights.bin").read_bytes() for f in folders}
    listed = cache.container.list_blobs(name_starts_with=f"{cache.prefix}/entries/{key}/objects/")
    objects = {b.name.split("/objects/")[1].split("/")[0] for b in listed}
    assert len(objects) == 1  # the loser dropped its own objects
    cache.remove(key)


def test_checkpoints_sync_upload_and_restore(aml: dict[str, Any], tmp_path: Path) -> None:
    """Complete checkpoints go up while the pass runs (files, then their marker), an interrupted one never does;
    a new attempt restores the newest complete one; the key's commit drops them."""
    from orchestrator.core.checkpoints import complete_checkpoints, mark_complete

    cache = _cache()
    key = uuid.uuid4().hex
    src = tmp_path / "ckpt"
    lines: list[str] = []
    with cache.checkpoints(key, src, lines.append):
        for step in (2, 4):
            d = src / f"checkpoint-{step}"
            d.mkdir(parents=True)
            (d / "adapter.bin").write_bytes(os.urandom(3000 + step))
            mark_complete(d, step)
        (src / "checkpoint-6").mkdir()  # a save cut short: no marker
        (src / "checkpoint-6" / "adapter.bin").write_bytes(b"half")
        deadline = time.monotonic() + 30
        while len(cache.partial.remote_checkpoints(key)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    assert [s for s, _, _ in cache.partial.remote_checkpoints(key)] == [4, 2]
    assert any("checkpoint-4 saved to the workspace cache" in line for line in lines)
    dest = tmp_path / "restored"
    with cache.checkpoints(key, dest, lines.append):
        assert [s for s, _ in complete_checkpoints(dest)] == [4]
        restored = (dest / "checkpoint-4" / "adapter.bin").read_bytes()
        assert restored == (src / "checkpoint-4" / "adapter.bin").read_bytes()
    assert any("restored checkpoint-4" in line for line in lines)
    cache.drop_partial(key)
    assert cache.partial.remote_checkpoints(key) == []


# ---- jobs ------------------------------------------------------------------------------------------------------
def _workflow(
    folder: Path, aml: dict[str, Any], *, max_steps: int = 6, passes: list[str] | None = None,
    evaluator: dict[str, Any] | None = None, system: dict[str, Any] | None = None, lora: dict[str, Any] | None = None,
    workflow_id: str = "tone-cache",
) -> Path:  # fmt: skip
    """The demo workflow on the stand-in's CPU cluster, its cache and output in `folder` (a client folder)."""
    wf = json.loads((REPO / "jobs" / "tone-classification" / "config.json").read_text())
    wf["workflow_id"] = workflow_id
    wf["input_model"]["config"]["model_path"] = aml["model_uri"]
    wf["input_model"]["config"].pop("hf_config", None)
    wf["data_configs"][0]["load_dataset_config"]["params"]["data_files"] = aml["data_uri"]
    wf["passes"]["lora"]["config"]["training_args"].update(max_steps=max_steps, logging_steps=2, eval_steps=1000,
                                                           per_device_train_batch_size=2)  # fmt: skip
    wf["passes"]["lora"]["config"].update(lora or {})
    if passes is not None:
        wf["passes"] = {k: v for k, v in wf["passes"].items() if k in passes}
    cfg = wf["systems"]["aml"]["config"]
    cfg.update({"aml_compute": "cpu-cluster", "accelerators": ["cpu"], "hf_token": False, **(system or {})})
    cfg["aml_docker_config"]["conda_file_path"] = str(REPO / "environments" / "aml-cpu.conda.yaml")
    if evaluator is None:
        wf["engine"].pop("evaluator", None)
    else:
        wf["evaluators"] = {"tone_eval": evaluator}
        wf["engine"]["evaluator"] = "tone_eval"
    wf["engine"].update(host="aml", target="aml", cache_dir=str(folder / "cache"), output_dir=str(folder / "out"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(wf, indent=2))
    return path


def _orch(*args: str) -> Any:
    from orchestrator.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def _submit(config: Path, *extra: str) -> str:
    res = _orch("submit", "--config", str(config), *extra)
    assert res.exit_code == 0, res.output
    return res.stdout.strip().splitlines()[0]


def _submit_argv(argv: list[str]) -> str:
    res = _orch(*argv)
    assert res.exit_code == 0, res.output
    return res.stdout.strip().splitlines()[0]


def _plan(config: Path) -> dict[str, str]:
    res = _orch("submit", "--config", str(config), "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    return {r["pass"]: r["where"] for r in json.loads(res.stdout)["plan"]}


def _log(s: Any, name: str) -> str:
    return Path(s.state.jobs[name].log_path).read_text()


def _history(s: Any, name: str, metric: str) -> list[int]:
    import mlflow

    client = mlflow.MlflowClient(s.mlflow_uri)
    return [m.step for m in client.get_metric_history(s.state.jobs[name].mlflow_run_id, metric)]


def _metrics(s: Any, name: str) -> dict[str, float]:
    import mlflow

    return dict(mlflow.MlflowClient(s.mlflow_uri).get_run(s.state.jobs[name].mlflow_run_id).data.metrics)


def _wait_checkpoint(key: str, timeout: float = 240) -> int:
    """The newest step whose checkpoint the job has committed to the workspace cache."""
    cache = _cache()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = cache.partial.remote_checkpoints(key)
        if found:
            return found[0][0]
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint of {key[:16]} reached the workspace cache in {timeout}s")


MAX_STEPS = 120  # LoRA steps of the resume tests (batch 2): long enough to be stopped in the middle
RESUMABLE = {"checkpoint_every_steps": 10}
EVAL = {"metrics": [{"name": "perplexity", "type": "perplexity", "data_config": "dataset_default_train",
                     "user_config": {"max_samples": 8}}]}  # fmt: skip


def test_second_submit_changing_only_the_evaluation_runs_only_it(aml: dict[str, Any], tmp_path: Path) -> None:
    """Client folder A submits LoRA -> merge -> int4 ONNX -> evaluate; client folder B (an empty cache of its own)
    changes only the evaluation: its plan and its job take every pass but the evaluation from the workspace."""
    s = aml["s"]
    first = _workflow(tmp_path / "client-a", aml, evaluator=EVAL)
    name = _submit(first)
    assert s.wait_job(name, 900) == "Completed", _log(s, name)[-3000:]
    log_a = _log(s, name)
    assert re.search(r"^orch: plan lora \(LoRA\) runs$", log_a, re.M), log_a[-2000:]
    assert "orch: lora saved to the workspace cache" in log_a

    changed = dict(EVAL, metrics=[dict(EVAL["metrics"][0], user_config={"max_samples": 12})])
    second = _workflow(tmp_path / "client-b", aml, evaluator=changed)
    assert _plan(second) == {"lora": "workspace", "merge_adapter_weights": "workspace", "builder": "workspace",
                             "evaluate": "runs"}  # fmt: skip
    name_b = _submit(second)
    assert name_b != name and s.wait_job(name_b, 600) == "Completed", _log(s, name_b)[-3000:]
    log_b = _log(s, name_b)
    for step, verdict in (("lora", "cached"), ("merge_adapter_weights", "cached"), ("builder", "cached"),
                          ("evaluate", "runs")):  # fmt: skip
        assert len(re.findall(rf"^orch: plan {step} \(\w+\) ", log_b, re.M)) == 1
        assert re.search(rf"^orch: plan {step} \(\w+\) {verdict}$", log_b, re.M), log_b[-2000:]
    # no LoRA ran: no line of it, no training step logged (the cached pass's final metrics are logged at step 0)
    assert "[lora]" not in log_b and set(_history(s, name_b, "lora/train_loss")) <= {0}
    assert _history(s, name_b, "evaluate/perplexity-perplexity")  # Olive's <metric>-<sub type>
    res = _orch("download", name_b, "-o", str(tmp_path / "b-out"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b-out" / "model" / "genai_config.json").exists()


def test_preempted_lora_resumes_in_the_same_job(aml: dict[str, Any], tmp_path: Path) -> None:
    """A low-priority cluster, preempted in the middle of LoRA: Azure ML requeues the job (attempt 2), which restores
    the newest checkpoint from the workspace and trains on from there; every step is logged once."""
    s = aml["s"]
    config = _workflow(tmp_path, aml, max_steps=MAX_STEPS, passes=["lora"], system={"aml_compute": "cpu-lowpri"},
                       lora=RESUMABLE, workflow_id="tone-preempt")  # fmt: skip
    key = _plan_keys(config)["lora"]
    name = _submit(config)
    step = _wait_checkpoint(key)
    _admin(s, f"/_standin/jobs/{name}/pause")  # the node stops where it is: mid-LoRA, its checkpoint saved
    assert _cache().lookup(key) is None  # the pass has not finished
    r = _admin(s, f"/_standin/jobs/{name}/preempt")
    assert r.status_code == 200, r.text
    assert s.wait_job(name, 900) == "Completed", _log(s, name)[-3000:]
    log = _log(s, name)
    assert "preempted; job requeued (attempt 2)" in log
    resumed = [int(n) for n in re.findall(r"orch: lora resumed from step (\d+) \(attempt 2\)", log)]
    assert resumed and resumed[0] >= step > 0, log[-3000:]
    assert len(re.findall(r"^orch: plan lora ", log, re.M)) == 1
    steps = _history(s, name, "lora/train_loss")
    assert len(steps) == len(set(steps)) and max(steps) == MAX_STEPS, steps  # every logged step once, to the end
    res = _orch("status", name)
    assert res.exit_code == 0, res.output
    assert f"lora: resumed from step {resumed[0]}" in res.output
    m = re.search(r"^cost: \$(\d+\.\d+)", res.output, re.M)
    assert m and float(m[1]) > 0, res.output
    assert "low priority" in res.output
    metrics = _metrics(s, name)  # the cost reached the job's MLflow run: the pass's, its tokens per dollar, the run's
    assert metrics["lora/cost_usd"] > 0 and metrics["cost_usd"] == pytest.approx(metrics["lora/cost_usd"])
    assert metrics["lora/tokens_per_usd"] == pytest.approx(metrics["lora/train_tokens"] / metrics["lora/cost_usd"])
    assert _cache().partial.remote_checkpoints(key) == []  # committed: its checkpoints are gone


def test_cancelled_training_resumes_in_the_next_submit(aml: dict[str, Any], tmp_path: Path) -> None:
    s = aml["s"]
    # two steps more than the preemption test's LoRA: a key of its own (the workspace cache is the module's)
    config = _workflow(tmp_path, aml, max_steps=MAX_STEPS + 2, passes=["lora"], lora=RESUMABLE,
                       workflow_id="tone-cancel")  # fmt: skip
    key = _plan_keys(config)["lora"]
    name = _submit(config)
    step = _wait_checkpoint(key)
    _admin(s, f"/_standin/jobs/{name}/pause")  # stop it where it is (mid-LoRA), then cancel
    assert _cache().lookup(key) is None
    assert _orch("cancel", name).exit_code == 0
    assert s.wait_job(name, 120) == "Canceled"
    name2 = _submit(config)
    assert name2 != name and s.wait_job(name2, 900) == "Completed", _log(s, name2)[-3000:]
    log = _log(s, name2)
    resumed = [int(n) for n in re.findall(r"orch: lora resumed from step (\d+)", log)]
    assert resumed and resumed[0] >= step > 0, log[-3000:]
    assert "orch: plan lora (LoRA) runs" in log
    steps = _history(s, name2, "lora/train_loss")
    assert len(steps) == len(set(steps)) and max(steps) == MAX_STEPS + 2


def test_job_tier_reaches_the_job_body_and_a_wrong_one_is_refused(aml: dict[str, Any], tmp_path: Path) -> None:
    s = aml["s"]
    spot = {"queue_settings": {"job_tier": "spot"}, "max_retries": 1}
    config = _workflow(tmp_path, aml, max_steps=5, passes=["lora"], system=spot, workflow_id="tone-spot")
    name = _submit(config)
    body = s.state.jobs[name].request_props
    assert body["queueSettings"] == {"jobTier": "Spot"}
    assert body["tags"]["orch.max_retries"] == "1"
    # Spot capacity is preemptible: preempted without requeue, the job ends Failed and orch submits it again
    deadline = time.monotonic() + 300
    while s.state.jobs[name].status != "Running" and time.monotonic() < deadline:
        time.sleep(0.3)
    assert _admin(s, f"/_standin/jobs/{name}/preempt", {"requeue": False}).status_code == 200
    assert s.wait_job(name, 120) == "Failed"
    res = _orch("logs", name, "-f")
    assert res.exit_code == 0, res.output
    assert f"submitted again as {name}-r1" in res.output and s.state.jobs[f"{name}-r1"].status == "Completed"
    assert s.state.jobs[f"{name}-r1"].request_props["queueSettings"] == {"jobTier": "Spot"}
    assert f"preempted: submitted again as {name}-r1 (Completed)" in _orch("status", name).output

    wf = json.loads(config.read_text())
    wf["systems"]["aml"]["config"]["queue_settings"] = {"job_tier": "Cheap"}
    config.write_text(json.dumps(wf))
    res = _orch("submit", "--config", str(config))
    assert res.exit_code == 2 and "job_tier" in res.output and "Spot, Basic, Standard, Premium" in _flat(res.output)
    wf["systems"]["aml"]["config"]["queue_settings"] = {"job_tier": "Spot", "priority": "high"}
    config.write_text(json.dumps(wf))
    res = _orch("submit", "--config", str(config))
    assert res.exit_code == 2 and "priority" in res.output
    wf["systems"]["aml"]["config"].pop("queue_settings")
    wf["systems"]["aml"]["config"]["tier"] = "low_priority"
    wf["passes"]["lora"]["config"]["training_args"]["max_steps"] = 7  # not in the workspace cache: it must run
    config.write_text(json.dumps(wf))
    uploads = len(s.requests("POST", r"/startPendingUpload$"))
    res = _orch("submit", "--config", str(config))
    assert res.exit_code != 0
    assert "is a dedicated cluster but the system asks for tier low_priority" in _flat(res.output)
    assert "cpu-lowpri" in res.output and len(s.requests("POST", r"/startPendingUpload$")) == uploads


def test_the_service_refuses_a_job_tier_it_does_not_know(aml: dict[str, Any]) -> None:
    """Past the SDK's own check (a body sent as the SDK serialises it, its jobTier changed), the stand-in binds
    jobTier to the api-version's JobTier enum, as the service does, and refuses a queue priority."""
    import requests
    from azure.ai.ml import command
    from azure.ai.ml._restclient.arm_ml_service._utils.model_base import SdkJSONEncoder
    from azure.ai.ml.entities import Environment, QueueSettings

    s = aml["s"]
    ml = s.ml_client()
    env = ml.environments.create_or_update(
        Environment(name="tier-env", version="1", image="mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04")
    )
    job = command(command="echo hi", environment=f"azureml:{env.name}:{env.version}", compute="cpu-cluster",
                  queue_settings=QueueSettings(job_tier="spot"))  # fmt: skip
    body = json.loads(json.dumps(job._to_job()._to_rest_object(), cls=SdkJSONEncoder, exclude_readonly=True))
    assert body["properties"]["queueSettings"] == {"jobTier": "Spot"}
    url = f"{s.base_url}{s.workspace_id}/jobs/tier-{uuid.uuid4().hex[:8]}?api-version=2025-01-01-preview"
    token = s.credential().get_token(s.aml_audience.rstrip("/") + "/.default").token
    headers = {"Authorization": f"Bearer {token}"}
    ca = s.settings["env"]["REQUESTS_CA_BUNDLE"]
    for queue, needle in (({"jobTier": "Cheap"}, "jobTier 'Cheap' is not one of"), ({"jobTier": "Spot", "priority": 1},
                          "priority")):  # fmt: skip
        body["properties"]["queueSettings"] = queue
        r = requests.put(url, json=body, headers=headers, verify=ca, timeout=30)
        assert r.status_code == 400 and needle in r.text, r.text


def _flat(text: str) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(text.split())


def _plan_keys(config: Path) -> dict[str, str]:
    res = _orch("submit", "--config", str(config), "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    return {r["pass"]: r["key"] for r in json.loads(res.stdout)["plan"]}


def _admin(s: Any, path: str, body: dict[str, Any] | None = None) -> Any:
    import requests

    return requests.post(s.base_url + path, json=body or {}, verify=s.settings["env"]["REQUESTS_CA_BUNDLE"], timeout=30)


# ---- the README's example: a user's conda file, composed with orch's runtime layer ------------------------------
def _readme_checkout(root: Path, tiny_model: Path, tone_data: Path) -> Path:
    """The repository as the README's commands see it after `orch demo --tiny`: environments/, and the demo's job
    folder with the tiny model and the data beside its workflows."""
    import shutil

    shutil.copytree(REPO / "environments", root / "environments")
    job = root / "jobs" / "tone-classification"
    job.mkdir(parents=True)
    wf = json.loads((REPO / "jobs" / "tone-classification" / "finetune-aml.json").read_text())
    wf["passes"]["lora"]["config"]["training_args"]["max_steps"] = 20  # the one change: CI time on 2 cores
    (job / "finetune-aml.json").write_text(json.dumps(wf, indent=4))
    shutil.copytree(tiny_model, job / "models" / "tiny-phi3")
    (job / "dataset").mkdir()
    shutil.copy(tone_data, job / "dataset" / "dataset-classification.json")
    return root


def test_an_environment_lacking_a_pass_library_is_refused_before_any_upload(
    aml: dict[str, Any], tmp_path: Path, tiny_model: Path, tone_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = aml["s"]
    root = _readme_checkout(tmp_path, tiny_model, tone_data)
    monkeypatch.chdir(root)
    path = root / "jobs" / "tone-classification" / "finetune-aml.json"
    wf = json.loads(path.read_text())
    wf["passes"]["builder"] = {"type": "ModelBuilder", "config": {"precision": "int4"}}  # needs onnxruntime-genai
    path.write_text(json.dumps(wf))
    before = (len(s.requests("POST", r"/startPendingUpload$")), len(s.requests("PUT", r"/environments/")))
    res = _orch("submit", "--config", "jobs/tone-classification/finetune-aml.json", "--host", "aml")
    flat = res.output.replace("\n", "")  # rich wraps long lines (at a hyphen too)
    assert res.exit_code == 2, res.output
    assert "cpu-train.conda.yaml" in flat and "onnxruntime-genai" in flat and "ModelBuilder" in flat, flat
    assert "Traceback" not in res.output
    assert (len(s.requests("POST", r"/startPendingUpload$")), len(s.requests("PUT", r"/environments/"))) == before


@pytest.mark.timeout(1800)  # a first run builds the composed environment's image (minutes on 2 cores)
def test_readme_azure_ml_example_runs_as_written(
    aml: dict[str, Any], tmp_path: Path, tiny_model: Path, tone_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`orch submit --config jobs/tone-classification/finetune-aml.json --host aml` (environments/cpu-train.conda.yaml
    on an Azure ML CPU image: no azure package in it) completes: orch added its runtime layer to the environment.
    Two submits of one key at once (--force: a second job, not the running one): the first is frozen mid-LoRA
    while the second trains the same key and commits it; unfrozen, the first finishes and commits too. Both
    complete, the workspace keeps one valid entry of the key."""
    s = aml["s"]
    monkeypatch.chdir(_readme_checkout(tmp_path, tiny_model, tone_data))
    argv = ["submit", "--config", "jobs/tone-classification/finetune-aml.json", "--host", "aml"]
    res = _orch(*argv, "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    key = {r["pass"]: r["key"] for r in json.loads(res.stdout)["plan"]}["lora"]
    name = _submit_argv(argv)
    deadline = time.monotonic() + 1500  # a first run builds the composed environment's image
    job = s.state.jobs[name]
    while "[lora]" not in (_log(s, name) if job.log_path and Path(job.log_path).exists() else ""):
        assert time.monotonic() < deadline and job.status not in ("Completed", "Failed", "Canceled"), job.status
        time.sleep(0.3)
    assert _admin(s, f"/_standin/jobs/{name}/pause").status_code == 200
    second = _submit_argv([*argv, "--force"])
    assert second != name and s.wait_job(second, 900) == "Completed", _log(s, second)[-3000:]
    assert _admin(s, f"/_standin/jobs/{name}/resume").status_code == 200
    assert s.wait_job(name, 900) == "Completed", _log(s, name)[-3000:]
    for n in (name, second):  # both trained the key: neither found it cached when it planned
        assert re.search(r"^orch: plan lora \(LoRA\) runs$", _log(s, n), re.M), _log(s, n)[-2000:]
    cache = _cache()
    assert cache.lookup(key) is not None
    objects = {b.name.split("/objects/")[1].split("/")[0]
               for b in cache.container.list_blobs(name_starts_with=f"{cache.prefix}/entries/{key}/objects/")}
    assert len(objects) == 1  # the writer that lost dropped its upload
    puts = [r for r in s.requests("PUT", r"/environments/orch-orch-cpu-train/versions/") if r["status"] in (200, 201)]
    body = puts[-1]["body"]
    conda = (json.loads(body) if isinstance(body, str) else body)["properties"]["condaFile"]
    for pin in ("azureml-mlflow==1.62.0.post6", "azure-storage-blob==12.27.1", "peft==0.21.2"):
        assert pin in conda, conda
    res = _orch("download", name, "-o", str(tmp_path / "got"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "got" / "model" / "config.json").exists()


# ---- prices, environment composition, portable results (no workspace needed) -----------------------------------
def test_prices_come_from_the_dated_table_or_the_users_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.systems.azureml.prices import PRICES_AS_OF, node_price
    from orchestrator.systems.azureml.workspace import read_profile

    dedicated = node_price("Standard_NC24ads_A100_v4", "dedicated", nodes=2)
    assert dedicated is not None and dedicated.usd_per_hour == 3.673 and dedicated.nodes == 2
    assert PRICES_AS_OF in dedicated.source
    low = node_price("standard_nc24ads_a100_v4", "low_priority")
    assert low is not None and low.usd_per_hour == pytest.approx(3.673 * 0.2) and "estimate" in low.source
    assert node_price("Standard_Unknown_v9", "dedicated") is None

    monkeypatch.setenv("ORCH_PROFILE", str(tmp_path / "profile.json"))
    assert _orch("config", "set", "price.Standard_NC24ads_A100_v4", "3.10").exit_code == 0
    assert _orch("config", "set", "price.Standard_NC24ads_A100_v4.low_priority", "0.74").exit_code == 0
    bad = _orch("config", "set", "price.Standard_NC24ads_A100_v4", "cheap")
    assert bad.exit_code == 2 and "not a number" in bad.output
    profile = read_profile()
    assert node_price("Standard_NC24ads_A100_v4", "dedicated", profile=profile).usd_per_hour == 3.10
    own_low = node_price("Standard_NC24ads_A100_v4", "low_priority", profile=profile)
    assert own_low.usd_per_hour == 0.74 and own_low.source == "price.Standard_NC24ads_A100_v4.low_priority"


def test_compose_runtime_adds_orchs_layer_or_refuses_naming_the_file(tmp_path: Path) -> None:
    from orchestrator.systems.environments.runtime_layer import AZUREML_RUNTIME_LAYER, RUNTIME_LAYER, compose_runtime
    from orchestrator.systems.environments.spec import EnvSpecError, load_env_spec

    train = load_env_spec(REPO / "environments" / "cpu-train.conda.yaml")
    composed = compose_runtime(train, AZUREML_RUNTIME_LAYER)
    added = set(composed.pip_requirements) - set(train.pip_requirements)
    assert {"azureml-mlflow==1.62.0.post6", "azure-storage-blob==12.27.1", "azure-identity==1.27.0"} <= added
    assert composed.hash() != train.hash() and compose_runtime(train, RUNTIME_LAYER).hash() == train.hash()
    lora = ("torch", "transformers", "peft", "trl", "accelerate", "datasets")
    compose_runtime(train, AZUREML_RUNTIME_LAYER, needs={"LoRA": lora, "MergeAdapterWeights": ("safetensors",)})
    with pytest.raises(EnvSpecError, match=r"cpu-train.conda.yaml.*lacks onnxruntime-genai.*ModelBuilder imports"):
        compose_runtime(train, AZUREML_RUNTIME_LAYER, needs={"ModelBuilder": ("onnxruntime-genai", "onnx", "torch")})
    newer = tmp_path / "newer.conda.yaml"
    newer.write_text((REPO / "environments" / "cpu-train.conda.yaml").read_text().replace("3.15.0", "3.17.2"))
    with pytest.raises(EnvSpecError, match=r"mlflow-skinny==3.17.2 cannot be installed beside orch's runtime layer "
                                           r"\(azureml-mlflow==1.62.0.post6 needs mlflow-skinny<=3.15.0\): pin "
                                           r"mlflow-skinny==3.15.0"):  # fmt: skip
        compose_runtime(load_env_spec(newer), AZUREML_RUNTIME_LAYER)
    assert compose_runtime(load_env_spec(newer), RUNTIME_LAYER)  # Docker's layer has no azureml-mlflow: fine
    old = tmp_path / "old.conda.yaml"
    old.write_text((REPO / "environments" / "cpu-train.conda.yaml").read_text().replace("python=3.11", "python=3.8"))
    with pytest.raises(EnvSpecError, match="python>=3.10"):
        compose_runtime(load_env_spec(old), AZUREML_RUNTIME_LAYER)


def test_a_shared_result_names_its_input_not_a_path_of_another_machine(tmp_path: Path) -> None:
    from orchestrator.core.cache import portable_result, result_from_portable
    from orchestrator.core.job import JobResult, JobState, ModelArtifact

    base = tmp_path / "job-a" / "INPUT_model"
    base.mkdir(parents=True)
    given = ModelArtifact(format="hf", path=str(base))
    adapter = ModelArtifact(format="hf_adapter", path=str(base.resolve()), adapter_path="adapter")
    made = JobResult(job_id="j", pass_type="LoRA", status=JobState.COMPLETED, model=adapter)
    doc = portable_result(made, given)
    assert doc is not None and doc["model"] == {**doc["model"], "path": "@input:path", "adapter_path": "adapter"}
    elsewhere = ModelArtifact(format="hf", path="/mnt/azureml/cr/j/other/INPUT_model")
    here = result_from_portable(doc, elsewhere)
    assert here.model.path == elsewhere.path and here.model.adapter_path == "adapter"
    remote = result_from_portable(doc, elsewhere, root="azureml://datastores/ws/paths/orch-cache/entries/k/objects/w/")
    assert remote.model.adapter_path == "azureml://datastores/ws/paths/orch-cache/entries/k/objects/w/adapter"
    stray = made.model_copy(update={"model": made.model.model_copy(update={"path": "/somewhere/else"})})
    assert portable_result(stray, given) is None  # an absolute path that is not the input cannot be shared


def test_driver_log_lines_stay_whole_while_the_checkpoint_thread_writes(tmp_path: Path) -> None:
    """The driver job's log takes lines from the pass (main thread) and from the checkpoint-upload thread at
    once. With print() (text and newline written apart) 20,000 lines from each thread glued ~4,000 pairs
    together, which is how a clean-clone run of the preemption bench lost one loss line (44 == 7 + 40 - 2)."""
    import subprocess
    import sys

    script = tmp_path / "two_threads.py"
    script.write_text(
        "import threading\n"
        "from types import SimpleNamespace\n"
        "from orchestrator.engine.aml_driver import DriverReporter\n"
        "reporter = DriverReporter()\n"
        "def run(name):\n"
        "    step = SimpleNamespace(name=name)\n"
        "    for i in range(20000):\n"
        "        reporter.step_log(step, f\"{{'loss': {i}}}\")\n"
        "threads = [threading.Thread(target=run, args=(n,)) for n in ('lora', 'sync')]\n"
        "[t.start() for t in threads]\n"
        "[t.join() for t in threads]\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"} | {"PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    glued = [line for line in lines if not re.fullmatch(r"\[(lora|sync)\] \{'loss': \d+\}", line)]
    assert not glued, glued[:3]
    assert sum(line.startswith("[lora]") for line in lines) == sum(line.startswith("[sync]") for line in lines) == 20000


def test_bench_aml_preemption_runs_tiny(tmp_path: Path) -> None:
    """bench/aml_preemption.py, 40 steps: its own stand-in, a low-priority job preempted once a checkpoint is in the
    workspace (after step 5 at the earliest) that completes, per-row JSON whose counts add up; without
    --write-results the committed RESULTS.md section stays. (With 8 steps and the preemption at step 5 regardless,
    a loaded CI machine preempted before the first checkpoint upload finished: resumed from step 0; with 16 steps
    one clean-clone run failed it too: the steps must outlast the first upload on a loaded machine.)"""
    import subprocess
    import sys

    results = REPO / "bench" / "RESULTS.md"
    before = results.read_text()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "AZURE", "MLFLOW_", "REQUESTS_CA"))}
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, str(REPO / "bench" / "aml_preemption.py"), "--steps", "40", "--every", "2",
           "--preempt-at", "5", "--out", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| steps done when preempted |" in proc.stdout
    rows = {r["row"]: r for r in (json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json"))}
    job_log = (tmp_path / "out" / "job_log.txt").read_text()
    said = "\n".join(line[:90] for line in job_log.splitlines() if re.search(r"loss'|resum|restor|preempt|saved", line))
    before_row = rows["requeued attempt from step 0 (before)"]
    orch_row = rows["resumed from the workspace checkpoint (orch)"]
    done = orch_row["steps_done_before_preemption"]
    assert 5 <= done < 40 and before_row["steps_trained_in_all"] == done + 40
    assert orch_row["resumed_from_step"] % 2 == 0 and 0 < orch_row["resumed_from_step"] <= done
    assert orch_row["steps_trained_in_all"] == done + 40 - orch_row["resumed_from_step"], said  # the job's own lines
    assert results.read_text() == before
