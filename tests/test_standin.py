"""The local Azure stand-in, driven by the real, unpatched azure-ai-ml / azure-identity / azure-keyvault-secrets
SDKs and a real MLflow server. Needs Azurite: `bash infra/install-azurite.sh` (npm, pinned)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `tests` is a namespace package: importable from the repo root
    sys.path.insert(0, str(REPO))

from tests.azure_standin import StandIn, start_standin  # noqa: E402

pytestmark = pytest.mark.azure

HF_TOKEN = "hf_standin_test_token_4f8a2c"  # a fake value; the test checks where it travels
REGISTRY = "orch-registry"

JOB_SCRIPT = """
import hashlib, os, pathlib, sys

run_id = os.environ["MLFLOW_RUN_ID"]  # mlflow.start_run() consumes it from the environment
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
            name="orch-standin-env",
            image="mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest",
            conda_file={"name": "orch", "dependencies": ["python=3.11", {"pip": ["mlflow==3.17.2"]}]},
        )
    )


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
    assert "condaFile" in put["body"] and "python=3.11" in put["body"]


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
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=standin.mlflow_uri)
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


def test_cancel_kills_the_process_group(ml, env, standin: StandIn, tmp_path: Path) -> None:
    from azure.ai.ml import command

    script = (
        "import subprocess, time\nsubprocess.Popen(['sleep', '300'])\nprint('started', flush=True)\ntime.sleep(300)\n"
    )
    job = ml.jobs.create_or_update(
        command(
            code=str(_code(tmp_path / "src", script)), command="python main.py", environment=env, compute="cpu-cluster"
        )  # fmt: skip
    )
    deadline = time.monotonic() + 30
    while ml.jobs.get(job.name).status != "Running" and time.monotonic() < deadline:
        time.sleep(0.3)
    pid = standin.state.jobs[job.name].pid
    assert pid is not None
    ml.jobs.begin_cancel(job.name).result()
    assert standin.wait_job(job.name, 30) == "Canceled"
    assert ml.jobs.get(job.name).status == "Canceled"
    deadline = time.monotonic() + 10
    while _live_group_members(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _live_group_members(pid) == []  # the whole group (python and its `sleep` child) is gone


def _live_group_members(pgid: int) -> list[int]:
    """Processes of a process group that are not zombies (an orphaned zombie waits for init to reap it)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


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
