"""The Pass contract. A pass is a pure function: (config, input model, data) -> output model + metrics.

One file per pass under orchestrator/passes/, registered by type name in `registry.py` as a lazy import path
so that `orch --help` never imports torch. Passes never import systems.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from orchestrator.core.errors import UserError
from orchestrator.core.job import Job, ModelArtifact, append_event
from orchestrator.schema.resources import refuse_bool_numbers


class PassConfig(BaseModel):
    """Base for every pass's config: frozen, and unknown keys are an error (the config reader names them);
    numbers are finite and never booleans (schema.resources.Strict's rules)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: Any) -> Any:
        return refuse_bool_numbers(cls, data)


class PassError(UserError):
    """A user-facing failure of a pass: one line that names the cause and the fix. No traceback is shown."""


@dataclass(frozen=True)
class Requirements:
    """What a pass needs from the system that runs it."""

    cuda: bool = False
    environment: str = "cpu-export"  # environments/<name>.conda.yaml family: cpu-export | cpu-train | gpu-train
    without_cuda: str = ""  # cuda=True: why it cannot run without a GPU and what to use instead (one line)


@dataclass(frozen=True)
class HeldOut:
    """Rows a pass kept out of training (carved off `data_config` by size and seed): evaluation scores on these
    same rows, so accuracy is never measured on training rows."""

    data_config: str
    size: float | int
    seed: int


@dataclass(frozen=True)
class SplitRef:
    """A split a pass config names (`field`: its key), of the data config `data_config`: checked before a run."""

    field: str
    split: str | None
    data_config: str | None


@dataclass
class PassOutput:
    model: ModelArtifact | None  # paths relative to out_dir (or absolute for pass-through inputs)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class PassContext:
    """What the runner gives a pass: the job, where to write, and how to report progress and metrics."""

    job: Job
    out_dir: Path
    emit: Callable[[dict[str, Any]], None] | None = None  # set by the runner; default appends to events.jsonl
    secrets: dict[str, str] = field(default_factory=dict)  # resolved secret values, never logged

    def _emit(self, event: dict[str, Any]) -> None:
        event = {"t": time.time(), **event}
        if self.emit is not None:
            self.emit(event)
        else:
            append_event(self.out_dir, event)

    def log_metric(self, name: str, value: float, step: int | None = None) -> None:
        self._emit({"type": "metric", "name": name, "value": float(value), "step": step})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            self.log_metric(k, v, step)

    def log_param(self, name: str, value: Any) -> None:
        self._emit({"type": "param", "name": name, "value": str(value)})

    def progress(self, done: int, total: int, desc: str = "", *, tokens: int | None = None) -> None:
        """Progress for the host's bar or progress lines (events.jsonl; lines in the job log). `tokens`: tokens
        processed so far (training), for tokens/s."""
        event: dict[str, Any] = {"type": "progress", "done": done, "total": total, "desc": desc}
        if tokens is not None:
            event["tokens"] = int(tokens)
        self._emit(event)

    def info(self, message: str) -> None:
        self._emit({"type": "log", "message": message})

    def resumed(self, step: int, history: list[tuple[str, float, int]]) -> None:
        """Say this attempt continues a killed one from its checkpoint at `step`, and replay the metrics logged up
        to it ((name, value, step)), so this attempt's record and a new MLflow run hold the whole curve. The
        forwarders log each (metric, step) once, so a run that already holds them gets no second copy."""
        self._emit({"type": "resume", "step": int(step)})
        for name, value, at in history:
            self._emit({"type": "metric", "name": name, "value": float(value), "step": at, "replayed": True})


class Pass(ABC):
    """Subclass, set `type_name`, `Config`, `version`, `libraries`; implement `run`.

    `version`: bump it when the pass's behaviour changes, so cached outputs of the old code are not reused.
    `libraries`: distribution names whose versions go into the cache key.
    """

    type_name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    version: ClassVar[str] = "1"
    libraries: ClassVar[tuple[str, ...]] = ()
    needs_model: ClassVar[bool] = True
    # True: the pass runs unchanged under torchrun / Azure ML's PyTorch launcher (every rank calls run; the
    # runner keeps result.json and events to rank 0), so systems may give it processes_per_node > 1.
    data_parallel: ClassVar[bool] = False
    # runs the model on the job's first execution provider (timing): on a host without the GPU its system asks
    # for, the engine hands it the CPU provider instead (the passes that build models keep the asked providers)
    runs_model_on_provider: ClassVar[bool] = False

    def requirements(self, config: PassConfig) -> Requirements:
        return Requirements()

    # What the engine asks of a pass config, so the engine never reads a pass's own keys (raw json form:
    # asked before the config is validated into Config).
    @classmethod
    def data_refs(cls, config: dict[str, Any], data_names: set[str]) -> list[str]:
        """Data config names the config refers to (train_data_config, data_config, ... at any depth)."""
        return _data_refs(config, data_names)

    @classmethod
    def held_out(cls, config: dict[str, Any]) -> HeldOut | None:
        """The rows this pass holds out of training, if it trains (an evaluator scores on the same rows)."""
        return None

    @classmethod
    def split_refs(cls, config: dict[str, Any]) -> list[SplitRef]:
        """The dataset splits this config names, for the pre-flight check."""
        return []

    @classmethod
    def key_config(cls, config: PassConfig) -> dict[str, Any]:
        """The config as it enters the cache key: all of it, less what cannot change the output (a pass that
        checkpoints drops its checkpoint settings, so changing them neither misses the cache nor orphans the
        checkpoints of a run in progress)."""
        return config.model_dump(mode="json")

    @abstractmethod
    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        """Do the work; write everything under ctx.out_dir; return the output model and final metrics."""


def _data_refs(config: Any, data_names: set[str]) -> list[str]:
    found: list[str] = []
    if isinstance(config, dict):
        for value in config.values():
            found += _data_refs(value, data_names)
    elif isinstance(config, list):
        for value in config:
            found += _data_refs(value, data_names)
    elif isinstance(config, str) and config in data_names:
        found.append(config)
    return sorted(set(found))
