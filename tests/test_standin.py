"""The local Azure stand-in, driven by the real, unpatched azure-ai-ml / azure-identity / azure-keyvault-secrets
SDKs and a real MLflow server; jobs run in containers of their own environment image on the real Docker engine.
Needs Azurite (`bash infra/install-azurite.sh`), a running dockerd and orch's base image (`orch env base`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `tests` is a namespace package: importable from the repo root
    sys.path.insert(0, str(REPO))

from tests.azure_standin import StandIn, start_standin  # noqa: E402
from tests.azure_standin import state as st  # noqa: E402

pytestmark = pytest.mark.azure

HF_TOKEN = "hf_standin_test_token_4f8a2c"  # a fake value; the test checks where it travels
REGISTRY = "orch-registry"

# The job environment: what the job script imports, and nothing else (no torch: the host venv must not leak in).
JOB_CONDA = {
    "name": "orch-standin-job",
    "dependencies": ["python=3.11", "pip", {"pip": [
        "mlflow-skinny==3.15.0", "azureml-mlflow==1.62.0.post6", "azure-identity==1.27.0",
        "azure-keyvault-secrets==4.12.0", "azure-storage-blob==12.27.1",
    ]}],
}  # fmt: skip

JOB_SCRIPT = """
import hashlib, importlib.util, os, pathlib, sys

run_id = os.environ["MLFLOW_RUN_ID"]  # mlflow.start_run() consumes it from the environment
print("tracking:", os.environ["MLFLOW_TRACKING_URI"].split(":")[0], flush=True)
print("torch importable:", importlib.util.find_spec("torch") is not None, flush=True)
print("python:", sys.executable, flush=True)
import mlflow
from azure.identity import ManagedIdentityCredential
from azure.keyvault.secrets import SecretClient

data, model, out = (pathlib.Path(p) for p in sys.argv[1:4])
print("data files:", sorted(p.name for p in data.iterdir()), flush=True)
print("model files:", sorted(p.name for p in model.iterdir()), flush=True)
token = SecretClient(os.environ["KV_URL"], ManagedIdentityCredential()).get_secret("hf-token").value
(out / "result.txt").write_text((data / "train.txt").read_text().upper())
(out / "token.sha256").write_text(hashlib.sha256(token.encode()).hexdigest())
with mlflow.start_run():
    assert mlflow.active_run().info.run_id == run_id
    mlflow.log_metric("loss", 0.25, step=1)
    mlflow.log_param("job", os.environ["AZUREML_RUN_ID"])
print("job done", flush=True)
"""


@pytest.fixture(scope="session")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    root = tmp_path_factory.mktemp("standin")
    model = root / "seed" / "phi3"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "phi3"}')
    (model / "weights.bin").write_bytes(b"\x00" * 1024)
    data = root / "seed" / "tone"
    data.mkdir(parents=True)
    (data / "train.txt").write_text("calm and kind\n")
    with start_standin(
        root / "run",
        seed_models={"phi3": model},
        seed_datastore={"datasets/tone": data},
        secrets={"hf-token": HF_TOKEN},
        registry=REGISTRY,
    ) as s:
        yield s
        assert s.unknown_requests == [], f"the SDK called routes the stand-in does not serve: {s.unknown_requests}"


@pytest.fixture(scope="session")
def ml(standin: StandIn):
    return standin.ml_client()


@pytest.fixture(scope="session")
def env(ml):
    from azure.ai.ml.entities import Environment

    return ml.environments.create_or_update(
        Environment(
            name="orch-standin-env", image="mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest",
            conda_file=JOB_CONDA,
        )
    )  # fmt: skip


def _code(tmp: Path, script: str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "main.py").write_text(script)
    return tmp


def test_workspace_and_datastore(ml, standin: StandIn) -> None:
    ws = ml.workspaces.get(standin.workspace)
    assert ws.name == standin.workspace
    assert ws.discovery_url == f"{standin.base_url}/discovery"
    ds = ml.datastores.get("workspaceblobstore")
    assert ds.account_name == "devstoreaccount1" and ds.container_name.startswith("azureml-blobstore-")
    assert ml.datastores.get_default().name == "workspaceblobstore"


def test_environment_is_reused(ml, env, standin: StandIn) -> None:
    from azure.ai.ml.entities import Environment

    again = ml.environments.create_or_update(Environment(name=env.name, image=env.image, conda_file=env.conda_file))
    assert (env.version, again.version) == ("1", "1")
    changed = ml.environments.create_or_update(Environment(name=env.name, image=env.image + "-other"))
    assert changed.version == "2"  # a different image makes a new version, as on Azure ML
    put = standin.requests("PUT", rf"/environments/{env.name}/versions/1$")[0]
    assert "condaFile" in put["body"] and "azureml-mlflow" in put["body"]


def test_command_job_end_to_end(ml, env, standin: StandIn, tmp_path: Path, capsys) -> None:
    from azure.ai.ml import Input, Output, command

    job = command(
        code=str(_code(tmp_path / "src", JOB_SCRIPT)),
        command="python main.py ${{inputs.data}} ${{inputs.model}} ${{outputs.out}}",
        inputs={
            "data": Input(type="uri_folder", path="azureml://datastores/workspaceblobstore/paths/datasets/tone/"),
            "model": Input(type="custom_model", path=f"azureml://registries/{REGISTRY}/models/phi3/versions/1"),
        },
        outputs={"out": Output(type="uri_folder")},
        environment=env,
        environment_variables={"KV_URL": standin.key_vault_url},
        compute="cpu-cluster",
        experiment_name="standin-e2e",
    )
    created = ml.jobs.create_or_update(job)
    ml.jobs.stream(created.name)
    streamed = capsys.readouterr().out
    assert "model files: ['config.json', 'weights.bin']" in streamed
    assert "data files: ['train.txt']" in streamed and "job done" in streamed
    assert ml.jobs.get(created.name).status == "Completed"
    # It ran in its environment's image, not in this venv: azureml:// tracking, no torch, the conda env's python.
    assert "tracking: azureml" in streamed and "torch importable: False" in streamed
    assert "python: /azureml-envs/azureml_" in streamed
    record = standin.state.jobs[created.name]
    assert record.image and record.image.startswith("azureml-standin/env:")
    for state in ("Starting", "Preparing", "Queued", "Running", "Finalizing", "Completed"):
        assert state in record.status_history
    assert record.status_history.index("Preparing") < record.status_history.index("Running")
    build_log = standin.azurite.download_bytes(st.ARTIFACT_CONTAINER, f"ExperimentRun/dcid.{created.name}/"
                                               "azureml-logs/20_image_build_log.txt").decode()  # fmt: skip
    assert "Building image" in build_log or "found in the workspace's image cache" in build_log

    ml.jobs.download(created.name, download_path=str(tmp_path / "dl"), all=True)
    assert (tmp_path / "dl/named-outputs/out/result.txt").read_text() == "CALM AND KIND\n"
    assert "job done" in (tmp_path / "dl/artifacts/user_logs/std_log.txt").read_text()
    # The job's own identity read the secret from Key Vault through the MSI route.
    import hashlib

    sha = (tmp_path / "dl/named-outputs/out/token.sha256").read_text()
    assert sha == hashlib.sha256(HF_TOKEN.encode()).hexdigest()
    # The secret value travelled only in Key Vault responses: never in a request, nor another response.
    for r in standin.request_log:
        assert HF_TOKEN not in str(r["headers"]) + str(r["body"]) + str(r["query"])
        if HF_TOKEN in (r["response"] or ""):
            assert r["route"] == "get_secret", r["path"]
    assert any(r["path"] == "/msi/token" and r["status"] == 200 for r in standin.request_log)

    # MLflow metrics logged inside the job are in the MLflow server, on the run the stand-in made.

    client = _mlflow_client(standin)
    runs = client.search_runs(
        [client.get_experiment_by_name("standin-e2e").experiment_id], f"tags.azureml.runId = '{created.name}'"
    )
    assert len(runs) == 1
    assert runs[0].data.metrics["loss"] == 0.25 and runs[0].data.params["job"] == created.name
    assert runs[0].info.status == "FINISHED"

    # The same code again: the snapshot is found by hash and not uploaded twice.
    before = len(standin.requests("POST", r"/startPendingUpload$"))
    again = ml.jobs.create_or_update(job)
    assert len(standin.requests("POST", r"/startPendingUpload$")) == before
    assert standin.wait_job(again.name) == "Completed"


def test_failing_job(ml, env, tmp_path: Path) -> None:
    from azure.ai.ml import command
    from azure.ai.ml.exceptions import JobException

    job = ml.jobs.create_or_update(
        command(
            code=str(_code(tmp_path / "src", "import sys\nsys.exit('bad config: lora_r must be > 0')\n")),
            command="python main.py",
            environment=env,
            compute="cpu-cluster",
        )
    )
    with pytest.raises(JobException, match="lora_r must be > 0"):
        ml.jobs.stream(job.name)
    assert ml.jobs.get(job.name).status == "Failed"


def _mlflow_client(standin: StandIn) -> Any:
    """A plain MlflowClient on the workspace endpoint with a user token, as orch status reads it."""
    import os

    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_TRACKING_TOKEN"] = standin.mlflow_token()
    return MlflowClient(tracking_uri=standin.mlflow_uri)


def test_cancel_stops_the_container(ml, env, standin: StandIn, tmp_path: Path) -> None:
    import docker
    from azure.ai.ml import command

    script = (
        "import subprocess, time\nsubprocess.Popen(['sleep', '300'])\nprint('started', flush=True)\ntime.sleep(300)\n"
    )
    job = ml.jobs.create_or_update(
        command(
            code=str(_code(tmp_path / "src", script)), command="python main.py", environment=env, compute="cpu-cluster"
        )  # fmt: skip
    )
    _wait_status(ml, job.name, "Running")
    client = docker.from_env()
    label = {"label": f"azureml-standin.job={job.name}"}
    assert len(client.containers.list(filters=label)) == 1
    ml.jobs.begin_cancel(job.name).result()
    assert standin.wait_job(job.name, 60) == "Canceled"
    assert ml.jobs.get(job.name).status == "Canceled"
    assert client.containers.list(all=True, filters=label) == []  # the container (python and `sleep`) is gone


def _wait_status(ml: Any, name: str, wanted: str, timeout: float = 300) -> list[str]:
    """Poll jobs.get until `wanted`; returns every status seen, in order, without repeats."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = ml.jobs.get(name).status
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == wanted:
            return seen
        if status in ("Completed", "Failed", "Canceled"):
            raise AssertionError(f"job {name} ended {status} waiting for {wanted}; seen {seen}")
        time.sleep(0.1)
    raise AssertionError(f"job {name} not {wanted} after {timeout}s; seen {seen}")


def test_models_local_path_and_registry(ml, standin: StandIn, tmp_path: Path) -> None:
    from azure.ai.ml.entities import Model

    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"onnx")
    created = ml.models.create_or_update(Model(name="tone-merged", path=str(folder), type="custom_model"))
    assert created.version == "1"
    got = ml.models.get("tone-merged", "1")
    assert got.type == "custom_model" and "LocalUpload" in got.path
    ml.models.download("tone-merged", "1", download_path=str(tmp_path / "dl"))
    assert (tmp_path / "dl" / "tone-merged" / "merged" / "model.onnx").read_bytes() == b"onnx"

    reg = standin.ml_client(registry_name=REGISTRY)
    phi3 = reg.models.get("phi3", "1")
    assert phi3.name == "phi3" and phi3.version == "1" and phi3.type == "custom_model"


def test_key_vault_challenge(standin: StandIn) -> None:
    client = standin.secret_client()
    assert client.get_secret("hf-token").value == HF_TOKEN
    kv = standin.requests("GET", r"^/secrets/hf-token")
    assert kv[-2]["status"] == 401 and kv[-1]["status"] == 200  # challenge, then the token
    assert "authorization" not in kv[-1]["headers"]  # the log never keeps credentials


def test_faults_are_retried_and_job_created_once(ml, env, standin: StandIn, tmp_path: Path) -> None:
    from azure.ai.ml import command

    name = f"faulty-{int(time.time())}"
    standin.inject_fault(rf"/jobs/{name}$", 429, count=1, method="PUT")
    standin.inject_fault(rf"/jobs/{name}$", 503, count=1, method="PUT")
    standin.inject_fault(rf"/jobs/{name}$", "drop", count=1, method="GET")
    job = ml.jobs.create_or_update(
        command(
            name=name,
            code=str(_code(tmp_path / "src", "print('ok')\n")),
            command="python main.py",
            environment=env,
            compute="cpu-cluster",
        )  # fmt: skip
    )
    puts = standin.requests("PUT", rf"/jobs/{name}$")
    assert [p["fault"] for p in puts] == ["429", "503", None]
    assert [j.name for j in ml.jobs.list() if j.name == name] == [name]
    assert ml.jobs.get(name).name == name  # the dropped connection is retried too
    assert standin.wait_job(job.name) == "Completed"


def test_unknown_route_is_reported(standin: StandIn) -> None:
    import requests

    r = requests.get(f"{standin.base_url}/subscriptions/x/nothing-here", verify=standin.settings["ca_bundle"])
    assert r.status_code == 404 and "no such route" in r.json()["error"]["message"]
    assert standin.unknown_requests[-1]["path"] == "/subscriptions/x/nothing-here"
    standin.state.unknown_requests.clear()  # expected here; the fixture asserts none are left


def test_host_managed_identity_route(standin: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    """orch on the host can use DefaultAzureCredential with the exported MSI_ENDPOINT/MSI_SECRET."""
    from azure.identity import DefaultAzureCredential

    for k in ("MSI_ENDPOINT", "MSI_SECRET"):
        monkeypatch.setenv(k, standin.settings["env"][k])
    for k in ("AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID", "AZURE_FEDERATED_TOKEN_FILE"):
        monkeypatch.delenv(k, raising=False)
    excluded = ("cli", "powershell", "developer_cli", "visual_studio_code", "shared_token_cache",
                "interactive_browser")  # fmt: skip
    cred = DefaultAzureCredential(**{f"exclude_{k}_credential": True for k in excluded})
    assert standin.secret_client(cred).get_secret("hf-token").value == HF_TOKEN


def _cmd(tmp: Path, script: str, **kw: Any) -> Any:
    from azure.ai.ml import command

    kw.setdefault("compute", "cpu-cluster")
    return command(code=str(_code(tmp, script)), command="python main.py", **kw)


def test_missing_package_fails_the_job(ml, env, tmp_path: Path) -> None:
    """The job's environment has no torch: importing it fails the job exactly as on Azure ML."""
    job = ml.jobs.create_or_update(_cmd(tmp_path / "src", "import torch\n", environment=env))
    _wait_status(ml, job.name, "Failed")
    error = ml.jobs.get(job.name).properties
    details = ml.jobs._runs_operations.get_run_details(job.name)  # the run-history error the studio shows
    assert "ModuleNotFoundError: No module named" in str(details.error) and "torch" in str(details.error), error


def test_unknown_compute_environment_and_code_are_refused(ml, env, standin: StandIn, tmp_path: Path) -> None:
    from azure.core.exceptions import HttpResponseError

    with pytest.raises(HttpResponseError, match="Compute 'no-such-cluster' is not found"):
        ml.jobs.create_or_update(_cmd(tmp_path / "a", "print(1)\n", environment=env, compute="no-such-cluster"))
    with pytest.raises(HttpResponseError) as exc:
        ml.jobs.create_or_update(_cmd(tmp_path / "b", "print(1)\n", environment="azureml:no-such-env:7"))
    assert exc.value.status_code in (400, 404)
    assert ml.compute.get("cpu-cluster").size == "Standard_DS3_v2"
    assert {c.name for c in ml.compute.list()} >= {"cpu-cluster", "cpu-lowpri", "gpu-cluster"}
    assert not [j for j in standin.state.jobs.values() if "no-such" in str(j.body.get("computeId"))]


def test_job_put_is_immutable(ml, env, standin: StandIn, tmp_path: Path) -> None:
    """An identical re-PUT answers 200 (a retried submit is harmless); a changed definition is a 400."""
    import requests

    job = ml.jobs.create_or_update(_cmd(tmp_path / "src", "import time; time.sleep(1)\n", environment=env))
    put = [r for r in standin.requests("PUT", rf"/jobs/{job.name}$") if r["status"] == 201][-1]
    url = f"{standin.base_url}{put['path']}"
    token = standin.credential().get_token(f"{standin.aml_audience}.default").token
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    kw = {"params": put["query"], "headers": headers, "verify": standin.settings["ca_bundle"], "timeout": 30}
    same = requests.put(url, data=put["body"], **kw)
    assert same.status_code == 200, same.text
    import json

    changed = json.loads(put["body"])
    changed["properties"]["command"] = "python other.py"
    refused = requests.put(url, data=json.dumps(changed), **kw)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "JobPropertyImmutable"
    assert "'command'" in refused.json()["error"]["message"]
    assert standin.state.jobs[job.name].body["command"] == "python main.py"
    assert standin.wait_job(job.name) == "Completed"


def test_token_audience_is_checked_per_service(standin: StandIn) -> None:
    import requests

    cred = standin.credential()
    vault_token = cred.get_token(f"{standin.key_vault_resource}/.default").token
    ws = f"{standin.base_url}{standin.workspace_id}?api-version=2024-10-01-preview"
    r = requests.get(ws, headers={"Authorization": f"Bearer {vault_token}"}, verify=standin.settings["ca_bundle"])
    assert r.status_code == 401 and r.json()["error"]["code"] == "InvalidAuthenticationTokenAudience"
    mlflow_api = f"{standin.mlflow_uri}/api/2.0/mlflow/experiments/search"
    r = requests.post(mlflow_api, json={"max_results": 1}, verify=standin.settings["ca_bundle"])
    assert r.status_code == 401  # the workspace MLflow endpoint needs a token
    r = requests.post(mlflow_api, json={"max_results": 1}, headers={"Authorization": f"Bearer {vault_token}"},
                      verify=standin.settings["ca_bundle"])  # fmt: skip
    assert r.status_code == 401
    arm_token = cred.get_token(f"{standin.aml_audience}.default").token
    r = requests.post(mlflow_api, json={"max_results": 1}, headers={"Authorization": f"Bearer {arm_token}"},
                      verify=standin.settings["ca_bundle"])  # fmt: skip
    assert r.status_code == 200, r.text
    arm_on_vault = requests.get(f"{standin.key_vault_url}secrets/hf-token?api-version=7.5",
                                headers={"Authorization": f"Bearer {arm_token}"}, verify=standin.settings["ca_bundle"])
    assert arm_on_vault.status_code == 401


def test_not_responding_and_preempted_low_priority_job(ml, env, standin: StandIn, tmp_path: Path) -> None:
    """A node that stops answering shows NotResponding and recovers; a preempted low-priority job is queued again
    and runs from the start to Completed."""
    import requests

    script = "import time\nfor i in range(8):\n    print('tick', i, flush=True)\n    time.sleep(0.5)\n"
    job = ml.jobs.create_or_update(_cmd(tmp_path / "src", script, environment=env, compute="cpu-lowpri"))
    _wait_status(ml, job.name, "Running")
    admin = f"{standin.base_url}/_standin/jobs/{job.name}"
    ca = standin.settings["ca_bundle"]
    assert requests.post(f"{admin}/pause", verify=ca, timeout=30).status_code == 200
    _wait_status(ml, job.name, "NotResponding", timeout=30)
    assert requests.post(f"{admin}/resume", verify=ca, timeout=30).status_code == 200
    _wait_status(ml, job.name, "Running", timeout=30)
    assert requests.post(f"{admin}/preempt", verify=ca, timeout=30).status_code == 200
    seen = _wait_status(ml, job.name, "Completed", timeout=120)
    assert seen[:2] == ["Queued", "Running"] or "Queued" in seen, seen
    record = standin.state.jobs[job.name]
    assert record.attempts == 2
    log = Path(record.log_dir, "user_logs", "std_log.txt").read_text()
    assert "preempted; job requeued (attempt 2)" in log and log.count("tick 7") == 1
    dedicated = ml.jobs.create_or_update(_cmd(tmp_path / "d", "import time; time.sleep(2)\n", environment=env))
    _wait_status(ml, dedicated.name, "Running")
    assert requests.post(f"{standin.base_url}/_standin/jobs/{dedicated.name}/preempt", verify=ca).status_code == 409
    assert standin.wait_job(dedicated.name) == "Completed"


def test_distribution_starts_every_rank(ml, env, standin: StandIn, tmp_path: Path) -> None:
    """instance_count 2 x process_count_per_instance 2: four ranks in two node containers, a log file each."""
    from azure.ai.ml import PyTorchDistribution

    script = "import os\ne = os.environ\nprint('rank', e['RANK'], 'of', e['WORLD_SIZE'], 'node', e['NODE_RANK'])\n"
    job = ml.jobs.create_or_update(
        _cmd(tmp_path / "src", script, environment=env, instance_count=2,
             distribution=PyTorchDistribution(process_count_per_instance=2))
    )  # fmt: skip
    assert standin.wait_job(job.name) == "Completed"
    logs = Path(standin.state.jobs[job.name].log_dir, "user_logs")
    for rank in range(4):
        text = (logs / f"std_log_process_{rank}.txt").read_text()
        assert f"rank {rank} of 4 node {rank // 2}" in text


def test_lost_answer_to_a_committed_put_makes_one_job(ml, env, standin: StandIn, tmp_path: Path) -> None:
    """The service commits the PUT, the answer is lost: the SDK's retry re-PUTs the same body (200), one job."""
    name = f"lost-answer-{int(time.time())}"
    standin.inject_fault(rf"/jobs/{name}$", "commit-drop", count=1, method="PUT")
    job = ml.jobs.create_or_update(_cmd(tmp_path / "src", "print('once')\n", environment=env, name=name))
    puts = standin.requests("PUT", rf"/jobs/{name}$")
    assert puts[0]["fault"] == "commit-drop" and puts[-1]["status"] == 200, [(p["fault"], p["status"]) for p in puts]
    assert [j for j in standin.state.jobs if j == name] == [name] and job.name == name
    assert standin.wait_job(name) == "Completed"


def test_dockerfile_environment_is_built_from_its_context(ml, standin: StandIn, tmp_path: Path) -> None:
    """Environment(build=BuildContext): the uploaded context is docker-built, and the job runs in that image."""
    from azure.ai.ml.entities import BuildContext, Environment

    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(
        "FROM mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04\nCOPY marker.txt /opt/marker.txt\n"
        "RUN ln -s /usr/bin/python3 /usr/local/bin/python\n"
    )
    (ctx / "marker.txt").write_text(f"built from context {tmp_path.name}\n")
    env = ml.environments.create_or_update(Environment(name="orch-dockerfile-env", build=BuildContext(path=str(ctx))))
    job = ml.jobs.create_or_update(
        _cmd(tmp_path / "src", "print(open('/opt/marker.txt').read(), flush=True)\n", environment=env)
    )
    assert standin.wait_job(job.name) == "Completed", standin.state.jobs[job.name].error
    log = Path(standin.state.jobs[job.name].log_dir, "user_logs", "std_log.txt").read_text()
    assert f"built from context {tmp_path.name}" in log

    # A base image that is neither local nor an alias fails the build before anything tries a registry.
    (ctx / "Dockerfile").write_text("FROM ghcr.io/someone/private:1\n")
    bad = ml.environments.create_or_update(Environment(name="orch-unpullable-env", build=BuildContext(path=str(ctx))))
    job = ml.jobs.create_or_update(_cmd(tmp_path / "src2", "print(1)\n", environment=bad))
    assert standin.wait_job(job.name) == "Failed"
    assert "ghcr.io/someone/private:1 could not be pulled" in standin.state.jobs[job.name].error["message"]
