"""What the engine plans and reports: steps, their records, the run's summary, and the reporter protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from orchestrator.core.errors import RunFailure, UserError
from orchestrator.core.job import ModelArtifact
from orchestrator.core.prompt import PromptFormat

EVALUATE = "Evaluate"  # the pass type that runs the workflow's evaluator
INPUT_EVAL_STEP = "evaluate_input"  # the step that scores the input model when engine.evaluate_input_model is set


class EngineError(RunFailure):
    """A workflow failure for the user: one line, with the failing job's log tail attached."""


class SystemNameError(UserError):
    """--host / --target / engine.host / engine.target names no system of the workflow: exit 2."""


class Reporter(Protocol):
    """What the engine tells the UI (the CLI renders it with rich; tests pass a QuietReporter). step_progress's
    `tokens` are the tokens processed so far (training) and `t` the event's time, for rates and ETAs."""

    def plan(self, steps: list[Step]) -> None: ...
    def step_start(self, step: Step) -> None: ...
    def step_progress(
        self, step: Step, done: int, total: int, desc: str, *, tokens: int | None = None, t: float | None = None
    ) -> None: ...
    def step_log(self, step: Step, line: str) -> None: ...
    def step_metric(self, step: Step, name: str, value: float, at: int | None = None) -> None: ...
    def step_note(self, step: Step, message: str) -> None: ...  # one line the user must see (resumed from step N)
    def step_end(self, step: Step, record: StepRecord) -> None: ...
    def note(self, message: str) -> None: ...  # something the user should know once (a repaired store, a damaged entry)


class QuietReporter:
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)

    def plan(self, steps: list[Step]) -> None: ...
    def step_start(self, step: Step) -> None: ...
    def step_progress(
        self, step: Step, done: int, total: int, desc: str, *, tokens: int | None = None, t: float | None = None
    ) -> None: ...
    def step_log(self, step: Step, line: str) -> None: ...
    def step_metric(self, step: Step, name: str, value: float, at: int | None = None) -> None: ...
    def step_note(self, step: Step, message: str) -> None: ...
    def step_end(self, step: Step, record: StepRecord) -> None: ...


@dataclass
class Step:
    """One planned pass run."""

    name: str
    pass_type: str
    config: dict[str, Any]
    role: str  # "host" (a pass) or "target" (evaluation)
    system_name: str
    key: str = ""
    cached: bool = False
    data_names: list[str] = field(default_factory=list)
    where: str = ""  # where a cached step's entry is: "local" (this machine's cache) or a shared cache ("workspace")
    resumed_from_step: int | None = None  # the job continued a killed attempt from its checkpoint at this step


@dataclass
class StepRecord:
    name: str
    pass_type: str
    system: str
    cache_key: str
    cached: bool
    status: str
    duration_s: float
    metrics: dict[str, float]
    versions: dict[str, str]
    output: dict[str, Any] | None
    output_size_bytes: int = 0
    cost_usd: float | None = None  # what running it cost on its compute this time (None: no price known)
    cached_in: str = ""  # "local" / "workspace" when it came from a cache
    resumed_from_step: int | None = None  # the pass's training continued from a checkpoint at this step


@dataclass
class RunSummary:
    steps: list[StepRecord]
    final_model: ModelArtifact | None
    metrics: dict[str, float]
    output_dir: Path | None
    mlflow_run_id: str | None
    model_uri: str | None = None
    registry_uri: str | None = None  # the model registry the final model was registered in
    registered_version: str | None = None  # its version there (register_as is the name)
    cost_usd: float | None = None  # the passes that ran, on priced compute
    input_identity: str | None = None  # what the run started from: hf://<id>@<commit>, or the content hash
    recorded: bool = False  # mlflow_run_id is an earlier run that recorded the same plan; nothing was logged
    prompt_format: PromptFormat | None = None  # what the final model was fine-tuned on (core.prompt)

