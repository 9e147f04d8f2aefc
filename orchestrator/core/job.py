"""The Job contract: a self-contained, serializable description of one pass run.

Every system (local subprocess, Docker container, Azure ML command job) ships a `job.json` of this shape to
`python -m orchestrator.runner --job job.json`, and reads back a `result.json` of the `JobResult` shape. Paths
inside a Job are as the *runner* sees them: the system rewrites them (container mounts, ${{inputs.x}}) before
submitting. Nothing secret is ever stored here: secrets travel as *names* and are resolved by the runner from a
mounted file or Key Vault at run time.
"""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.core.fs import atomic_write_text

JOB_FILE = "job.json"
RESULT_FILE = "result.json"
EVENTS_FILE = "events.jsonl"

ModelFormat = Literal["hf", "hf_adapter", "onnx", "onnx_genai"]


class ModelArtifact(BaseModel):
    """A model on disk as a pass hands it to the next one.

    `path` is the model folder (HF checkpoint, ONNX folder). For `hf_adapter` the adapter lives in
    `adapter_path` and `path` points at the base model it was trained on.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: ModelFormat
    path: str
    adapter_path: str | None = None
    task: str = "text-generation"
    trust_remote_code: bool = False
    quantized: bool = False  # weights loaded/saved in a quantized form (QLoRA base, AWQ/GPTQ): no plain merge

    def with_root(self, root: Path | str) -> ModelArtifact:
        """Resolve relative paths against `root` (a pass writes paths relative to its out_dir)."""

        def fix(p: str | None) -> str | None:
            if p is None or is_uri(p):
                return p
            return p if os.path.isabs(p) else str(Path(root) / p)

        return self.model_copy(update={"path": fix(self.path), "adapter_path": fix(self.adapter_path)})


def is_uri(value: str) -> bool:
    """azureml://..., azureml:name:version, https://... : references that stay where they are."""
    return "://" in value or value.startswith("azureml:")


class JobTracking(BaseModel):
    """Where metrics go. `events` = the runner appends to events.jsonl and the host forwards them to MLflow;
    `direct` = the runner logs to the MLflow run that its environment names (MLFLOW_RUN_ID, as on Azure ML)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["events", "direct", "none"] = "events"
    metric_prefix: str = ""  # e.g. "lora/" so several passes share one MLflow run


class Job(BaseModel):
    """One pass run. Built by the engine, executed by the runner on any system."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str
    pass_name: str  # the key in the workflow's `passes`
    pass_type: str  # registry name, e.g. "LoRA"
    pass_config: dict[str, Any] = Field(default_factory=dict)  # validated, normalized pass config
    model: ModelArtifact | None = None  # the input model (None only for passes that create one)
    data_configs: dict[str, dict[str, Any]] = Field(default_factory=dict)  # name -> data config (json form)
    data_files: dict[str, str] = Field(default_factory=dict)  # data config name -> local path override
    output_dir: str  # where the runner writes the pass outputs and result.json
    # A folder that outlives a killed or restarted attempt (outside output_dir, which the next attempt starts
    # afresh): a pass that can resume keeps its checkpoints here (layout: core/checkpoints.py). None: no resume.
    checkpoint_dir: str | None = None
    accelerator: Literal["cpu", "gpu"] = "cpu"
    processes_per_node: int = Field(1, ge=1)  # >1: data-parallel, launched with torchrun (one code path for N=1, N>1)
    nodes: int = Field(1, ge=1)  # Azure ML instance_count
    execution_providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    secrets: dict[str, str] = Field(default_factory=dict)  # name -> secret *source* (file path / kv ref), never a value
    tracking: JobTracking = Field(default_factory=JobTracking)
    # The step's cache key: a system that keeps the cache where the work runs (Azure ML's workspace cache) writes
    # the job's output straight into that key's entry, to be committed once the job completed.
    cache_key: str | None = None
    log_level: int = 3  # Olive/ORT severity: 0 verbose .. 4 fatal

    def write(self, path: Path | str) -> Path:
        return atomic_write_text(Path(path), self.model_dump_json(indent=2))

    @classmethod
    def read(cls, path: Path | str) -> Job:
        return cls.model_validate_json(Path(path).read_text())


class JobState(str, Enum):
    QUEUED = "Queued"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELED = "Canceled"

    def is_terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELED)


class JobResult(BaseModel):
    """What the runner leaves in `<output_dir>/result.json` when a pass finished."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    pass_type: str
    status: JobState
    model: ModelArtifact | None = None  # paths relative to output_dir
    metrics: dict[str, float] = Field(default_factory=dict)  # final metrics (the history is in events.jsonl)
    versions: dict[str, str] = Field(default_factory=dict)  # library versions the pass ran with
    duration_s: float = 0.0
    error: str | None = None

    def write(self, out_dir: Path | str) -> Path:
        return atomic_write_text(Path(out_dir) / RESULT_FILE, self.model_dump_json(indent=2))

    @classmethod
    def read(cls, out_dir: Path | str) -> JobResult:
        return cls.model_validate_json((Path(out_dir) / RESULT_FILE).read_text())


def append_event(out_dir: Path | str, event: dict[str, Any]) -> None:
    """Append one JSON line to events.jsonl; a line is written in a single write() so tails never see half."""
    path = Path(out_dir) / EVENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(event, separators=(",", ":")) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
