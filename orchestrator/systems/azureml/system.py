"""AzureMLSystem: each Job is an Azure ML command job, submitted with the real azure-ai-ml SDK.

orch's words on this system:
- environment: an Azure ML Environment built from the system's base image + conda file (or Dockerfile + build
  context), named after the conda spec and versioned by the content hash; looked up before it is created, so it is
  registered once and reused by every job and every run.
- code: a snapshot folder holding the orchestrator package + the job's job.json, built deterministically under
  <cache>/aml-code/<hash>/; the SDK uploads it once per content hash (it looks the hash up first).
- inputs: local paths are uploaded by the SDK; azureml://datastores/..., azureml://registries/.../versions/N,
  azureml:name:version and outputs of earlier jobs are passed through unchanged (typed uri_folder, uri_file,
  custom_model); a local copy that orch downloaded from such a reference is passed as that reference again.
- outputs: one named output `result` (result.json, events.jsonl + the pass outputs) at a fixed datastore path,
  azureml://datastores/workspaceblobstore/paths/azureml/<job>/result/, so the next pass can take the model by
  reference and only the final model is ever downloaded.
- command: `python -m orchestrator.runner --job job.json --output-dir ${{outputs.result}} --model-path
  ${{inputs.model}} ...`; metrics go straight to the workspace MLflow run of the job (tracking mode "direct").
- job names are made on the client (orch-<pass>-<uuid>) before the first attempt, and a retried submit first GETs
  the name: a timeout or dropped connection never creates a second job.
- secrets: `hf_token: true` hands the job a Key Vault *reference*; the job reads the value with its own identity.
- cache: the workspace cache (blobcache.py, `orch-cache/` in the default datastore) is this system's shared cache:
  a job's output goes straight into its key's entry and is committed once the job Completed; a cached pass is
  taken from there by reference, by any client.
- priority and cost: `tier` (dedicated | low_priority) is checked against the cluster; `queue_settings.job_tier`
  goes into the job body; a job that ends Failed because its low-priority node was preempted is submitted again up
  to `max_retries` times; a pass's cost is nodes x hours x the cluster VM size's price (prices.py).
- environment: the user's conda file plus orch's runtime layer (environments.AZUREML_RUNTIME_LAYER), or a refusal
  before anything is uploaded naming what is missing and the file to fix.
- Hugging Face references (`fetches_hub_refs`): the client pins a hub model / dataset to its commit and checks it
  exists (fail fast), the job carries `hf://<id>@<sha>` and downloads exactly those files on the compute (fast
  network, no upload of gigabytes from a laptop; private repos with the Key Vault token), as Olive's AzureML
  system let the job load hub models.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from orchestrator.core.fs import atomic_write_text
from orchestrator.core.hub import is_hub_uri
from orchestrator.core.job import (
    JOB_FILE,
    RESULT_FILE,
    Job,
    JobResult,
    JobState,
    JobTracking,
    is_uri,
)
from orchestrator.systems.base import JobHandle, System, SystemFailure

ORCH_PACKAGE = Path(__file__).resolve().parents[2]  # .../orchestrator (this file: orchestrator/systems/azureml/)
DEFAULT_DATASTORE = "workspaceblobstore"
RESULT_OUTPUT = "result"
# Outputs are written to the node's local disk and uploaded when the job ends ("upload"), not written through a
# blobfuse mount ("rw_mount"): orch's writers publish by renaming a finished temp folder, and a directory rename on
# blobfuse over flat-namespace storage is a copy + delete per blob, not atomic (infra/local-azure.md).
OUTPUT_MODE = "upload"
TRAINING_PASSES = ("LoRA", "QLoRA")
PREEMPTED_RX = re.compile(r"preempt", re.IGNORECASE)  # a job that ended Failed because its node was taken back
RETRY_RX = re.compile(r"-r(\d+)$")  # <job>-r<N>: the N-th resubmission of a preempted job
SNAPSHOT_SUFFIXES = (".py", ".typed", ".json", ".yaml", ".yml", ".txt")
STATE_MAP = {
    "NotStarted": JobState.QUEUED,
    "Queued": JobState.QUEUED,
    "Preparing": JobState.QUEUED,
    "Starting": JobState.QUEUED,
    "Provisioning": JobState.QUEUED,
    "Running": JobState.RUNNING,
    "Finalizing": JobState.RUNNING,
    "CancelRequested": JobState.RUNNING,
    "NotResponding": JobState.RUNNING,  # a node missed heartbeats; Azure ML keeps the job and it may recover
    "Paused": JobState.RUNNING,
    "Completed": JobState.COMPLETED,
    "Failed": JobState.FAILED,
    "Canceled": JobState.CANCELED,
}


def output_uri(job_name: str, output: str = RESULT_OUTPUT, datastore: str = DEFAULT_DATASTORE) -> str:
    """Where a job's named output lives: fixed at submit time, so it is known before the job ends."""
    return f"azureml://datastores/{datastore}/paths/azureml/{job_name}/{output}/"


def new_job_name(label: str) -> str:
    """orch-<label>-<uuid>: a fresh name, for `--name`-less submits that must never attach (tests, --force)."""
    return f"orch-{_slug(label)}-{uuid.uuid4().hex[:10]}"


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", label.lower()).strip("-")[:40] or "job"


def definition_name(label: str, definition: Any) -> str:
    """orch-<label>-<hash of the job's definition>: the same workflow submitted twice gets the same name, so a
    submit retried after a lost answer, or run again while its job is live, finds that job instead of a twin."""
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"orch-{_slug(label)}-{digest}"


def claim_job_name(ml: Any, base: str, *, force: bool = False, limit: int = 50) -> tuple[str, Any]:
    """(name, live job or None) for a definition-named job: a live job of that definition is returned to attach to
    (unless `force`); a finished one is never reused (Azure ML job names are unique forever): -2, -3, ... follow."""
    from azure.core.exceptions import ResourceNotFoundError

    for i in range(1, limit + 1):
        name = base if i == 1 else f"{base}-{i}"
        try:
            existing = with_retries(lambda n=name: ml.jobs.get(n), what="job lookup")
        except ResourceNotFoundError:
            return name, None
        if not force and map_state(existing.status) in (JobState.QUEUED, JobState.RUNNING):
            return name, existing
    raise SystemFailure(f"{limit} jobs named {base}-N exist already; pass --name")


def status_text(status: Any) -> str:
    """The service's status word (the SDK hands back a JobStatus enum whose str() is 'JobStatus.X')."""
    return str(getattr(status, "value", status) or "NotStarted")


def map_state(status: Any) -> JobState:
    return STATE_MAP.get(status_text(status), JobState.RUNNING)


# ---- transient errors + idempotent create -----------------------------------------------------------------
def is_transient(exc: BaseException) -> bool:
    """429, 5xx, timeouts and dropped connections: worth another try."""
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

    if isinstance(exc, (ServiceRequestError, ServiceResponseError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, HttpResponseError):
        code = getattr(exc, "status_code", None) or getattr(getattr(exc, "response", None), "status_code", None)
        return code in (408, 429) or (code is not None and code >= 500)
    return False


def with_retries(fn: Callable[[], Any], *, what: str, attempts: int = 5, base_delay: float = 1.0) -> Any:
    """Call fn, retrying transient errors with exponential backoff (on top of azure-core's own retries)."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or attempt == attempts - 1:
                raise
            time.sleep(min(base_delay * 2**attempt, 20))
    raise AssertionError("unreachable")


def create_job_once(ml: Any, job: Any, *, attempts: int = 5) -> Any:
    """Create the job named job.name exactly once: before every (re)try, GET it; if it exists, that is ours."""
    from azure.core.exceptions import ResourceNotFoundError

    last: BaseException | None = None
    for attempt in range(attempts):
        try:
            return ml.jobs.get(job.name)
        except ResourceNotFoundError:
            pass
        except Exception as exc:
            if not is_transient(exc):
                raise
            last = exc
            time.sleep(min(2**attempt, 20))
            continue
        try:
            return ml.jobs.create_or_update(job)
        except Exception as exc:
            if not is_transient(exc):
                raise
            last = exc
            time.sleep(min(2**attempt, 20))
    raise SystemFailure(f"submitting Azure ML job {job.name} failed after {attempts} tries: {last}")


# ---- code snapshot ------------------------------------------------------------------------------------------
def _package_files() -> list[tuple[str, bytes]]:
    files = []
    for p in sorted(ORCH_PACKAGE.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in SNAPSHOT_SUFFIXES:
            files.append((f"orchestrator/{p.relative_to(ORCH_PACKAGE).as_posix()}", p.read_bytes()))
    return files


def code_snapshot(cache_dir: Path, extra: dict[str, bytes]) -> Path:
    """A folder holding the orchestrator package + `extra` files, named by its content hash; built once.

    Deterministic (sorted, no caches, fixed mtimes), so the SDK's content hash finds the earlier upload."""
    files = sorted(_package_files() + list(extra.items()))
    h = hashlib.sha256()
    for name, data in files:
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    digest = h.hexdigest()[:24]
    root = Path(cache_dir) / "aml-code"
    final = root / digest
    if (final / ".complete").exists():
        return final
    tmp = root / f".tmp-{digest}-{uuid.uuid4().hex[:6]}"
    for name, data in files:
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        os.utime(target, (0, 0))
    (tmp / ".complete").write_text("")
    os.utime(tmp / ".complete", (0, 0))
    (tmp / ".amlignore").write_text(".complete\n.amlignore\n")
    try:
        os.replace(tmp, final)
    except OSError:  # a concurrent builder won; same content
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def input_for(path: str) -> tuple[str, str]:
    """(Input type, path) for an artifact: references pass through, local copies of references map back."""
    from orchestrator.systems.azureml.download import origin_of

    if not is_uri(path):
        origin = origin_of(path)
        if origin is not None:
            path = origin
    if path.startswith("azureml://registries/") or re.match(r"^azureml:[^/]", path):
        return "custom_model", path
    if is_uri(path):
        return ("uri_file" if not path.endswith("/") and Path(path).suffix else "uri_folder"), path
    return ("uri_file" if Path(path).is_file() else "uri_folder"), path


def _input_name(prefix: str, name: str) -> str:
    return prefix + re.sub(r"[^A-Za-z0-9_]", "_", name)


# ---- the system ------------------------------------------------------------------------------------------
def _with_processes(resources: dict[str, Any] | None, processes_per_node: Any) -> dict[str, Any]:
    """The system's `processes_per_node` (an int) is Azure ML's process_count_per_instance; "auto" leaves the
    resources' own value (default 1), since the client cannot see the cluster's GPUs."""
    out = dict(resources or {})
    if isinstance(processes_per_node, int):
        out["process_count_per_instance"] = processes_per_node
    return out


class AzureMLSystem(System):
    kind = "azureml"
    fetches_hub_refs = True  # the job downloads hf:// references on the compute (module docstring)

    def __init__(
        self,
        *,
        aml_compute: str | None = None,
        accelerators: list[Any] | None = None,
        docker_config: dict[str, Any] | None = None,
        hf_token: bool = False,
        instance_count: int = 1,
        resources: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
        azureml_client: dict[str, Any] | None = None,
        base_dir: Path | str | None = None,
        cache_dir: Path | str | None = None,
        ml_client: Any = None,
        tier: str | None = None,
        queue_settings: dict[str, Any] | None = None,
        max_retries: int = 0,
        workspace_cache: bool = True,
    ) -> None:
        from orchestrator.systems.azureml import logstream

        logstream.poll_seconds()  # a bad ORCH_AZURE_POLL_S is refused before anything is uploaded or submitted
        self.aml_compute = aml_compute
        self.tier = tier
        self.queue_settings = {k: v for k, v in (queue_settings or {}).items() if v is not None}
        self.max_retries = max_retries
        self.workspace_cache = workspace_cache
        self._compute_obj: Any = None
        self._shared: Any = None
        self._needs: dict[str, tuple[str, ...]] = {}
        self.accelerators = accelerators or ["cpu"]
        self.docker_config = {k: v for k, v in (docker_config or {}).items() if v is not None}
        self.hf_token = hf_token
        self.instance_count = instance_count
        self.resources = dict(resources or {})
        self.tags = dict(tags or {})
        self.azureml_client = azureml_client or {}
        self.base_dir = Path(base_dir or Path.cwd())
        self.cache_dir = Path(cache_dir or (self.base_dir / ".orch" / "cache"))
        self._ml = ml_client
        self._settings: Any = None
        self._environment: str | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any], **context: Any) -> AzureMLSystem:
        cfg = dict(config.get("config") or config)
        docker = cfg.get("docker_config") or cfg.get("aml_docker_config")
        return cls(
            aml_compute=cfg.get("aml_compute"),
            accelerators=cfg.get("accelerators"),
            docker_config=docker,
            hf_token=bool(cfg.get("hf_token")),
            instance_count=int(cfg.get("instance_count") or 1),
            resources=_with_processes(cfg.get("resources"), cfg.get("processes_per_node")),
            tags=cfg.get("tags"),
            azureml_client=cfg.get("azureml_client") or context.get("azureml_client"),
            base_dir=context.get("base_dir"),
            cache_dir=context.get("cache_dir"),
            ml_client=context.get("ml_client"),
            tier=cfg.get("tier"),
            queue_settings=cfg.get("queue_settings"),
            max_retries=int(cfg.get("max_retries") or 0),
            workspace_cache=cfg.get("workspace_cache", True) is not False,
        )

    # ---- workspace ----------------------------------------------------------------------------------------
    @property
    def settings(self) -> Any:
        if self._settings is None:
            from orchestrator.systems.azureml.workspace import resolve_settings

            # a missing or malformed setting is the user's to give: WorkspaceError (a UserError, exit 2)
            self._settings = resolve_settings(self.azureml_client)
        return self._settings

    @property
    def ml(self) -> Any:
        """The MLClient, made on first use (planning a cached run never touches the network)."""
        if self._ml is None:
            from orchestrator.systems.azureml.workspace import make_ml_client

            self._ml = make_ml_client(self.settings)
        return self._ml

    @property
    def compute(self) -> str | None:
        return self.aml_compute or self.settings.compute

    # ---- environment ------------------------------------------------------------------------------------
    def _env_spec(self) -> dict[str, Any]:
        """What decides the image: base image + normalized conda spec, or the build context's content."""
        dc = self.docker_config
        if dc.get("build_context_path"):
            ctx = Path(dc["build_context_path"])
            h = hashlib.sha256()
            for p in sorted(ctx.rglob("*")):
                if p.is_file():
                    h.update(p.relative_to(ctx).as_posix().encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
            return {"build": h.hexdigest(), "dockerfile": dc.get("dockerfile") or "Dockerfile", "name": ctx.name}
        image = dc.get("base_image") or dc.get("image_name")
        if not image:
            raise SystemFailure("AzureML system: give aml_docker_config.base_image + conda_file_path, or dockerfile")
        env = self.composed_environment()
        return {"image": image, "conda": env.hash(), "name": env.name}

    def composed_environment(self, needs: dict[str, tuple[str, ...]] | None = None) -> Any:
        """The job environment: the user's conda file plus orch's runtime layer (what the runner and the driver
        import on the compute); without a conda file, python + the layer alone. Refused (EnvSpecError, one line
        naming the file) when a pin cannot live beside the layer, or when a pass's libraries are missing."""
        from orchestrator.systems.environments import AZUREML_RUNTIME_LAYER, EnvSpec, compose_runtime, load_env_spec

        dc = self.docker_config
        if dc.get("conda_file_path"):
            spec = load_env_spec(dc["conda_file_path"])
            what = "aml_docker_config.conda_file_path"
        else:
            spec = EnvSpec(source=Path("(no conda_file_path)"), name="orch-runtime", python="3.11",
                           conda_deps=("pip",), pip_requirements=())  # fmt: skip
            what = "aml_docker_config"
        return compose_runtime(spec, AZUREML_RUNTIME_LAYER, needs=needs, what=what)

    def require(self, pass_type: str, libraries: tuple[str, ...]) -> None:
        """A pass of the workflow runs here and imports `libraries`: refuse now (before any upload or image
        build) if the job environment lacks them. A Dockerfile environment cannot be read, so it is trusted."""
        if not libraries or self.docker_config.get("build_context_path"):
            return
        self._needs[pass_type] = tuple(libraries)
        self.composed_environment(needs=self._needs)

    def environment_fingerprint(self, libraries: tuple[str, ...], environment: str | None = None) -> dict[str, str]:
        """The hash of the Azure ML Environment spec (the system's image + conda file); `environment` (a pass's
        family) is not used yet: an AzureML system names its environment in aml_docker_config."""
        spec = self._env_spec()
        return {"aml_environment": hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]}

    def environment_id(self) -> str:
        """azureml:<name>:<hash> of the job environment, registered once (looked up before it is created)."""
        if self._environment:
            return self._environment
        from azure.ai.ml.entities import BuildContext, Environment
        from azure.core.exceptions import ResourceNotFoundError

        spec = self._env_spec()
        version = self.environment_fingerprint(())["aml_environment"][:16]
        name = re.sub(r"[^A-Za-z0-9_-]", "-", f"orch-{spec.get('name') or 'env'}").strip("-")[:200]
        try:
            env = with_retries(lambda: self.ml.environments.get(name, version=version), what="environment lookup")
        except ResourceNotFoundError:
            dc = self.docker_config
            if "build" in spec:
                entity = Environment(
                    name=name, version=version,
                    build=BuildContext(path=str(dc["build_context_path"]), dockerfile_path=spec["dockerfile"]),
                )  # fmt: skip
            else:
                conda = self.composed_environment().to_conda_yaml()
                entity = Environment(name=name, version=version, image=spec["image"], conda_file=_yaml(conda))
            env = with_retries(lambda: self.ml.environments.create_or_update(entity), what="environment create")
        self._environment = f"azureml:{env.name}:{env.version}"
        return self._environment

    # ---- secrets -----------------------------------------------------------------------------------------
    def key_vault_url(self) -> str:
        url = self.settings.key_vault_url
        if not url:
            ws = with_retries(lambda: self.ml.workspaces.get(self.settings.workspace_name), what="workspace")
            kv = getattr(ws, "key_vault", None) or ""
            if not kv:
                raise SystemFailure("hf_token: no Key Vault known; `orch config set key_vault_url https://...`")
            url = f"https://{kv.rstrip('/').rsplit('/', 1)[-1]}.vault.azure.net/"
        return url if url.endswith("/") else url + "/"

    def secret_sources(self, names: list[str]) -> dict[str, str]:
        """name -> keyvault:<vault_url>#<secret>: a reference the job resolves with its own identity."""
        out = {}
        for name in names:
            secret = self.settings.hf_token_secret_name if name == "hf_token" else name.replace("_", "-")
            out[name] = f"keyvault:{self.key_vault_url()}#{secret}"
        return out

    # ---- submission --------------------------------------------------------------------------------------
    def processes_for(self, pass_cls: type) -> int:
        """Processes per node for data-parallel passes: resources.process_count_per_instance (default 1)."""
        if not getattr(pass_cls, "data_parallel", False):
            return 1
        return int(self.resources.get("process_count_per_instance") or 1)

    def _distribution(self, processes_per_node: int, data_parallel: bool) -> tuple[Any, Any]:
        """(distribution, resources): Azure ML's PyTorch launcher starts processes_per_node ranks on each of
        instance_count nodes (RANK/WORLD_SIZE/MASTER_ADDR set for the runner) when a pass runs data parallel."""
        from azure.ai.ml import PyTorchDistribution
        from azure.ai.ml.entities import JobResourceConfiguration

        instances = self.instance_count if data_parallel else 1
        res_kwargs = {k: self.resources[k] for k in ("instance_type", "shm_size", "docker_args") if k in self.resources}
        resources = JobResourceConfiguration(instance_count=instances, **res_kwargs)
        if data_parallel and (instances > 1 or processes_per_node > 1):
            return PyTorchDistribution(process_count_per_instance=processes_per_node), resources
        return None, resources

    def compute_info(self) -> tuple[str, str] | None:
        """(VM size, tier: dedicated | low_priority) of the cluster jobs run on, from its GET (None: serverless
        without an instance_type). A Spot job tier runs on preemptible capacity: low_priority."""
        spot = (self.queue_settings.get("job_tier") or "").lower() == "spot"
        if not self.compute:
            size = self.resources.get("instance_type")
            return (size, "low_priority" if spot else "dedicated") if size else None
        if self._compute_obj is None:
            self.check_compute()
        size = getattr(self._compute_obj, "size", None)
        tier = getattr(self._compute_obj, "tier", None) or "dedicated"
        if not size:
            return None
        return size, "low_priority" if spot or tier == "low_priority" else "dedicated"

    def node_price(self, pass_cls: type | None) -> Any:
        """Price of the nodes a job of this pass takes (instance_count for a data-parallel pass, else 1)."""
        from orchestrator.systems.azureml.prices import node_price
        from orchestrator.systems.azureml.workspace import read_profile

        info = self.compute_info()
        if info is None:
            return None
        nodes = self.instance_count if getattr(pass_cls, "data_parallel", False) else 1
        return node_price(info[0], info[1], nodes=nodes, profile=read_profile())

    def shared_cache(self) -> Any:
        """The workspace cache (orch-cache/ in the default datastore), used by reference; None when the system
        says workspace_cache: false."""
        if not self.workspace_cache:
            return None
        if self._shared is None:
            from orchestrator.systems.azureml.blobcache import WorkspaceCache

            self._shared = WorkspaceCache.for_client(self.ml, by_reference=True)
        return self._shared

    def check_compute(self) -> None:
        """Refuse an unknown compute, or one whose tier is not the one asked for, before anything is uploaded or
        submitted (validate before compute)."""
        from azure.core.exceptions import ResourceNotFoundError

        name = self.compute
        if not name:
            return  # serverless
        try:
            self._compute_obj = with_retries(lambda: self.ml.compute.get(name), what="compute lookup")
        except ResourceNotFoundError:
            try:
                known = sorted(c.name for c in self.ml.compute.list())
            except Exception:  # noqa: BLE001 - the names are a hint only
                known = []
            hint = f" (computes in the workspace: {', '.join(known)})" if known else ""
            raise SystemFailure(
                f"aml_compute {name!r} does not exist in workspace {self.settings.workspace_name}{hint}: "
                "set systems.<name>.config.aml_compute to one of them"
            ) from None
        have = getattr(self._compute_obj, "tier", None) or "dedicated"
        if self.tier and have != self.tier:
            try:
                fit = sorted(c.name for c in self.ml.compute.list() if (getattr(c, "tier", None) or "") == self.tier)
            except Exception:  # noqa: BLE001 - the names are a hint only
                fit = []
            hint = f" ({self.tier} clusters in the workspace: {', '.join(fit)})" if fit else ""
            raise SystemFailure(
                f"aml_compute {name!r} is a {have} cluster but the system asks for tier {self.tier}{hint}: "
                "set aml_compute to such a cluster, or change tier"
            )

    def submit_command(
        self,
        *,
        name: str,
        command: str,
        code: Path,
        inputs: dict[str, Any],
        outputs: dict[str, Any],
        display_name: str,
        tags: dict[str, str],
        environment_variables: dict[str, str] | None = None,
        processes_per_node: int = 1,
        data_parallel: bool = False,
        reads_hub: bool = False,
    ) -> Any:
        """Create one command job (environment ensured first); idempotent by name. `reads_hub`: the job downloads
        Hugging Face references itself (with the Key Vault token when the system has hf_token), from the endpoint
        the client pinned them on (HF_ENDPOINT, when the client sets one: a mirror)."""
        from azure.ai.ml import command as command_job

        distribution, resources = self._distribution(processes_per_node, data_parallel)
        env_vars = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        if reads_hub or self.hf_token:
            if os.environ.get("HF_ENDPOINT"):
                env_vars["HF_ENDPOINT"] = os.environ["HF_ENDPOINT"]
        else:
            env_vars["HF_HUB_OFFLINE"] = "1"  # nothing to read from the hub: jobs read models from inputs only
        env_vars.update(environment_variables or {})
        queue = None
        if self.queue_settings:
            from azure.ai.ml.entities import QueueSettings

            queue = QueueSettings(**self.queue_settings)
        retry_tags = {"orch.max_retries": str(self.max_retries)} if self.max_retries else {}
        job = command_job(
            name=name,
            display_name=display_name,
            experiment_name=self.settings.experiment_name,
            code=str(code),
            command=command,
            environment=self.environment_id(),
            compute=self.compute,
            inputs=inputs,
            outputs=outputs,
            environment_variables=env_vars,
            tags={**self.tags, **tags, **retry_tags},
            distribution=distribution,
            instance_count=resources.instance_count,
            queue_settings=queue,
        )
        job.resources = resources
        return create_job_once(self.ml, job)

    def submit(self, job: Job) -> AzureMLJobHandle:
        from azure.ai.ml import Input, Output

        inputs: dict[str, Any] = {}
        args = ["python -m orchestrator.runner --job job.json", f"--output-dir ${{{{outputs.{RESULT_OUTPUT}}}}}"]
        cache = self.shared_cache() if job.cache_key else None
        if cache is not None:
            args.append("--manifest")  # the output becomes a workspace cache entry: its readers check the files
        refs: dict[str, str] = {}
        from_hub = job.model is not None and is_hub_uri(job.model.path)  # the job downloads it (runner)
        if job.model is not None and from_hub:
            refs["model"] = job.model.path
            if job.model.adapter_path:
                kind, path = input_for(job.model.adapter_path)
                inputs["adapter"] = Input(type=kind, path=path)
                args.append("--adapter-path ${{inputs.adapter}}")
                refs["adapter"] = path
        elif job.model is not None:
            kind, path = input_for(job.model.path)
            inputs["model"] = Input(type=kind, path=path)
            args.append("--model-path ${{inputs.model}}")
            refs["model"] = path
            if job.model.adapter_path:
                kind, path = input_for(job.model.adapter_path)
                inputs["adapter"] = Input(type=kind, path=path)
                args.append("--adapter-path ${{inputs.adapter}}")
                refs["adapter"] = path
        hub_data = {k: v for k, v in job.data_files.items() if is_hub_uri(v)}
        for data_name, local in job.data_files.items():
            if data_name in hub_data:
                refs[f"data_{data_name}"] = local
                continue
            key = _input_name("data_", data_name)
            kind, path = input_for(local)
            inputs[key] = Input(type=kind, path=path)
            args.append(f"--data-file {data_name}=${{{{inputs.{key}}}}}")
        remote_job = job.model_copy(
            update={
                "output_dir": "outputs",
                "checkpoint_dir": None,  # the client's cache folder does not exist on the compute
                "model": job.model.model_copy(update={"path": job.model.path if from_hub else "input:model",
                                                      "adapter_path": "input:adapter"
                                                      if job.model.adapter_path else None}) if job.model else None,
                "data_files": {k: hub_data.get(k, f"input:{k}") for k in job.data_files},
                "tracking": JobTracking(mode="direct", metric_prefix=job.tracking.metric_prefix),
            }
        )  # fmt: skip
        code = code_snapshot(self.cache_dir, {JOB_FILE: remote_job.model_dump_json(indent=2).encode()})
        self.check_compute()
        definition = {"code": code.name, "inputs": refs, "command": args, "environment": self.environment_id(),
                      "compute": self.compute, "processes": job.processes_per_node}  # fmt: skip
        name, live = claim_job_name(self.ml, definition_name(job.pass_name, definition))
        if live is not None:  # the same pass on the same inputs is running already: follow it, not a twin
            return AzureMLJobHandle(self, live.name, refs=refs, studio_url=getattr(live, "studio_url", None))
        # straight into the key's workspace cache entry (committed by the engine once the job Completed)
        result_uri = cache.objects_uri(job.cache_key, name) if cache is not None else output_uri(name)
        created = self.submit_command(
            name=name,
            command=" ".join(args),
            code=code,
            inputs=inputs,
            outputs={RESULT_OUTPUT: Output(type="uri_folder", path=result_uri, mode=OUTPUT_MODE)},
            display_name=f"{job.pass_name} ({job.pass_type})",
            tags={"orch.pass": job.pass_name, "orch.pass_type": job.pass_type, "orch.job_id": job.job_id,
                  "orch.inputs": json.dumps(refs)},
            processes_per_node=job.processes_per_node,
            data_parallel=job.processes_per_node > 1 or job.pass_type in TRAINING_PASSES and self.instance_count > 1,
            reads_hub=from_hub or bool(hub_data),
        )  # fmt: skip
        return AzureMLJobHandle(self, created.name, refs=refs, studio_url=getattr(created, "studio_url", None))

    def attach(self, job_id: str) -> AzureMLJobHandle:
        job = with_retries(lambda: self.ml.jobs.get(job_id), what="job lookup")
        refs = json.loads((job.tags or {}).get("orch.inputs") or "{}")
        return AzureMLJobHandle(self, job.name, refs=refs, studio_url=getattr(job, "studio_url", None))

    # ---- registration ------------------------------------------------------------------------------------
    def register_model(self, name: str, path: str, *, tags: dict[str, str], description: str = "") -> Any:
        """Register a model folder (an azureml:// job output or a local folder) as a workspace model."""
        from azure.ai.ml.entities import Model

        model = Model(name=name, path=path, type="custom_model", tags=tags, description=description)
        return with_retries(lambda: self.ml.models.create_or_update(model), what="model registration")


def _yaml(text: str | None) -> str | None:
    """The SDK takes a conda file path; write the normalized conda yaml next to the code snapshots."""
    if text is None:
        return None
    import tempfile

    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"orch-conda-{digest}.yaml"
    if not path.exists():
        atomic_write_text(path, text)
    return str(path)


# ---- handle --------------------------------------------------------------------------------------------------
class AzureMLJobHandle(JobHandle):
    """A command job in the workspace, by name: status, live logs from run history, cancel, outputs."""

    def __init__(
        self, system: AzureMLSystem, name: str, *, refs: dict[str, str] | None = None, studio_url: str | None = None
    ) -> None:
        self.system = system
        self.job_id = name
        self.name = name
        self.refs = refs or {}
        self.studio_url = studio_url
        self._offsets: dict[str, int] = {}  # log file -> bytes already shown (see logs())
        self._log_text: list[str] = []
        self._log_status = "NotStarted"  # the status seen by the last log poll
        self._logs_done: set[str] = set()  # files read to their end (the build log once the job runs)
        self._retry_lock = threading.Lock()

    @property
    def ml(self) -> Any:
        return self.system.ml

    def raw_status(self) -> str:
        job = with_retries(lambda: self.ml.jobs.get(self.name), what="job status")
        return status_text(job.status)

    def status(self) -> JobState:
        return map_state(self.raw_status())

    def wait(self, timeout: float | None = None, poll: float | None = None) -> JobState:
        """Until the job is terminal; a job that ended Failed by preemption is followed into its resubmission
        (up to the system's max_retries): the handle then names the new job. poll: seconds between status
        requests (default logstream.poll_seconds(): $ORCH_AZURE_POLL_S, else 2)."""
        from orchestrator.systems.azureml import logstream as ls

        poll = ls.poll_seconds() if poll is None else poll
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.status()
            if state == JobState.FAILED and self.follow_retry() is not None:
                continue
            if state.is_terminal():
                return state
            if deadline is not None and time.monotonic() >= deadline:
                return state
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    # ---- preemption: Azure ML requeues a preempted job itself; one that ends Failed instead is submitted again
    def _retry_name(self, n: int) -> str:
        return f"{RETRY_RX.sub('', self.name)}-r{n}"

    def follow_retry(self) -> str | None:
        """If this job ended Failed because its low-priority node was preempted and retries are left (tag
        orch.max_retries, set from the system's max_retries), submit it again as <name>-r<N> (the same command,
        code, environment and inputs; outputs under the new name) and follow that one. Idempotent: the retry's
        name is fixed, so two followers find one job. Returns the new name, or None."""
        from azure.core.exceptions import ResourceNotFoundError

        with self._retry_lock:
            job = with_retries(lambda: self.ml.jobs.get(self.name), what="job lookup")
            if status_text(job.status) != "Failed" or not PREEMPTED_RX.search(self.error() or ""):
                return None
            m = RETRY_RX.search(self.name)
            done = int(m[1]) if m else 0
            allowed = int((job.tags or {}).get("orch.max_retries") or 0)
            if done >= allowed:
                return None
            new = self._retry_name(done + 1)
            try:
                with_retries(lambda: self.ml.jobs.get(new), what="job lookup")
            except ResourceNotFoundError:
                old = self.name
                job.name = new
                job.display_name = f"{job.display_name or old} (retry {done + 1})"
                job.tags = {**(job.tags or {}), "orch.retry_of": old, "orch.retry": str(done + 1)}
                for out in (job.outputs or {}).values():  # a fresh output folder: the failed one may hold a part
                    if getattr(out, "path", None):
                        out.path = out.path.replace(f"/{old}/", f"/{new}/")
                create_job_once(self.ml, job)
            self.name = self.job_id = new
            self._offsets, self._logs_done = {}, set()
            return new

    def retried_as(self) -> tuple[str, str] | None:
        """(name, status) of the newest resubmission of this job after a preemption, if any."""
        from azure.core.exceptions import ResourceNotFoundError

        found = None
        for n in range(1, 21):
            name = self._retry_name(n)
            try:
                found = (name, status_text(self.ml.jobs.get(name).status))
            except ResourceNotFoundError:
                break
        return found

    def error(self) -> str | None:
        """The service's error message for a failed job (run history), one paragraph."""
        details = with_retries(lambda: self.ml.jobs._runs_operations.get_run_details(self.name), what="run details")
        err = getattr(details, "error", None)
        inner = getattr(err, "error", None) if err is not None else None
        return getattr(inner, "message", None) if inner is not None else None

    # ---- logs: files, offsets, retries and SAS redaction live in logstream.py ------------------------------
    def logs(
        self,
        follow: bool = False,
        poll: float | None = None,
        *,
        ranks: int | str = 0,
        resume: bool = False,
        from_start: bool = False,
        on_notice: Callable[[str], None] | None = None,
    ) -> Iterator[str]:
        """Job log lines: rank 0's by default, one rank's (ranks=N) or every rank's (ranks="all", each line
        prefixed "[rank N] "); while the job is Preparing (or has no user log yet) also the environment image
        build log, prefixed "[image build] ". With follow, until the job is terminal.

        resume: the byte offset per log file is read from and saved to <cache>/aml-logs/<job>.json (atomic
        writes; saved after every poll and when the generator is closed), so a later call continues where this
        one stopped; from_start ignores the saved offsets. A line counts as consumed once the consumer asks for
        the next one: after a Ctrl-C or close() the line being handled when it stopped comes again, none is
        skipped. Without resume the offsets live in this handle only (the whole log, read incrementally).

        Transient errors (dropped connections, timeouts, a body cut short, 429/5xx) are retried with capped
        backoff, each retry announced through on_notice; a poll that fails logstream.RETRY_ATTEMPTS times in a
        row, or any other error, raises SystemFailure (for a follow that has not seen a terminal state: the
        stream ended before the job finished). Lines, notices and errors never carry a SAS signature."""
        import requests

        from orchestrator.systems.azureml import logstream as ls

        poll = ls.poll_seconds() if poll is None else poll
        store = ls.OffsetStore(self.system.cache_dir, self.name) if resume else None
        saved: dict[str, int] | None = None
        if store is not None:
            self._offsets = {} if from_start else store.load()
            saved = None if from_start else dict(self._offsets)
        failures = 0
        session = requests.Session()
        try:
            while True:
                try:
                    yield from self._poll_logs(session, ranks, strict=not follow)
                except SystemFailure:
                    raise
                except Exception as exc:
                    if not ls.is_transient(exc):
                        raise SystemFailure(f"reading the log of {self.name} failed: {ls.describe(exc)}") from None
                    failures += 1
                    if failures >= ls.RETRY_ATTEMPTS:
                        if follow and not map_state(self._log_status).is_terminal():
                            raise SystemFailure(
                                f"log stream of {self.name} ended before the job finished ({self._log_status}) "
                                f"after {failures} tries: {ls.describe(exc)}; "
                                f"`orch logs {self.name} -f` resumes where it stopped"
                            ) from None
                        raise SystemFailure(
                            f"reading the log of {self.name} failed after {failures} tries: {ls.describe(exc)}"
                        ) from None
                    delay = ls.backoff(failures)
                    if on_notice is not None:
                        on_notice(
                            f"log read: {ls.describe(exc, 160)}; retry {failures}/{ls.RETRY_ATTEMPTS - 1} "
                            f"in {delay:.1f}s"
                        )
                    time.sleep(delay)
                    continue
                failures = 0
                if store is not None and self._offsets != saved:
                    store.save(self._offsets)
                    saved = dict(self._offsets)
                if not follow or map_state(self._log_status).is_terminal():
                    return
                time.sleep(poll)
        finally:
            session.close()
            if store is not None and self._offsets != saved:
                with contextlib.suppress(OSError):
                    store.save(self._offsets)

    def _poll_logs(self, session: Any, ranks: int | str, *, strict: bool) -> Iterator[str]:
        """One poll: the job's status (kept in _log_status), then the new lines of each file to show, in order
        image build log, rank 0, 1, ... Only complete lines until the job is terminal (or, for the build log,
        past Preparing); each file's offset moves past a line when the consumer comes back for the next."""
        from orchestrator.systems.azureml import logstream as ls

        raw = status_text(self.ml.jobs.get(self.name).status)
        if raw == "Failed" and not strict:
            old = self.name
            if self.follow_retry() is not None:
                self._log_status = "Queued"
                yield f"orch: {old} ended Failed: its low-priority node was preempted; submitted again as {self.name}"
                return
        self._log_status = raw
        details = self.ml.jobs._runs_operations.get_run_details(self.name)
        files = dict(sorted((getattr(details, "log_files", None) or {}).items()))  # name -> SAS URL: never shown
        by_rank = ls.rank_logs(files)
        terminal = map_state(raw).is_terminal()
        chosen: list[tuple[str, str]] = []  # (file, line prefix)
        building = raw in ls.PRE_RUN_STATES or self._offsets.get(ls.BUILD_LOG, 0) > 0 or not by_rank
        if ls.BUILD_LOG in files and ls.BUILD_LOG not in self._logs_done and building:
            chosen.append((ls.BUILD_LOG, "[image build] "))
        if ranks == "all":
            chosen += [(name, f"[rank {r}] ") for r, name in by_rank.items()]
        elif ranks in by_rank:
            chosen.append((by_rank[int(ranks)], ""))
        elif by_rank and (terminal or strict):
            have = ", ".join(str(r) for r in by_rank)
            raise SystemFailure(f"job {self.name} has no log for rank {ranks} (logs of ranks: {have})")
        for name, prefix in chosen:
            build_over = name == ls.BUILD_LOG and raw not in ls.PRE_RUN_STATES
            data = ls.get_range(session, files[name], self._offsets.get(name, 0), name)
            if data:
                end = len(data) if (terminal or build_over) else data.rfind(b"\n") + 1
                for piece in data[:end].splitlines(keepends=True):
                    line = prefix + ls.redact_sas(piece.decode(errors="replace").rstrip("\r\n"))
                    self._log_text = (self._log_text + [line])[-200:]
                    yield line
                    self._offsets[name] = self._offsets.get(name, 0) + len(piece)
            if build_over:
                self._logs_done.add(name)

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(Exception):  # the tail is a courtesy; the error message matters more
            list(self.logs(follow=False))
        tail = "\n".join(self._log_text[-n:])
        err = None
        with contextlib.suppress(Exception):
            err = self.error()
        return f"{tail}\n{err}" if err else tail

    def cancel(self) -> bool:
        if self.status().is_terminal():
            return False
        poller = with_retries(lambda: self.ml.jobs.begin_cancel(self.name), what="cancel")
        poller.result()
        return True

    def output_files(self, output: str = RESULT_OUTPUT) -> Any:
        """(container client, prefix) of a named output (the fixed datastore path set at submit)."""
        from orchestrator.systems.azureml.download import DATASTORE_RX, _datastore_source

        job = with_retries(lambda: self.ml.jobs.get(self.name), what="job")
        out = (job.outputs or {}).get(output)
        uri = getattr(out, "path", None) or output_uri(self.name, output)
        m = DATASTORE_RX.match(uri)
        if not m:
            raise SystemFailure(f"output {output} of {self.name} is not on a datastore ({uri})")
        src = _datastore_source(self.ml, m[1], m[2])
        return src, uri

    def outputs(self, dest: Path | None = None) -> Path:
        """result.json + events.jsonl + job.log into dest; model paths in result.json become azureml:// URIs of
        the job's output (the model itself stays in the workspace until the final export)."""
        from orchestrator.systems.azureml.download import safe_join

        dest = Path(dest or (self.system.cache_dir / "aml-results" / self.name))
        dest.mkdir(parents=True, exist_ok=True)
        src, uri = self.output_files()
        prefix = src.prefix.rstrip("/") + "/"
        for fname in (RESULT_FILE, "events.jsonl"):
            blob = src.container.get_blob_client(prefix + fname)
            try:
                data = with_retries(lambda blob=blob: blob.download_blob().readall(), what="output download")
            except Exception as exc:  # noqa: BLE001 - a missing file is reported below by the engine
                if type(exc).__name__ == "ResourceNotFoundError":
                    continue
                raise
            atomic_write_text(safe_join(dest, fname), data.decode())
        try:
            log = "\n".join(self._log_text + list(self.logs(follow=False)))
            atomic_write_text(dest / "job.log", log + "\n")
        except Exception:  # noqa: BLE001 - the log is informative only
            pass
        if (dest / RESULT_FILE).exists():
            result = JobResult.read(dest)
            if result.model is not None:
                result.model = result.model.model_copy(
                    update={"path": self._remote(result.model.path, uri, "model"),
                            "adapter_path": self._remote(result.model.adapter_path, uri, "adapter")}
                )  # fmt: skip
                result.write(dest)
        return dest

    def _remote(self, path: str | None, base_uri: str, field: str) -> str | None:
        """A path the runner wrote -> where it is now: relative -> inside the output; absolute (a pass-through
        input) -> the reference that input was given as."""
        if path is None or is_uri(path):
            return path
        if os.path.isabs(path):
            ref = self.refs.get(field)
            if ref is None:
                raise SystemFailure(f"job {self.name}: result names a local path {path} that is not an input")
            return ref
        return base_uri.rstrip("/") + "/" + Path(path).as_posix().removeprefix("./")
