"""DockerSystem: the runner in a container of an environment image, through the docker SDK.

orch's words on this system: a Job is a container of the image built from the system's conda.yaml on its base
image (`docker_images.build_environment`, reused by content tag). The container runs the same entry point,
`python -m orchestrator.runner --job /orch/out/job.docker.json`, with orch's source mounted read-only at
/orch/src (PYTHONPATH: never installed, so the image survives orch edits), inputs (model, adapter, data files)
read-only under /orch/in, secrets as read-only files under /run/secrets/<name>, output_dir read-write at
/orch/out and the job's checkpoint_dir (when it has one) read-write at /orch/checkpoints. It runs as the
caller's uid:gid so outputs belong to the caller. Its run record in output_dir mirrors LocalSystem's: job.json
(host paths), job.log, plus job.docker.json (container paths) and docker.json (container id, mounts, final
state). Cancel stops and removes the container.

Config mirrors Azure ML's `aml_docker_config` ({"base_image", "conda_file_path"} or {"dockerfile",
"build_context_path"}), so a workflow moves between Docker and Azure ML by changing only the system type.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orchestrator
from orchestrator.core.fs import atomic_write_text
from orchestrator.core.gpu import wants_gpu
from orchestrator.core.hub import cache_mount
from orchestrator.core.job import JOB_FILE, Job, JobResult, JobState
from orchestrator.core.launch import resolve_processes, runner_command
from orchestrator.schema.systems import DockerSystemConfig, ImageConfig
from orchestrator.systems.base import JobHandle, System, SystemFailure
from orchestrator.systems.docker.images import (
    DEFAULT_BASE_IMAGE,
    LABEL_PREFIX,
    build_environment,
    docker_client,
)
from orchestrator.systems.environments.package_indexes import PipSettings
from orchestrator.systems.environments.spec import EnvSpecError, load_env_spec, resolve_env_file

LOG_FILE = "job.log"
CONTAINER_JOB_FILE = "job.docker.json"
RECORD_FILE = "docker.json"
DEFAULT_ENVIRONMENT = "cpu-export"
SRC_MOUNT = "/orch/src"
OUT_MOUNT = "/orch/out"
CHECKPOINT_MOUNT = "/orch/checkpoints"  # Job.checkpoint_dir, read-write: it outlives the container (resume)
IN_MOUNT = "/orch/in"
SECRETS_MOUNT = "/run/secrets"
ORCH_SOURCE_ROOT = Path(orchestrator.__file__).resolve().parents[1]


def _label(key: str) -> str:
    return f"{LABEL_PREFIX}{key}"


class DockerJobHandle(JobHandle):
    """A job's container. State lives in Docker (labels) and in output_dir/docker.json, so any process can attach."""

    def __init__(self, job_id: str, out_dir: Path, container_id: str | None = None, client: Any = None) -> None:
        self.job_id = job_id
        self.out_dir = Path(out_dir)
        self._client = client
        record = self._record()
        self.container_id = container_id or record.get("container_id")

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = docker_client()
        return self._client

    def _record(self) -> dict[str, Any]:
        try:
            return json.loads((self.out_dir / RECORD_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _write_record(self, **updates: Any) -> None:
        rec = self._record()
        rec.update(updates)
        atomic_write_text(self.out_dir / RECORD_FILE, json.dumps(rec, indent=2))

    def _container(self) -> Any:
        import docker

        if not self.container_id:
            return None
        try:
            return self.client.containers.get(self.container_id)
        except docker.errors.NotFound:
            return None

    def status(self) -> JobState:
        rec = self._record()
        if rec.get("state") and JobState(rec["state"]).is_terminal():
            return JobState(rec["state"])
        container = self._container()
        if container is None:
            return self._state_from_result()
        if container.status == "created":
            return JobState.QUEUED
        if container.status in ("running", "restarting", "paused"):
            return JobState.RUNNING
        return self._finalize(container)

    def _state_from_result(self) -> JobState:
        try:
            return JobResult.read(self.out_dir).status
        except (FileNotFoundError, ValueError):
            return JobState.FAILED

    def _finalize(self, container: Any, state: JobState | None = None) -> JobState:
        """Exited: save the log into the run record, map result paths back to the host, remove the container."""
        container.reload()
        exit_code = container.attrs["State"].get("ExitCode")
        log = container.logs(stdout=True, stderr=True).decode(errors="replace")
        atomic_write_text(self.out_dir / LOG_FILE, log)
        if state is None:
            state = JobState.COMPLETED if exit_code == 0 else JobState.FAILED
            if state == JobState.COMPLETED and self._state_from_result() != JobState.COMPLETED:
                state = JobState.FAILED
        self._map_result_paths()
        self._write_record(state=state.value, exit_code=exit_code, finished=time.time())
        with contextlib.suppress(Exception):  # already removed by a concurrent finalize
            container.remove(force=True)
        return state

    def _map_result_paths(self) -> None:
        """A pass-through input comes back as /orch/in/...: give the host path instead."""
        mounts: dict[str, str] = self._record().get("path_map", {})
        try:
            result = JobResult.read(self.out_dir)
        except (FileNotFoundError, ValueError):
            return
        if result.model is None:
            return

        def host(p: str | None) -> str | None:
            if p is None:
                return None
            for cpath, hpath in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
                if p == cpath or p.startswith(cpath + "/"):
                    return hpath + p[len(cpath) :]
            return p

        model = result.model.model_copy(
            update={"path": host(result.model.path), "adapter_path": host(result.model.adapter_path)}
        )
        if model != result.model:
            result.model = model
            result.write(self.out_dir)

    def wait(self, timeout: float | None = None) -> JobState:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.status()
            if state.is_terminal():
                return state
            container = self._container()
            if container is not None:
                step = 2.0 if deadline is None else max(0.05, min(2.0, deadline - time.monotonic()))
                with contextlib.suppress(Exception):  # the SDK raises a timeout while it still runs
                    container.wait(timeout=step)
            if deadline is not None and time.monotonic() >= deadline:
                return self.status()

    def logs(self, follow: bool = False) -> Iterator[str]:
        container = self._container()
        if container is None:
            path = self.out_dir / LOG_FILE
            if path.exists():
                yield from path.read_text(errors="replace").splitlines()
            return
        buf = b""
        for chunk in container.logs(stdout=True, stderr=True, stream=True, follow=follow):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                yield line.decode(errors="replace")
        if buf:
            yield buf.decode(errors="replace")
        if follow:
            container = self._container()
            if container is not None:
                container.reload()
                if container.status in ("running", "created", "restarting"):
                    raise SystemFailure(f"log stream of docker job {self.job_id} ended while it still runs")

    def cancel(self) -> bool:
        container = self._container()
        if container is None:
            return False
        container.reload()
        was_running = container.status in ("running", "created", "restarting", "paused")
        if was_running:
            container.stop(timeout=5)
        self._finalize(container, JobState.CANCELED if was_running else None)
        return was_running

    def outputs(self, dest: Path | None = None) -> Path:
        return self.out_dir

    def log_tail(self, n: int = 30) -> str:
        container = self._container()
        if container is not None:
            return container.logs(stdout=True, stderr=True, tail=n).decode(errors="replace").rstrip("\n")
        path = self.out_dir / LOG_FILE
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    def failure(self) -> SystemFailure | None:
        """The job's failure as a SystemFailure carrying the last 30 log lines; None if it completed."""
        state = self.status()
        if state == JobState.COMPLETED:
            return None
        rec = self._record()
        try:
            error = JobResult.read(self.out_dir).error
        except (FileNotFoundError, ValueError):
            error = None
        why = error or f"container exited with code {rec.get('exit_code')}"
        return SystemFailure(f"docker job {self.job_id} {state.value.lower()}: {why}", log_tail=self.log_tail())

    def result(self, dest: Path | None = None) -> JobResult:
        """Wait, then the JobResult; a failed/canceled job raises SystemFailure with its log tail."""
        self.wait()
        failure = self.failure()
        if failure is not None:
            raise failure
        return JobResult.read(self.out_dir)


class DockerSystem(System):
    kind = "docker"

    def __init__(
        self,
        config: DockerSystemConfig | dict[str, Any] | None = None,
        *,
        config_dir: Path | str | None = None,
        environment_for: Callable[[Job], str | None] | None = None,
        user: str | None = None,
        pip_settings: PipSettings | None = None,
        on_build_line: Callable[[str], None] | None = None,
    ) -> None:
        """environment_for(job) names an env family/file for jobs when the config names none (the engine maps
        a pass's Requirements.environment); `user` defaults to the caller's uid:gid."""
        self.config_dir = Path(config_dir or Path.cwd())
        self.config = (
            config
            if isinstance(config, DockerSystemConfig)
            else DockerSystemConfig.model_validate(config or {}, context={"base_dir": self.config_dir})
        )
        self.environment_for = environment_for
        self.user = user or f"{os.getuid()}:{os.getgid()}"
        self.pip_settings = pip_settings
        self.on_build_line = on_build_line
        self._images: dict[str, str] = {}
        self._needs: dict[str, tuple[str, ...]] = {}  # pass type -> libraries it imports (a user's conda file)
        self._client: Any = None

    @classmethod
    def from_config(cls, config: dict[str, Any], **context: Any) -> DockerSystem:
        """From the workflow's json form: accelerators arrive as [{device, execution_providers}]."""
        known = (set(DockerSystemConfig.model_fields) - {"type"}) | {"aml_docker_config", "local_docker_config"}
        cfg = {k: v for k, v in config.items() if k in known and v is not None}  # Azure ML-only fields dropped
        if not cfg.get("accelerators"):
            cfg.pop("accelerators", None)
        return cls(cfg, config_dir=context.get("base_dir"), environment_for=context.get("environment_for"))

    @property
    def accelerators(self) -> list[str]:
        return self.config.devices

    def _env_file(self, environment: str | None) -> tuple[str, Path]:
        """(base image, conda.yaml) this system runs a job of the given environment family with."""
        dc = self.config.docker_config
        base = (dc.base_image if dc else None) or DEFAULT_BASE_IMAGE
        if dc is not None and dc.conda_file_path:
            return base, self._path(str(dc.conda_file_path))
        env = self.config.environment or environment or DEFAULT_ENVIRONMENT
        return base, self._path(str(env)) if str(env).endswith((".yaml", ".yml")) else resolve_env_file(env)

    def _spec(self, environment: str | None) -> tuple[str, Any]:
        """(base image, job environment): the conda file plus orch's runtime layer (RUNTIME_LAYER of
        environments/runtime_layer: what the runner imports, added where the file lacks it). A user's own conda file
        (docker_config) must also hold what the workflow's passes import (`require`); orch's environment families
        do by design."""
        from orchestrator.systems.environments.runtime_layer import RUNTIME_LAYER, compose_runtime

        base, env_file = self._env_file(environment)
        dc = self.config.docker_config
        own = dc is not None and dc.conda_file_path is not None
        spec = compose_runtime(load_env_spec(env_file), RUNTIME_LAYER, needs=self._needs if own else None,
                               what="docker_config.conda_file_path" if own else "")  # fmt: skip
        return base, spec

    def require(self, pass_type: str, libraries: tuple[str, ...]) -> None:
        dc = self.config.docker_config
        if dc is None or dc.conda_file_path is None or not libraries:
            return
        self._needs[pass_type] = tuple(libraries)
        self._spec(None)

    def environment_fingerprint(self, libraries: tuple[str, ...], environment: str | None = None) -> dict[str, str]:
        """The image's content: base image + the normalized conda spec (its pins are the library versions)."""
        dc = self.config.docker_config
        if dc is not None and dc.dockerfile:
            return {"dockerfile": str(self._path(dc.build_context_path or ".")), "docker_file": dc.dockerfile}
        try:
            base, spec = self._spec(environment)
        except EnvSpecError as exc:
            raise SystemFailure(str(exc)) from exc
        return {"base_image": base, "env_spec": spec.hash()}

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = docker_client()
        return self._client

    def _path(self, p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else (self.config_dir / path)

    def image_for(self, job: Job) -> str:
        """The environment image tag for a job: built once, then reused by content tag."""
        dc = self.config.docker_config
        if dc is not None and dc.dockerfile:
            return self._dockerfile_image(dc)
        try:
            base, env = self._spec(self.environment_for(job) if self.environment_for else None)
        except EnvSpecError as exc:
            raise SystemFailure(str(exc)) from exc
        key = f"{base}|{env.hash()}"
        if key not in self._images:
            try:
                built = build_environment(
                    env, base_image=base, on_line=self.on_build_line, pip_settings=self.pip_settings
                )
            except EnvSpecError as exc:
                raise SystemFailure(str(exc)) from exc
            self._images[key] = built.tag
        return self._images[key]

    def _dockerfile_image(self, dc: ImageConfig) -> str:
        """A user Dockerfile (Azure ML's dockerfile + build_context_path): tag = hash of the context's files."""
        ctx = self._path(str(dc.build_context_path or "."))
        dockerfile = dc.dockerfile or "Dockerfile"
        h = hashlib.sha256(f"{orchestrator.__version__}|{dockerfile}".encode())
        for f in sorted(p for p in ctx.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(ctx)).encode())
            h.update(f.read_bytes())
        tag = f"orch/env:dockerfile-{h.hexdigest()[:16]}"
        import docker

        try:
            self.client.images.get(tag)
            return tag
        except docker.errors.ImageNotFound:
            pass
        from orchestrator.systems.docker.images import _docker_build

        _docker_build(self.client, ctx, tag, self.on_build_line, dockerfile=dockerfile)
        return tag

    def prepare(self, job: Job) -> None:
        self.image_for(job)

    def processes_for(self, pass_cls: type) -> int:
        return resolve_processes(
            self.config.processes_per_node,
            self.accelerators,
            data_parallel=getattr(pass_cls, "data_parallel", False),
        )

    def _container_job(self, job: Job) -> tuple[Job, list[Any], dict[str, str]]:
        """Rewrite a job to container paths; return it, the mounts, and container->host path map."""
        from docker.types import Mount

        mounts: list[Any] = []
        path_map: dict[str, str] = {}
        used: set[str] = set()

        def mount_in(host: str, name: str) -> str:
            hp = self._path(host).resolve()
            if not hp.exists():
                raise SystemFailure(f"job {job.job_id}: input {host} does not exist")
            inside = ""
            in_cache = cache_mount(self._path(host))
            if in_cache is not None:  # an HF cache snapshot: its files link into the repo's blobs/, mount both
                hp, inside = in_cache[0].resolve(), "/" + in_cache[1]
            target = f"{IN_MOUNT}/{name}"
            i = 1
            while target in used:
                i += 1
                target = f"{IN_MOUNT}/{name}-{i}"
            used.add(target)
            mounts.append(Mount(target=target, source=str(hp), type="bind", read_only=True))
            path_map[target] = str(hp)
            return target + inside

        updates: dict[str, Any] = {"output_dir": OUT_MOUNT}
        path_map[OUT_MOUNT] = str(Path(job.output_dir).resolve())
        if job.checkpoint_dir:
            updates["checkpoint_dir"] = CHECKPOINT_MOUNT
            path_map[CHECKPOINT_MOUNT] = str(Path(job.checkpoint_dir).resolve())
        if job.model is not None:
            model_updates = {"path": mount_in(job.model.path, "model")}
            if job.model.adapter_path:
                model_updates["adapter_path"] = mount_in(job.model.adapter_path, "adapter")
            updates["model"] = job.model.model_copy(update=model_updates)
        if job.data_files:
            updates["data_files"] = {
                name: mount_in(path, f"data/{_safe(name)}/{Path(path).name}") for name, path in job.data_files.items()
            }
        secrets = {}
        for name, source in job.secrets.items():
            kind, _, ref = source.partition(":")
            if kind != "file":
                secrets[name] = source  # keyvault: resolved in the container by identity
                continue
            hp = self._path(ref).resolve()
            if not hp.is_file():
                raise SystemFailure(f"job {job.job_id}: secret {name!r} file {ref} does not exist")
            target = f"{SECRETS_MOUNT}/{_safe(name)}"
            mounts.append(Mount(target=target, source=str(hp), type="bind", read_only=True))
            secrets[name] = f"file:{target}"
        updates["secrets"] = secrets
        return job.model_copy(update=updates), mounts, path_map

    def submit(self, job: Job) -> DockerJobHandle:
        import docker
        from docker.types import DeviceRequest, Mount

        image = self.image_for(job)
        out_dir = Path(job.output_dir).resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        uid, _, gid = self.user.partition(":")
        if os.geteuid() == 0 and out_dir.stat().st_uid != int(uid):
            os.chown(out_dir, int(uid), int(gid or uid))  # root submitting for another uid: let it write
        for stale in (RECORD_FILE, LOG_FILE):
            (out_dir / stale).unlink(missing_ok=True)
        job.write(out_dir / JOB_FILE)
        cjob, mounts, path_map = self._container_job(job)
        cjob.write(out_dir / CONTAINER_JOB_FILE)
        for f in (JOB_FILE, CONTAINER_JOB_FILE):
            os.chmod(out_dir / f, 0o644)
        if job.checkpoint_dir:  # made here: a bind mount needs its source; owned by the job's user like out_dir
            ckpt = Path(job.checkpoint_dir).resolve()
            ckpt.mkdir(parents=True, exist_ok=True)
            if os.geteuid() == 0 and ckpt.stat().st_uid != int(uid):
                os.chown(ckpt, int(uid), int(gid or uid))
            mounts.append(Mount(target=CHECKPOINT_MOUNT, source=str(ckpt), type="bind", read_only=False))
        mounts += [
            Mount(target=OUT_MOUNT, source=str(out_dir), type="bind", read_only=False),
            Mount(
                target=f"{SRC_MOUNT}/orchestrator",
                source=str(ORCH_SOURCE_ROOT / "orchestrator"),
                type="bind",
                read_only=True,
            ),
        ]
        environment = {
            "PYTHONPATH": SRC_MOUNT,
            "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": "/tmp/orch-home",
            "XDG_CACHE_HOME": "/tmp/orch-home/.cache",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "ORCH_SYSTEM": "docker",
        }
        network = self.config.network
        if network == "auto":
            network = "host" if job.tracking.mode == "direct" else "none"
        if job.tracking.mode == "direct":
            for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
                if os.environ.get(key):
                    environment[key] = os.environ[key]
        gpu = job.accelerator == "gpu" or wants_gpu(self.accelerators)
        device_requests = [DeviceRequest(count=-1, capabilities=[["gpu"]])] if gpu else None
        labels = {
            _label("kind"): "job",
            _label("job_id"): job.job_id,
            _label("output_dir"): str(out_dir),
        }
        try:
            container = self.client.containers.create(
                image,
                runner_command(cjob, "python", f"{OUT_MOUNT}/{CONTAINER_JOB_FILE}"),
                user=self.user,
                environment=environment,
                mounts=mounts,
                working_dir=OUT_MOUNT,
                network_mode=network,
                labels=labels,
                device_requests=device_requests,
                shm_size=self.config.shm_size,
                detach=True,
            )
        except docker.errors.APIError as exc:
            raise SystemFailure(f"docker refused job {job.job_id}: {exc.explanation or exc}") from exc
        handle = DockerJobHandle(job.job_id, out_dir, container.id, client=self.client)
        handle._write_record(
            container_id=container.id, image=image, job_id=job.job_id, state=None, path_map=path_map, user=self.user
        )
        try:
            container.start()
        except docker.errors.APIError as exc:
            container.remove(force=True)
            raise SystemFailure(f"docker could not start job {job.job_id}: {exc.explanation or exc}") from exc
        return handle

    def attach(self, job_id: str) -> DockerJobHandle:
        """job_id is the job's output folder (as for LocalSystem) or its job id (found by container label)."""
        p = Path(job_id)
        if (p / RECORD_FILE).exists():
            rec = json.loads((p / RECORD_FILE).read_text())
            return DockerJobHandle(rec.get("job_id", p.name), p, client=self.client)
        found = self.client.containers.list(all=True, filters={"label": f"{_label('job_id')}={job_id}"})
        if not found:
            raise SystemFailure(f"no docker job {job_id!r} (give its output folder once its container is gone)")
        c = found[0]
        return DockerJobHandle(job_id, Path(c.labels[_label("output_dir")]), c.id, client=self.client)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "x"
