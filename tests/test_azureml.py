"""AzureMLSystem and `orch submit|status|logs|cancel|download` end to end: the real, unpatched azure-ai-ml SDK
against the local Azure stand-in (TLS control plane, run history, Key Vault, Azurite, a real MLflow server), which
runs the submitted command jobs for real."""

from __future__ import annotations

import json
import os
import re
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.azure

REPO = Path(__file__).resolve().parents[1]
HF_TOKEN = "hf_orch_test_TOKEN_8f3c2a91"
REGISTRY = "orch-registry"


@pytest.fixture(scope="module")
def aml(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tone_data: Path) -> Iterator[dict[str, Any]]:
    """One stand-in for the module, with the tiny model in a registry, the tone data in the default datastore,
    the HF token in Key Vault, and this process's workspace settings pointing at it (env, not a profile)."""
    from tests.azure_standin import start_standin

    tmp = tmp_path_factory.mktemp("aml")
    saved = dict(os.environ)
    # orch polls a followed job every 0.2 s (ORCH_AZURE_POLL_S, a user setting; 2 s by default): a job's end is seen
    # at once. The stand-in keeps its 0.5 s per state: test_lost_answer_... needs its job unfinished when it cancels.
    with start_standin(tmp / "standin") as s:
        os.environ.update(s.settings["env"])
        os.environ["MLFLOW_TRACKING_TOKEN"] = s.mlflow_token()  # the workspace MLflow endpoint needs a token
        os.environ["ORCH_AZURE_CLOUD"] = s.cloud_name
        os.environ["ORCH_AZURE_CLOUD_METADATA"] = json.dumps(s.cloud_metadata())
        os.environ["ORCH_PROFILE"] = str(tmp / "profile.json")
        os.environ["ORCH_CACHE_DIR"] = str(tmp / "client-cache")
        os.environ["ORCH_AZURE_POLL_S"] = "0.2"
        model_uri = s.seed_registry_model(REGISTRY, "tiny-phi3", "1", tiny_model)
        data_uri = s.seed_datastore_files(tone_data, "datasets/tone/tone.jsonl")
        s.set_secret("hf-token", HF_TOKEN)
        try:
            yield {"s": s, "model_uri": model_uri, "data_uri": data_uri, "tmp": tmp}
        finally:
            os.environ.clear()
            os.environ.update(saved)


def _workflow(
    tmp: Path, aml: dict[str, Any], *, max_steps: int = 6, passes: list[str] | None = None, **lora: Any
) -> Path:
    wf = json.loads((REPO / "jobs" / "tone-classification" / "config.json").read_text())
    wf["input_model"]["config"]["model_path"] = aml["model_uri"]
    wf["data_configs"][0]["load_dataset_config"]["params"]["data_files"] = aml["data_uri"]
    wf["passes"]["lora"]["config"]["training_args"].update(max_steps=max_steps, logging_steps=2, eval_steps=3)
    wf["passes"]["lora"]["config"].update(lora)
    if passes is not None:
        wf["passes"] = {k: v for k, v in wf["passes"].items() if k in passes}
    # The CPU compute and the whole-workflow CPU environment: the stand-in builds it into an image (no CUDA here)
    aml = wf["systems"]["aml"]["config"]
    aml.update(aml_compute="cpu-cluster", accelerators=["cpu"])
    aml["aml_docker_config"]["conda_file_path"] = str(REPO / "environments" / "aml-cpu.conda.yaml")
    wf["engine"].pop("evaluator", None)
    wf["engine"].update(host="aml", target="aml", cache_dir=str(tmp / "cache"), output_dir=str(tmp / "out"))
    path = tmp / "config.json"
    path.write_text(json.dumps(wf, indent=2))
    return path


def _orch(*args: str) -> Any:
    from orchestrator.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def _submit(config: Path) -> str:
    res = _orch("submit", "--config", str(config), "--host", "aml", "--target", "aml")
    assert res.exit_code == 0, res.output
    name = res.stdout.strip().splitlines()[0]
    assert name.startswith("orch-tone-classification-"), res.output
    assert "studio:" in res.output
    return name


def test_submit_logs_status_download(aml: dict[str, Any], tmp_path: Path) -> None:
    """Registry model + datastore data -> one driver job -> Completed; logs -f follows to the end; metrics in
    MLflow; the int4 ONNX model downloads and generates; the HF token only ever crossed the Key Vault route."""
    s = aml["s"]
    started = time.monotonic()
    name = _submit(_workflow(tmp_path, aml))
    body = s.state.jobs[name].body
    assert body["inputs"]["model"]["uri"] == aml["model_uri"]  # passed through, not re-uploaded
    assert body["inputs"]["model"]["jobInputType"] == "custom_model"
    assert body["inputs"]["data_0_data_files"]["uri"] == aml["data_uri"]

    res = _orch("logs", name, "-f")
    assert res.exit_code == 0, res.output
    assert "orch: << builder Completed" in res.output
    assert "hf_token read from Key Vault" in res.output
    assert s.state.jobs[name].status == "Completed"

    res = _orch("status", name)
    assert res.exit_code == 0, res.output
    assert f"{name}: Completed" in res.output
    assert "lora/train_loss" in res.output
    doc = json.loads(_orch("status", name, "--json").stdout)  # the same, for scripts
    assert doc["job"] == name and doc["status"] == "Completed" and doc["metrics"]["lora/train_loss"] > 0

    import mlflow

    client = mlflow.MlflowClient(s.mlflow_uri)
    run = client.get_run(s.state.jobs[name].mlflow_run_id)
    assert "lora/train_loss" in run.data.metrics
    assert "builder/model_size_bytes" in run.data.metrics

    dest = tmp_path / "downloaded"
    res = _orch("download", name, "-o", str(dest), "--register-model", "tone-int4")
    assert res.exit_code == 0, res.output
    assert (dest / "model" / "genai_config.json").exists()
    assert json.loads((dest / "manifest.json").read_text())["final_model"]["format"] == "onnx_genai"
    assert "registered azureml:tone-int4:1" in res.output
    from orchestrator.passes.common.onnx_tools import generate

    text, n_tokens, _ = generate(dest / "model", "### Text: what a lovely day\n### The tone is:\n", 4, chat=False)
    assert n_tokens > 0 and isinstance(text, str)

    kv = [r for r in s.request_log if re.search(r"/secrets/hf-token", r["path"]) and r["status"] == 200]
    assert kv, "the job never read the token from Key Vault"
    others = [r for r in s.request_log if r not in kv and HF_TOKEN in json.dumps(r)]
    assert others == [], [o["path"] for o in others]
    assert HF_TOKEN not in Path(s.state.jobs[name].log_path).read_text()
    assert all(HF_TOKEN not in v for v in run.data.params.values())
    # Nothing orch wrote on this machine (client cache, log offsets, outputs, profile) holds the token or a SAS
    # signature, and nothing it printed does.
    leaks = []
    for root in (aml["tmp"] / "client-cache", tmp_path):
        files = (p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and p.stat().st_size < 2e6)
        for f in (p for p in files if "aml-code" not in p.parts):  # aml-code: orch's own source, uploaded as is
            data = f.read_bytes()
            if HF_TOKEN.encode() in data or b"sig=" in data and b"sig=REDACTED" not in data:
                leaks.append(str(f))
    assert leaks == []
    for out in (res.output, _orch("logs", name).output, _orch("status", name).output):
        assert "sig=" not in out.replace("sig=REDACTED", "") and HF_TOKEN not in out
    print(f"submit -> completed -> downloaded in {time.monotonic() - started:.1f}s")


def test_failing_job_error_reaches_user(aml: dict[str, Any], tmp_path: Path) -> None:
    name = _submit(_workflow(tmp_path, aml, passes=["lora"], target_modules=["no_such_proj"]))
    res = _orch("logs", name, "-f")
    assert res.exit_code == 1, res.output
    assert f"job {name} failed" in res.output
    assert "no_such_proj" in res.output
    res = _orch("status", name)
    assert res.exit_code == 1 and "Failed" in res.output and "error:" in res.output


def test_cancel(aml: dict[str, Any], tmp_path: Path) -> None:
    s = aml["s"]
    name = _submit(_workflow(tmp_path, aml, max_steps=100000, passes=["lora"]))
    deadline = time.monotonic() + 120
    while s.state.jobs[name].status != "Running" and time.monotonic() < deadline:
        time.sleep(0.5)
    res = _orch("cancel", name)
    assert res.exit_code == 0 and "canceled" in res.output, res.output
    assert s.wait_job(name, 60) == "Canceled"
    assert "already Canceled" in _orch("cancel", name).output  # idempotent


def test_retried_submit_creates_one_job(aml: dict[str, Any], tmp_path: Path) -> None:
    """PUT jobs answered by 503s beyond azure-core's own retries and a dropped connection: one job."""
    s = aml["s"]
    s.inject_fault(r"/jobs/orch-tone-classification-", "drop", count=1, method="PUT")
    s.inject_fault(r"/jobs/orch-tone-classification-", 503, count=7, method="PUT")
    before = set(s.state.jobs)
    name = _submit(_workflow(tmp_path, aml, passes=["builder"]))
    s.clear_faults()
    new = [n for n in set(s.state.jobs) - before]
    assert new == [name]
    puts = [r for r in s.request_log if r["method"] == "PUT" and r["path"].endswith(f"/jobs/{name}")]
    assert len(puts) >= 9 and sum(r["status"] in (200, 201) for r in puts) == 1
    _orch("cancel", name)


def test_lost_answer_and_resubmit_attach_to_one_job(aml: dict[str, Any], tmp_path: Path) -> None:
    """The PUT is committed but its answer is lost: one job. The same workflow submitted again while that job is
    live attaches to it; --force submits a second one; an unknown compute is refused before any upload."""
    s = aml["s"]
    config = _workflow(tmp_path, aml, passes=["builder"])
    s.inject_fault(r"/jobs/orch-tone-classification-", "commit-drop", count=1, method="PUT")
    before = set(s.state.jobs)
    name = _submit(config)
    s.clear_faults()
    assert sorted(set(s.state.jobs) - before) == [name]
    puts = [r for r in s.request_log if r["method"] == "PUT" and r["path"].endswith(f"/jobs/{name}")]
    assert puts[0]["fault"] == "commit-drop" and {r["status"] for r in puts[1:]} <= {200}

    again = _orch("submit", "--config", str(config), "--host", "aml", "--target", "aml")
    assert again.exit_code == 0, again.output
    assert again.stdout.strip().splitlines()[0] == name and "attached to live job" in again.output
    assert sorted(set(s.state.jobs) - before) == [name]
    forced = _orch("submit", "--config", str(config), "--host", "aml", "--target", "aml", "--force")
    assert forced.exit_code == 0, forced.output
    second = forced.stdout.strip().splitlines()[0]
    base = re.sub(r"-\d+$", "", name) if not re.search(r"-[0-9a-f]{10}$", name) else name
    assert second != name and re.fullmatch(re.escape(base) + r"-\d+", second), (name, second)
    assert sorted(set(s.state.jobs) - before) == sorted([name, second])
    for n in (name, second):
        _orch("cancel", n)

    wf = json.loads(config.read_text())
    wf["systems"]["aml"]["config"]["aml_compute"] = "no-such-cluster"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(wf))
    uploads = len(s.requests("POST", r"/startPendingUpload$"))
    res = _orch("submit", "--config", str(bad), "--host", "aml", "--target", "aml")
    assert res.exit_code != 0 and "aml_compute 'no-such-cluster' does not exist" in res.output
    assert "cpu-cluster" in res.output and "Traceback" not in res.output
    assert len(s.requests("POST", r"/startPendingUpload$")) == uploads
    assert sorted(set(s.state.jobs) - before) == sorted([name, second])


def test_run_host_aml_chains_by_reference(aml: dict[str, Any], tmp_path: Path) -> None:
    """`orch run --host aml`: one command job per pass; the next pass takes the previous output by azureml://
    reference; only the final model is downloaded."""
    s = aml["s"]
    before = set(s.state.jobs)
    config = _workflow(tmp_path, aml, max_steps=5)  # a LoRA no other test here trains (the workspace cache)
    res = _orch("run", "--config", str(config), "--host", "aml", "--target", "aml", "--no-tracking")
    assert res.exit_code == 0, res.output
    jobs = [s.state.jobs[n] for n in sorted(set(s.state.jobs) - before, key=lambda n: s.state.jobs[n].created)]
    assert [j.body["tags"]["orch.pass"] for j in jobs] == ["lora", "merge_adapter_weights", "builder"]
    merge, builder = jobs[1], jobs[2]
    # each output goes straight into its key's entry of the workspace cache, and the next pass reads it there
    entry = r"azureml://datastores/workspaceblobstore/paths/orch-cache/entries/[0-9a-f]{32}/objects/"
    assert merge.body["inputs"]["model"]["uri"] == aml["model_uri"]
    assert re.match(entry + re.escape(jobs[0].name) + "/", merge.body["inputs"]["adapter"]["uri"])
    assert re.match(entry + re.escape(merge.name) + "/", builder.body["inputs"]["model"]["uri"])
    assert (tmp_path / "out" / "model" / "genai_config.json").exists()
    assert re.search(r"^cost: \$\d+\.\d+ \(lora \$", res.output, re.M), res.output  # the run's summary prices it
    assert s.unknown_requests == []
    # a second client folder runs nothing: every pass is committed in the workspace cache
    (tmp_path / "other").mkdir()
    again = _orch("run", "--config", str(_workflow(tmp_path / "other", aml, max_steps=5)), "--host", "aml",
                  "--target", "aml", "--no-tracking")  # fmt: skip
    assert again.exit_code == 0, again.output
    assert len(s.state.jobs) == len(before) + 3
    assert (tmp_path / "other" / "out" / "model" / "genai_config.json").exists()


def test_download_once_and_refuses_escaping_entries(aml: dict[str, Any], tmp_path: Path) -> None:
    from orchestrator.core.cache import Cache
    from orchestrator.systems.azureml.download import DownloadError, download_reference, origin_of, safe_extract

    s = aml["s"]
    cache = Cache(tmp_path / "cache")
    folder = aml["data_uri"].rsplit("/", 1)[0] + "/"
    path, ident = download_reference(folder, cache=cache, field="data")
    assert (Path(path) / "tone.jsonl").exists() and origin_of(Path(path) / "tone.jsonl") == folder + "tone.jsonl"
    n = len(s.request_log)
    assert download_reference(folder, cache=cache, field="data") == (path, ident)
    assert len(s.request_log) == n  # the second time, nothing crossed the network

    mpath, mident = download_reference(aml["model_uri"], cache=cache, field="input_model")
    assert (Path(mpath) / "config.json").exists() and mident == aml["model_uri"]

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr("../escape.txt", "no")
    with pytest.raises(DownloadError, match="outside"):
        safe_extract(evil, tmp_path / "x")
    assert not (tmp_path / "escape.txt").exists()


def test_config_set_and_show(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.systems.azureml.workspace import resolve_settings

    monkeypatch.setenv("ORCH_PROFILE", str(tmp_path / "profile.json"))
    for k in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZUREML_WORKSPACE_NAME"):
        monkeypatch.delenv(k, raising=False)
    assert _orch("config", "set", "subscription_id", "sub-1").exit_code == 0
    assert _orch("config", "set", "resource_group", "rg-1").exit_code == 0
    assert _orch("config", "set", "workspace_name", "ws-1").exit_code == 0
    assert resolve_settings().workspace_name == "ws-1"
    monkeypatch.setenv("AZUREML_WORKSPACE_NAME", "ws-env")
    assert resolve_settings().workspace_name == "ws-env"  # env beats profile
    assert resolve_settings({"workspace_name": "ws-cfg"}).workspace_name == "ws-cfg"  # config beats env
    res = _orch("config", "show")
    assert "ws-env" in res.output and "AZUREML_WORKSPACE_NAME" in res.output
    assert _orch("config", "set", "nonsense", "x").exit_code == 2
