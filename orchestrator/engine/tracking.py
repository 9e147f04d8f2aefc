"""MLflow: one MLflow run per workflow run; metrics forwarded live from jobs; the final model logged + registered.

Tracking URI precedence: --tracking-uri flag > engine.mlflow.tracking_uri in the config > MLFLOW_TRACKING_URI >
a local store in the working directory (sqlite:///mlruns.db, which also holds the model registry).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestrator.core.redact import mask, redact, redact_obj, remember_secret  # noqa: F401  (re-exported)
from orchestrator.engine.mlflow_store import prepare_sqlite_store

SECRET_HINTS = ("token", "secret", "password", "key", "credential", "sas")
HTTP_TIMEOUT_S = "10"  # MLflow's own default is 120 s with 7 retries: a dead server would hang minutes
HTTP_MAX_RETRIES = "1"


def default_tracking_uri(cwd: Path | None = None) -> str:
    return f"sqlite:///{(cwd or Path.cwd()) / 'mlruns.db'}"


def resolve_tracking_uri(flag: str | None, config_uri: str | None) -> str:
    return flag or config_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def flatten_params(obj: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a config into MLflow params; values of secret-looking keys are never logged."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if any(h in str(k).lower() for h in SECRET_HINTS) and not isinstance(v, (bool, dict)):
                out[key] = "***"
            else:
                out.update(flatten_params(v, key))
    elif isinstance(obj, list):
        out[prefix] = mask(json.dumps(redact_obj(obj), default=str))[:500]
    else:
        out[prefix] = mask(str(obj))[:500]
    return out


class EventTail:
    """Reads new complete lines of a growing events.jsonl (a job's live metrics)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n")
        if end < 0:
            return
        self.offset += end + 1
        for line in data[: end + 1].splitlines():
            try:
                yield json.loads(line)
            except ValueError:
                continue


def _store_lock_path(tracking_uri: str | None) -> Path | None:
    """The file that serializes store creation for a local store (sqlite db / file store), else None."""
    if not tracking_uri:
        return None
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        return db.with_name(db.name + ".orch-lock")
    if tracking_uri.startswith("file:"):
        from urllib.parse import urlparse

        return Path(urlparse(tracking_uri).path) / ".orch-lock"
    if "://" not in tracking_uri:
        return Path(tracking_uri) / ".orch-lock"
    return None


def _proc_start(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (/proc/<pid>/stat field 22): with the pid it names
    one process, whatever pids the kernel reuses later. None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_token() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_proc_start(os.getpid()) or 0}"


def _alive(token: str) -> bool:
    host, _, rest = token.partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname():
        return True  # another machine's run: not ours to judge
    try:
        return _proc_start(int(pid)) == start
    except ValueError:
        return True


class Tracker:
    """The workflow's MLflow run. Methods are no-ops when tracking is off.

    Two first runs on one new sqlite db would both run MLflow's schema migration and crash (or leave the db
    half-migrated): store creation, experiment lookup/creation and run creation happen under a file lock beside
    the db. Each run is tagged with its process (host:pid:start time); a run whose process is gone (kill -9)
    is closed as KILLED by the next run in the same experiment.
    """

    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.run_id: str | None = None
        self.tracking_uri = tracking_uri
        self.notes: list[str] = []  # what the user should know once (a store repaired)
        if not enabled:
            return
        import logging

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # MLflow prints "View run ... at <tracking uri>" with the URI's password: orch prints the run masked itself
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_S)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_MAX_RETRIES)
        import mlflow
        from filelock import FileLock

        for name in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):  # masked if a library prints them
            remember_secret(os.environ.get(name))

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        lock_path = _store_lock_path(tracking_uri)
        lock = FileLock(str(lock_path), timeout=300) if lock_path is not None else None
        if lock is not None:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        try:
            self.notes = prepare_sqlite_store(tracking_uri) if tracking_uri else []  # whole, or rebuilt (aside)
            self.client = mlflow.MlflowClient(tracking_uri)
            exp = self.client.get_experiment_by_name(experiment)  # creates / migrates the store (under the lock)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
            self.experiment_id = exp_id
            self.closed_stale = self._close_dead_runs()
            tags = {"orch.workflow": run_name, "orch.process": process_token()}
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
        finally:
            if lock is not None:
                lock.release()

    def _close_dead_runs(self) -> list[str]:
        """RUNNING runs of this experiment whose process (by its orch.process tag) no longer exists -> KILLED."""
        closed = []
        try:
            runs = self.client.search_runs(
                [self.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=200
            )
        except Exception:  # a server without search support: nothing to close, the run itself still works
            return closed
        for run in runs:
            token = run.data.tags.get("orch.process")
            if token and not _alive(token):
                self.client.set_terminated(run.info.run_id, status="KILLED")
                closed.append(run.info.run_id)
        return closed

    def log_params(self, params: dict[str, str]) -> None:
        if not self.enabled or not params:
            return
        from mlflow.entities import Param

        items = [Param(k[:250], v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metric(self, name: str, value: float, step: int | None = None) -> None:
        if self.enabled:
            self.client.log_metric(self.run_id, name, float(value), step=step or 0)

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: Path) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path))

    def forward(self, event: dict[str, Any], prefix: str) -> None:
        """Forward one job event (metric or param) into the workflow run, namespaced by pass name."""
        if event.get("type") == "metric":
            self.log_metric(prefix + event["name"], event["value"], event.get("step"))
        elif event.get("type") == "param" and self.enabled:
            self.client.log_param(self.run_id, (prefix + event["name"])[:250], str(event["value"])[:500])

    def log_model(self, model_dir: Path, model_format: str, register_as: str | None) -> str | None:
        """Log the final model as an MLflow pyfunc (ONNX GenAI or HF folder) and register it; returns its URI."""
        if not self.enabled:
            return None
        from orchestrator.engine.mlflow_model import log_model_folder

        return log_model_folder(self.mlflow, self.run_id, model_dir, model_format, register_as)

    def end(self, status: str) -> None:
        if self.enabled:
            self.client.set_terminated(self.run_id, status=status)
