"""DockerSystem on a real Docker engine: image reuse, refusal before build, a real pass in a container as a
non-root uid, failures with their log tail, cancel, secret files, GPU device requests.

Needs dockerd running and the base image (`orch env base`, or the session fixture builds it: debootstrap, ~1 min).
One small environment (orch's runtime deps only) serves the mechanics tests; the real cpu-export environment
(torch + onnxruntime-genai, a few minutes to build the first time, then reused by tag) serves the real pass.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from orchestrator.core.job import Job, JobState, ModelArtifact
from orchestrator.systems.base import SystemFailure
from orchestrator.systems.docker.images import (
    DEFAULT_BASE_IMAGE,
    BuiltImage,
    build_base_image,
    build_environment,
    docker_client,
    list_environments,
)
from orchestrator.systems.docker.system import CONTAINER_JOB_FILE, LOG_FILE, DockerSystem
from orchestrator.systems.environments.spec import EnvSpecError

pytestmark = pytest.mark.docker

MINI = """name: orch-test-mini
channels: [conda-forge]
dependencies:
  - python=3.11
  - pip
  - pip:
      - pydantic==2.14.3
      - pyyaml==6.0.3
      - filelock==4.2.12
      - mlflow-skinny==3.17.2
      - rich==15.0.0
      - typer==0.29.2
"""


@pytest.fixture(scope="session")
def client():  # noqa: ANN201 - docker.DockerClient
    return docker_client()


@pytest.fixture(scope="session")
def base_image(client) -> str:  # noqa: ANN001
    build_base_image(DEFAULT_BASE_IMAGE)
    return DEFAULT_BASE_IMAGE


@pytest.fixture(scope="session")
def mini_env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("envs") / "mini.conda.yaml"
    path.write_text(MINI)
    return path


@pytest.fixture(scope="session")
def mini_image(base_image: str, mini_env_file: Path) -> BuiltImage:
    return build_environment(mini_env_file, base_image=base_image)


@pytest.fixture(scope="session")
def export_image(base_image: str) -> BuiltImage:
    """The real cpu-export environment (the default of {"type": "Docker"}): built once, reused by tag."""
    return build_environment("cpu-export", base_image=base_image, on_line=lambda line: None)


def _own(path: Path, uid: int) -> Path:
    for p in [path, *path.rglob("*")]:
        os.chown(p, uid, uid)
    return path


def _job(tmp_path: Path, job_id: str, *, pass_type: str = "ModelBuilder", model: Path | None = None, **kw) -> Job:  # noqa: ANN003
    return Job(
        job_id=job_id,
        pass_name="builder",
        pass_type=pass_type,
        pass_config=kw.pop("pass_config", {"precision": "int4"}),
        model=ModelArtifact(format="hf", path=str(model)) if model else None,
        output_dir=str(tmp_path / "out"),
        **kw,
    )


def _containers(client, job_id: str) -> list:  # noqa: ANN001
    return client.containers.list(all=True, filters={"label": f"org.orch.job_id={job_id}"})


def test_second_build_reuses_the_image_without_building(mini_image: BuiltImage, mini_env_file: Path) -> None:
    lines: list[str] = []
    again = build_environment(mini_env_file, on_line=lines.append)
    assert again.built is False and again.image_id == mini_image.image_id and again.tag == mini_image.tag
    assert lines == []  # no build log at all
    assert again.tag.startswith("orch/env:orch-test-mini-")
    assert any(row["tag"] == again.tag and row["installer"] in ("uv", "pip") for row in list_environments())


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("name: x\ndependencies: [python=3.11\n", "not valid YAML"),
        (MINI.replace("python=3.11", "python=3.10"), "python=3.10 but image orch/base:bookworm-py311 has python 3.11"),
        (MINI.replace("      - typer==0.29.2\n", ""), "lacks orch's runtime deps typer"),
        ("name: x\ndependencies:\n  - python=3.11\n  - pip:\n", "dependencies.pip must be a non-empty list"),
    ],
)
def test_bad_conda_yaml_is_refused_before_any_build(
    client,  # noqa: ANN001
    base_image: str,
    tmp_path: Path,
    text: str,
    needle: str,
) -> None:
    path = tmp_path / "bad.conda.yaml"
    path.write_text(text)
    before = {img.id for img in client.images.list(all=True)}
    lines: list[str] = []
    with pytest.raises(EnvSpecError) as err:
        build_environment(path, base_image=base_image, on_line=lines.append)
    assert str(path) in str(err.value) and needle in str(err.value) and "\n" not in str(err.value)
    assert lines == [] and {img.id for img in client.images.list(all=True)} == before


def test_failing_job_surfaces_log_tail_and_secret_is_a_file(
    client,  # noqa: ANN001
    mini_image: BuiltImage,
    mini_env_file: Path,
    tmp_path: Path,
    tiny_model: Path,
) -> None:
    """The mini env has no torch: ModelBuilder fails inside the container; its traceback reaches the caller."""
    token = tmp_path / "hf_token"
    token.write_text("hf_SECRETVALUE123\n")
    system = DockerSystem({"environment": str(mini_env_file)})
    job = _job(tmp_path, "fail-1", model=tiny_model, secrets={"hf_token": f"file:{token}"})
    handle = system.submit(job)
    try:
        attrs = client.api.inspect_container(handle.container_id)
        secret_mounts = [m for m in attrs["Mounts"] if m["Destination"] == "/run/secrets/hf_token"]
        assert secret_mounts and secret_mounts[0]["RW"] is False and secret_mounts[0]["Source"] == str(token)
        flat = json.dumps({"env": attrs["Config"]["Env"], "cmd": attrs["Config"]["Cmd"], "args": attrs["Args"]})
        assert "SECRETVALUE" not in flat and str(token) not in flat
        cjob = json.loads((tmp_path / "out" / CONTAINER_JOB_FILE).read_text())
        assert cjob["secrets"] == {"hf_token": "file:/run/secrets/hf_token"} and cjob["output_dir"] == "/orch/out"
        assert cjob["model"]["path"] == "/orch/in/model"
        assert {m["Destination"]: m["RW"] for m in attrs["Mounts"]}["/orch/in/model"] is False
        assert attrs["HostConfig"]["NetworkMode"] == "none"
    finally:
        state = handle.wait(timeout=120)
    assert state == JobState.FAILED
    with pytest.raises(SystemFailure) as err:
        handle.result()
    assert "ModuleNotFoundError" in err.value.log_tail and "onnxruntime_genai" in err.value.log_tail
    assert len(err.value.log_tail.splitlines()) <= 30
    assert "fail-1" in str(err.value) and "\n" not in str(err.value)
    assert _containers(client, "fail-1") == []  # removed once the log was saved
    assert "ModuleNotFoundError" in (tmp_path / "out" / LOG_FILE).read_text()


def test_real_pass_runs_in_container_as_caller_uid(
    client,  # noqa: ANN001
    export_image: BuiltImage,
    tmp_path: Path,
    tiny_model: Path,
) -> None:
    """ModelBuilder int4 on the tiny Phi-3 in the default environment, as uid 1234: outputs belong to 1234."""
    uid = 1234
    model = _own(Path(shutil.copytree(tiny_model, tmp_path / "model")), uid)  # the caller's own files
    system = DockerSystem(user=f"{uid}:{uid}")
    job = _job(tmp_path, "mb-1", model=model)
    started = time.monotonic()
    handle = system.submit(job)
    lines = list(handle.logs(follow=True))
    assert handle.wait(timeout=300) == JobState.COMPLETED, "\n".join(lines[-30:])
    result = handle.result()
    elapsed = time.monotonic() - started
    out = tmp_path / "out"
    assert result.model is not None and result.model.format == "onnx_genai"
    model_dir = out / result.model.path
    assert (model_dir / "genai_config.json").exists() and (model_dir / "model.onnx").exists()
    for p in [out / "result.json", model_dir / "model.onnx", model_dir]:
        assert p.stat().st_uid == uid, p
    assert lines and (out / LOG_FILE).read_bytes().decode().split("\n")[: len(lines)] == lines
    assert result.versions.get("onnxruntime-genai") == "0.18.0"
    assert _containers(client, "mb-1") == []
    print(f"docker ModelBuilder job: {elapsed:.1f}s")


def test_cancel_stops_and_removes_the_container(
    client,  # noqa: ANN001
    export_image: BuiltImage,
    tmp_path: Path,
    tiny_model: Path,
) -> None:
    system = DockerSystem()
    handle = system.submit(_job(tmp_path, "cancel-1", model=tiny_model))
    deadline = time.monotonic() + 30
    while handle.status() != JobState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    assert handle.cancel() is True
    assert handle.status() == JobState.CANCELED
    assert _containers(client, "cancel-1") == []
    assert handle.cancel() is False  # idempotent
    attached = system.attach(str(tmp_path / "out"))
    assert attached.status() == JobState.CANCELED and attached.wait(timeout=1) == JobState.CANCELED


def test_attach_by_job_id_from_another_handle(mini_image: BuiltImage, mini_env_file: Path, tmp_path: Path) -> None:
    system = DockerSystem(
        {"aml_docker_config": {"base_image": DEFAULT_BASE_IMAGE, "conda_file_path": str(mini_env_file)}}
    )
    handle = system.submit(_job(tmp_path, "attach-1", pass_type="NoSuchPass"))
    other = DockerSystem({"environment": str(mini_env_file)}).attach("attach-1")
    assert other.out_dir == (tmp_path / "out").resolve()
    assert other.wait(timeout=120) == JobState.FAILED
    assert "unknown pass type 'NoSuchPass'" in (tmp_path / "out" / LOG_FILE).read_text()
    assert handle.status() == JobState.FAILED


def test_gpu_accelerator_requests_devices(client, mini_image: BuiltImage, mini_env_file: Path, tmp_path: Path) -> None:  # noqa: ANN001
    """accelerators: [gpu] become a device request; this engine has no GPU runtime, so docker refuses the start."""
    system = DockerSystem({"accelerators": ["gpu"], "environment": str(mini_env_file)})
    has_gpu_runtime = "nvidia" in json.dumps(client.info().get("Runtimes", {}))
    if has_gpu_runtime:
        handle = system.submit(_job(tmp_path, "gpu-1", pass_type="NoSuchPass"))
        handle.wait(timeout=120)
        return
    with pytest.raises(SystemFailure, match="could not start job gpu-1"):
        system.submit(_job(tmp_path, "gpu-1", pass_type="NoSuchPass"))
    assert _containers(client, "gpu-1") == []
