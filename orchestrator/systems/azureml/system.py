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
- cache: the workspace cache (workspace_cache.py, `orch-cache/` in the default datastore) is this system's shared
  cache: a job's output goes straight into its key's entry and is committed once the job Completed; a cached pass
  is taken from there by reference, by any client.
- priority and cost: `tier` (dedicated | low_priority) is checked against the cluster; `queue_settings.job_tier`
  goes into the job body; a job that ends Failed because its low-priority node was preempted is submitted again up
  to `max_retries` times; a pass's cost is nodes x hours x the cluster VM size's price (prices.py).
- environment: the user's conda file plus orch's runtime layer (AZUREML_RUNTIME_LAYER of environments/runtime_layer),
  or a refusal before anything is uploaded naming what is missing and the file to fix.
- Hugging Face references (`fetches_hub_refs`): the client pins a hub model / dataset to its commit and checks it
  exists (fail fast), the job carries `hf://<id>@<sha>` and downloads exactly those files on the compute (fast
  network, no upload of gigabytes from a laptop; private repos with the Key Vault token), as Olive's AzureML
  system let the job load hub models.

Its parts, one job a module: names.py (job names, output places), jobspec.py (the command job's runner command,
inputs, launcher, environment variables), job_environment.py (the Environment), snapshot.py (the code folder),
retries.py (transient errors, create-once), states.py (status words), handle.py (a job followed by name).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.core.job import JOB_FILE, Job
from orchestrator.systems.azureml import job_environment, jobspec
from orchestrator.systems.azureml.handle import AzureMLJobHandle
from orchestrator.systems.azureml.jobspec import OUTPUT_MODE, TRAINING_PASSES
from orchestrator.systems.azureml.names import RESULT_OUTPUT, claim_job_name, definition_name, output_uri
from orchestrator.systems.azureml.retries import create_job_once, with_retries
from orchestrator.systems.azureml.snapshot import code_snapshot
from orchestrator.systems.base import System, SystemFailure


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

    # ---- environment: what decides the image and its registration live in job_environment.py -------------
    def composed_environment(self, needs: dict[str, tuple[str, ...]] | None = None) -> Any:
        """The job environment: the user's conda file plus orch's runtime layer (job_environment.composed)."""
        return job_environment.composed(self.docker_config, needs)

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
        return {"aml_environment": job_environment.fingerprint(self.docker_config)}

    def environment_id(self) -> str:
        """azureml:<name>:<hash> of the job environment, registered once (looked up before it is created)."""
        if not self._environment:
            self._environment = job_environment.ensure(self.ml, self.docker_config)
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
            from orchestrator.systems.azureml.workspace_cache import WorkspaceCache

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

        distribution, resources = jobspec.distribution(
            self.instance_count, self.resources, processes_per_node, data_parallel
        )
        env_vars = jobspec.environment_variables(reads_hub=reads_hub, hf_token=self.hf_token,
                                                 extra=environment_variables)  # fmt: skip
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
        from azure.ai.ml import Output

        cache = self.shared_cache() if job.cache_key else None
        runner = jobspec.runner_command(job, manifest=cache is not None)
        args, inputs, refs = runner.args, runner.inputs, runner.refs
        code = code_snapshot(self.cache_dir, {JOB_FILE: runner.remote_job.model_dump_json(indent=2).encode()})
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
            reads_hub=runner.reads_hub,
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
