"""Olive's `systems`: where passes (host) and evaluation (target) run.

Accepted as Olive writes them: fields nested under "config" or flat, accelerators as ["gpu"] or as
[{"device": "gpu", "execution_providers": [...]}] (normalized to the second form), the image of a container
under aml_docker_config (Olive's AzureML), local_docker_config (Olive's Docker), docker_config or image_config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, ValidationInfo, field_validator, model_validator

from orchestrator.schema.resources import AzureMLClient, Strict, base_dir_of, resolve_path

IMAGE_KEYS = ("docker_config", "aml_docker_config", "local_docker_config", "image_config")


class Accelerator(Strict):
    device: Literal["cpu", "gpu"] = "cpu"
    execution_providers: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"device": data}
        return data

    @field_validator("device", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        v = v.lower() if isinstance(v, str) else v
        return "gpu" if v == "cuda" else v


class ImageConfig(Strict):
    """The container image of a job: a base image + conda file, or a Dockerfile + build context, or a built image.

    Paths resolve against the workflow file's folder; `dockerfile` is relative to `build_context_path`, as in
    Olive and Azure ML. Existence is checked by the system that uses them: a workflow run on `local` must not
    fail over the conda file of its `aml` system.
    """

    base_image: str | None = None
    conda_file_path: Path | None = None
    dockerfile: str | None = None
    build_context_path: Path | None = None
    image_name: str | None = None
    build_args: dict[str, str] | None = None
    run_params: dict[str, Any] | None = None

    @field_validator("conda_file_path", "build_context_path", mode="after")
    @classmethod
    def _resolve(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        return None if v is None else resolve_path(v, base_dir_of(info))

    @model_validator(mode="after")
    def _complete(self) -> ImageConfig:
        if self.dockerfile and not self.build_context_path:
            raise ValueError("dockerfile needs build_context_path (the folder it is built in)")
        if not (self.base_image or self.dockerfile or self.image_name):
            raise ValueError("give base_image (+ conda_file_path), dockerfile + build_context_path, or image_name")
        return self


class _System(Strict):
    accelerators: list[Accelerator] = Field(default_factory=lambda: [Accelerator()])
    hf_token: bool = False
    # Data-parallel processes per node for passes that support it (LoRA/QLoRA: torchrun, or Azure ML's PyTorch
    # distribution). "auto": one per visible GPU when accelerators ask for a GPU, else 1.
    processes_per_node: int | Literal["auto"] = "auto"

    @field_validator("hf_token", mode="before")
    @classmethod
    def _token_flag(cls, v: Any) -> Any:
        if isinstance(v, str) and v.lower() not in ("true", "false"):
            raise ValueError(
                "write hf_token: true (the job then reads the token from HF_TOKEN, `huggingface-cli login` or the "
                "workspace Key Vault), never the token itself; the value given is not shown"
            )
        return v

    @field_validator("processes_per_node", mode="before")
    @classmethod
    def _processes(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"must be a positive integer or 'auto' (got {v!r})")

    @model_validator(mode="before")
    @classmethod
    def _image_aliases(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "docker_config" not in cls.model_fields:
            return data
        given = [k for k in IMAGE_KEYS if data.get(k) is not None]
        if len(given) > 1:
            raise ValueError(f"give the image once: {', '.join(given)} all set")
        if given and given[0] != "docker_config":
            data = {k: v for k, v in data.items() if k != given[0]} | {"docker_config": data[given[0]]}
        return data


class LocalSystemConfig(_System):
    """Jobs run in a subprocess here, optionally under another interpreter or venv."""

    type: Literal["LocalSystem"] = "LocalSystem"
    python_environment_path: Path | None = None

    @field_validator("python_environment_path", mode="after")
    @classmethod
    def _resolve(cls, v: Path | None, info: ValidationInfo) -> Path | None:
        if v is None:
            return None
        return resolve_path(v, base_dir_of(info))


class DockerSystemConfig(_System):
    """Jobs run in a container of the local Docker engine (the one definition: DockerSystem reads this too)."""

    type: Literal["Docker"] = "Docker"
    docker_config: ImageConfig | None = None
    requirements_file: Path | None = None
    is_dev: bool = False
    environment: str | None = None  # an orch family (cpu-export) or conda.yaml path when no docker_config
    network: Literal["auto", "none", "host", "bridge"] = "auto"  # auto: none, host for direct MLflow
    shm_size: str = "1g"  # torch dataloader workers use /dev/shm

    @model_validator(mode="after")
    def _one_image_kind(self) -> DockerSystemConfig:
        dc = self.docker_config
        if dc is not None and dc.dockerfile and (dc.base_image or dc.conda_file_path):
            raise ValueError("docker_config: give base_image (+ conda_file_path) or dockerfile + build_context_path")
        return self

    @property
    def devices(self) -> list[str]:
        """The accelerators as device names (["cpu"], ["gpu"]): what the container is started with."""
        return [a.device for a in self.accelerators]


JOB_TIERS = ("Spot", "Basic", "Standard", "Premium", "Null")  # azure-ai-ml 1.35.2 JobTierNames / the REST JobTier enum


class QueueSettings(Strict):
    """Azure ML's `queue_settings` of a job, in its words: `job_tier` Spot | Basic | Standard | Premium (Spot runs on
    preemptible capacity, priced as low priority). Azure ML's job API that azure-ai-ml 1.35.2 submits with
    (2025-01-01-preview) has no queue `priority`: it is refused here, before anything is sent."""

    job_tier: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_priority(cls, data: Any) -> Any:
        if isinstance(data, dict) and "priority" in data:
            raise ValueError(
                "priority: Azure ML's job API (api-version 2025-01-01-preview, used by azure-ai-ml 1.35.2) has no "
                "queue priority and refuses it; remove it (job_tier Spot asks for preemptible capacity)"
            )
        return data

    @field_validator("job_tier", mode="before")
    @classmethod
    def _tier(cls, v: Any) -> Any:
        if v is None:
            return v
        for tier in JOB_TIERS:
            if isinstance(v, str) and v.lower() == tier.lower():
                return tier
        raise ValueError(f"must be one of {', '.join(JOB_TIERS[:4])} (Azure ML's job tiers), got {v!r}")


class AzureMLSystemConfig(_System):
    """Jobs run as Azure ML command jobs on a compute cluster.

    tier: the priority the compute cluster must have, in Azure ML's words (dedicated | low_priority): checked
    against the cluster (`aml_compute`) before anything is submitted. queue_settings: Azure ML's job queue
    settings (job_tier). max_retries: how many times orch submits a job again that ended Failed because its
    low-priority node was preempted (Azure ML requeues most preempted jobs by itself). workspace_cache: keep the
    pass cache in the workspace's default datastore (orch-cache/), shared by every submit and client."""

    type: Literal["AzureML"] = "AzureML"
    aml_compute: str
    docker_config: ImageConfig | None = None
    aml_environment_config: dict[str, Any] | None = None
    azureml_client: AzureMLClient | None = Field(
        None, validation_alias=AliasChoices("azureml_client", "azureml_client_config")
    )
    instance_count: int = Field(1, ge=1)
    resources: dict[str, Any] | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    is_dev: bool = False
    datastores: str | None = None
    requirements_file: Path | None = None
    tier: Literal["dedicated", "low_priority"] | None = None
    queue_settings: QueueSettings | None = None
    max_retries: int = Field(0, ge=0, le=20)
    workspace_cache: bool = True

    @field_validator("tier", mode="before")
    @classmethod
    def _compute_tier(cls, v: Any) -> Any:
        """Azure ML's REST words (Dedicated, LowPriority) are its SDK's (dedicated, low_priority)."""
        if isinstance(v, str):
            return {"lowpriority": "low_priority", "low_priority": "low_priority"}.get(v.lower(), v.lower())
        return v


SystemConfig = Annotated[LocalSystemConfig | DockerSystemConfig | AzureMLSystemConfig, Field(discriminator="type")]
