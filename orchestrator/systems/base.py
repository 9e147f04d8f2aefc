"""The System contract: where a Job runs. One file per system; systems never import passes.

A system only provides an environment and moves bytes: every system executes the same entry point,
`python -m orchestrator.runner --job <job.json>`, so "works locally" means "works in Docker" means
"works on Azure ML".
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.errors import RunFailure
from orchestrator.core.job import Job, JobResult, JobState


class SystemFailure(RunFailure):
    """A user-facing failure of a system (submit refused, job failed): one line, with the log tail attached."""


@dataclass(frozen=True)
class NodePrice:
    """What one node of a compute costs per hour, and how many nodes a job takes: cost = nodes x hours x price."""

    vm_size: str
    priority: str  # dedicated | low_priority (Azure ML's low-priority nodes and the Spot job tier)
    usd_per_hour: float
    nodes: int = 1
    source: str = ""  # where the price comes from: orch's table (dated) or `orch config set price.<vm_size>`

    def describe(self) -> str:
        kind = "low priority" if self.priority == "low_priority" else "dedicated"
        return f"{self.nodes} x {self.vm_size} {kind} at ${self.usd_per_hour:.4g}/h ({self.source})"


class JobHandle(ABC):
    """A submitted job. Holds enough state (system kind, job_id) to re-attach from another process."""

    job_id: str

    @abstractmethod
    def status(self) -> JobState: ...

    @abstractmethod
    def wait(self, timeout: float | None = None) -> JobState:
        """Block until the job is terminal (or timeout) and return the status: the reason matters."""

    @abstractmethod
    def logs(self, follow: bool = False) -> Iterator[str]:
        """Log lines. With follow, until the job ends; raises if the stream ends before a terminal state."""

    @abstractmethod
    def cancel(self) -> bool:
        """Stop the job. Idempotent; True if it was still running."""

    @abstractmethod
    def outputs(self, dest: Path | None = None) -> Path:
        """The folder holding result.json and the pass outputs (downloaded into dest where remote)."""

    def result(self, dest: Path | None = None) -> JobResult:
        return JobResult.read(self.outputs(dest))


class System(ABC):
    """Subclasses: LocalSystem, DockerSystem, AzureMLSystem."""

    kind: str
    # True: jobs on this system download Hugging Face hub references themselves (the job carries the pinned
    # hf://<id>@<sha>; Azure ML's compute reaches the hub and reads the workspace's token). False: the engine
    # downloads them into the host's HF cache before submitting and the job reads the local snapshot.
    fetches_hub_refs: bool = False

    @classmethod
    def from_config(cls, config: dict[str, Any], **context: Any) -> System:
        """Build from the json form of the workflow's system entry; `context` carries base_dir, cache_dir."""
        return cls(**{k: v for k, v in config.items() if k != "type"})

    def environment_fingerprint(self, libraries: tuple[str, ...], environment: str | None = None) -> dict[str, str]:
        """What identifies the job's environment in cache keys: by default the versions of `libraries`
        in this interpreter. Image-based systems return the hash of the environment spec they would run
        `environment` (a pass's Requirements.environment family, e.g. cpu-train) with instead."""
        from orchestrator.core.versions import library_versions

        return library_versions(libraries)

    def require(self, pass_type: str, libraries: tuple[str, ...]) -> None:
        """A pass of the workflow will run here importing `libraries`: refuse now (a UserError naming what is
        missing and where to add it) if this system's environment cannot have them. Default: nothing to check."""
        return None

    def shared_cache(self) -> Any:
        """A cache kept where this system runs work (core.cache.SharedCache), or None: the local cache only."""
        return None

    def node_price(self, pass_cls: type) -> NodePrice | None:
        """The price of the nodes a job of this pass takes, or None where compute is not billed by the hour."""
        return None

    def processes_for(self, pass_cls: type) -> int:
        """Data-parallel processes per node for a pass of this class (Job.processes_per_node); 1 by default.
        Systems with a `processes_per_node` setting override it; only passes with `data_parallel` get N > 1."""
        return 1

    def prepare(self, job: Job) -> None:  # noqa: B027 - an optional hook, no-op by default
        """Idempotent set-up before submit: build/reuse an environment image, upload code."""

    @abstractmethod
    def submit(self, job: Job) -> JobHandle:
        """Start the job and return at once."""

    @abstractmethod
    def attach(self, job_id: str) -> JobHandle:
        """A handle for a job submitted earlier (by this or another process)."""
