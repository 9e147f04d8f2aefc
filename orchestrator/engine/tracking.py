"""MLflow: one MLflow run per workflow run; metrics forwarded live from jobs; the final model logged + registered.

Tracking URI precedence: --tracking-uri flag > engine.mlflow.tracking_uri in the config > MLFLOW_TRACKING_URI >
a local store in the working directory (sqlite:///mlruns.db, which also holds the model registry).
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SECRET_HINTS = ("token", "secret", "password", "key", "credential", "sas")
# user:password@ (or a bare token@) in a URI, and secret-looking query parameters (SAS sig=, token=, ...)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*)(?::(?P<pw>[^/@\s]*))?@")
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&;](?:sig|signature|token|access_token|password|passwd|pwd|secret|api_key|apikey|key|"
    r"client_secret|sas|se?kret)=)(?P<value>[^&#\s'\"]+)",
    re.IGNORECASE,
)
HTTP_TIMEOUT_S = "10"  # MLflow's own default is 120 s with 7 retries: a dead server would hang minutes
HTTP_MAX_RETRIES = "1"


def redact(text: str) -> str:
    """Credentials inside URIs in any text -> ***: `https://u:pw@host` -> `https://u:***@host`,
    `https://tok@host` -> `https://***@host`, `?sig=...` -> `?sig=***`."""
    if not isinstance(text, str) or ("@" not in text and "=" not in text):
        return text

    def userinfo(m: re.Match[str]) -> str:
        if m.group("pw") is not None:
            return f"{m.group('scheme')}{m.group('user')}:***@"
        return f"{m.group('scheme')}***@"

    return _QUERY_SECRET.sub(lambda m: m.group("key") + "***", _USERINFO.sub(userinfo, text))


def redact_obj(obj: Any) -> Any:
    """redact() over every string of a JSON-like object."""
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_obj(v) for v in obj]
    return redact(obj) if isinstance(obj, str) else obj


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
        out[prefix] = redact(json.dumps(obj, default=str))[:500]
    else:
        out[prefix] = redact(str(obj))[:500]
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
        self._logged: set[tuple[str, int]] = set()  # (metric, step) forwarded from jobs: each is logged once
        self.tracking_uri = tracking_uri
        if not enabled:
            return
        import logging

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_S)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_MAX_RETRIES)
        import mlflow
        from filelock import FileLock

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
        """Forward one job event (metric or param) into the workflow run, namespaced by pass name. A metric step
        already in the run (a resumed attempt's replayed history, a step redone after the last checkpoint) is
        not logged again."""
        if event.get("type") == "metric":
            name, step = prefix + event["name"], event.get("step")
            if step is not None:
                if (name, int(step)) in self._logged:
                    return
                self._logged.add((name, int(step)))
            self.log_metric(name, event["value"], step)
        elif event.get("type") == "param" and self.enabled:
            self.client.log_param(self.run_id, (prefix + event["name"])[:250], str(event["value"])[:500])

    def resume(self, prefix: str) -> None:
        """A job resumed from a checkpoint: learn which steps of its metrics this run holds already (none for a
        fresh run; those of the earlier attempt when the run is the same, as on an Azure ML requeue)."""
        if not self.enabled:
            return
        for name in self.client.get_run(self.run_id).data.metrics:
            if name.startswith(prefix):
                self._logged.update((name, m.step) for m in self.client.get_metric_history(self.run_id, name))

    def log_model(self, model_dir: Path, model_format: str, register_as: str | None) -> str | None:
        """Log the final model as an MLflow pyfunc (ONNX GenAI or HF folder) and register it; returns its URI."""
        if not self.enabled:
            return None
        from orchestrator.engine.mlflow_model import log_model_folder

        return log_model_folder(self.mlflow, self.run_id, model_dir, model_format, register_as)

    def end(self, status: str) -> None:
        if self.enabled:
            self.client.set_terminated(self.run_id, status=status)
