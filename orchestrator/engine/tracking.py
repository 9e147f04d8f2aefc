"""MLflow: one MLflow run per workflow run; metrics forwarded live from jobs; the final model logged + registered.

Tracking URI precedence: --tracking-uri flag > engine.mlflow.tracking_uri in the config > MLFLOW_TRACKING_URI >
a local store beside the workflow (<config folder>/mlruns.db, which also holds the model registry). A local store
named relatively is resolved as outputs are: from the config's folder when the config names it, from the current
folder when a flag or the environment does; so a run started from another folder finds the same store.

The final model is registered in the registry of the store the run is tracked in (a local sqlite store's own
tables, a tracking server's registry, the Azure ML workspace's), unless $MLFLOW_REGISTRY_URI names another one.
orch never sets MLflow's process-global URIs beyond the one call that needs them (see engine.mlflow_model): two
Trackers in one process, one after the other or side by side, each write to and register in their own store.

A run whose passes are all cached logs nothing: it finds the run that recorded the same plan (tag orch.plan) and
points to it. A cached pass brings its recorded metric history (its cache entry's events.jsonl) into a new run.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.links import real
from orchestrator.core.redact import mask, redact, redact_obj, remember_secret  # noqa: F401  (re-exported)
from orchestrator.engine.mlflow_store import prepare_sqlite_store

SECRET_HINTS = ("token", "secret", "password", "key", "credential", "sas")
HTTP_TIMEOUT_S = "10"  # MLflow's own default is 120 s with 7 retries: a dead server would hang minutes
HTTP_MAX_RETRIES = "1"


def default_tracking_uri(base_dir: Path | None = None) -> str:
    return f"sqlite:///{real(base_dir or Path.cwd()) / 'mlruns.db'}"


def absolute_store_uri(uri: str, base_dir: Path) -> str:
    """A local store named relatively (`sqlite:///mlruns.db`, `file:mlruns`, `mlruns`) -> an absolute one, from
    base_dir; servers (http, databricks, azureml) and absolute paths are returned as they are."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rest = uri[len("sqlite:///") :]
        if rest and not rest.startswith(":memory:") and not Path(rest).is_absolute():
            return f"sqlite:///{real(base_dir / rest)}"  # a link loop is named by the pre-flight
        return uri
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return f"file://{real(base_dir / uri[len('file:') :])}"
    if "://" not in uri and ":" not in uri.split("/")[0] and not Path(uri).is_absolute():
        return str(real(base_dir / uri))
    return uri


def resolve_tracking_uri(flag: str | None, config_uri: str | None, base_dir: Path | None = None) -> str:
    """The flag and $MLFLOW_TRACKING_URI as typed in the current folder; the config's URI and the default store
    from the config's folder (base_dir), as the config's output_dir and cache_dir are."""
    if flag:
        return absolute_store_uri(flag, Path.cwd())
    if config_uri:
        return absolute_store_uri(config_uri, base_dir or Path.cwd())
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return absolute_store_uri(env, Path.cwd())
    return default_tracking_uri(base_dir)


def resolve_registry_uri(tracking_uri: str) -> str:
    """The registry a run's model is registered in: $MLFLOW_REGISTRY_URI when the user set one (as typed in the
    current folder), else the tracking store's own. MLflow's own default reads a process-global URI that whoever
    ran last in the process set; orch names it instead."""
    env = os.environ.get("MLFLOW_REGISTRY_URI")
    return absolute_store_uri(env, Path.cwd()) if env else tracking_uri


def local_artifact_root(tracking_uri: str | None) -> str | None:
    """Where a local sqlite store's artifacts go: beside the db (<db folder>/mlruns/), not under whatever folder
    the run was started from (MLflow's default for a new experiment is ./mlruns of the current folder)."""
    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///") :])
    return (real(db.parent) / "mlruns").as_uri() if db.is_absolute() else None


def plan_key(register_as: str, steps: list[tuple[str, str]]) -> str:
    """What a workflow run records, as one hash: the model name and every (step name, cache key). Two runs with
    the same plan key logged the same things; a run whose passes are all cached reuses the first one's record."""
    import hashlib

    return hashlib.sha256(json.dumps([register_as, steps]).encode()).hexdigest()[:32]


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every event of a finished job's events.jsonl (a cache entry keeps it)."""
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


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


@dataclass(frozen=True)
class RecordedRun:
    """An earlier run that recorded the same plan: its id and the URI of the model it logged."""

    run_id: str
    model_uri: str | None
    registered_version: str | None = None


class Tracker:
    """The workflow's MLflow run. Methods are no-ops when tracking is off, and when the tracker points to a run
    recorded earlier (`adopt`): that run is not written again.

    Two first runs on one new sqlite db would both run MLflow's schema migration and crash (or leave the db
    half-migrated): store creation, experiment lookup/creation and run creation happen under a file lock beside
    the db. Each run is tagged with its process (host:pid:start time); a run whose process is gone (kill -9)
    is closed as KILLED by the next run in the same experiment.
    """

    def __init__(
        self, tracking_uri: str | None, experiment: str, run_name: str, *, enabled: bool = True, start: bool = True
    ) -> None:
        """Opens the store and the experiment; with start=False the run is created later (`start`) or an earlier
        one adopted (`adopt`)."""
        self.enabled = enabled
        self.run_id: str | None = None
        self._logged: set[tuple[str, int]] = set()  # (metric, step) forwarded from jobs: each is logged once
        self.tracking_uri = tracking_uri
        self.notes: list[str] = []  # what the user should know once (a store repaired)
        self.run_name = run_name
        self.recorded = False  # True: run_id is an earlier run this one only points to
        self.model_uri: str | None = None  # the model this run logged (or the adopted run had logged)
        self.registry_uri: str | None = None  # where the model is registered (resolve_registry_uri)
        self.registered_version: str | None = None  # the version this run registered (or the adopted run had)
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
        # no mlflow.set_tracking_uri here: it is process-global (and exported to every subprocess started later),
        # so the next Tracker or Engine in this process would find this store; every call below names the store
        self.tracking_uri = tracking_uri = tracking_uri or resolve_tracking_uri(None, None)
        self.registry_uri = resolve_registry_uri(tracking_uri)
        if "://" in self.registry_uri:  # a registry server's password is masked wherever a library prints it
            from urllib.parse import urlsplit

            remember_secret(urlsplit(self.registry_uri).password)
        lock_path = _store_lock_path(tracking_uri)
        lock = FileLock(str(lock_path), timeout=300) if lock_path is not None else None
        if lock is not None:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        try:
            self.notes = prepare_sqlite_store(tracking_uri)  # whole, or rebuilt (aside)
            # the registry named too: MlflowClient(uri) alone reads the process's global registry URI
            self.client = mlflow.MlflowClient(tracking_uri, registry_uri=self.registry_uri)
            exp = self.client.get_experiment_by_name(experiment)  # creates / migrates the store (under the lock)
            exp_id = (
                exp.experiment_id
                if exp
                else self.client.create_experiment(experiment, artifact_location=local_artifact_root(tracking_uri))
            )
            self.experiment_id = exp_id
            self.closed_stale = self._close_dead_runs()
            if start:
                self.start({})
        finally:
            if lock is not None:
                lock.release()

    @property
    def writing(self) -> bool:
        return self.enabled and not self.recorded and self.run_id is not None

    def start(self, tags: dict[str, str]) -> None:
        """Create this workflow run's MLflow run."""
        if not self.enabled:
            return
        tags = {"orch.workflow": self.run_name, "orch.process": process_token(), **tags}
        self.run_id = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags).info.run_id

    def find_recorded(self, plan: str) -> RecordedRun | None:
        """The latest finished run of this experiment that recorded `plan` (tag orch.plan), or None."""
        if not self.enabled:
            return None
        try:
            runs = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`orch.plan` = '{plan}' and attributes.status = 'FINISHED'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
        except Exception:  # noqa: BLE001 - a store without tag search: a new run records it, as before
            return None
        if not runs:
            return None
        run = runs[0]
        tags = run.data.tags
        return RecordedRun(run.info.run_id, tags.get("orch.model_uri"), tags.get("orch.registered_version"))

    def adopt(self, run: RecordedRun) -> None:
        """Point to an earlier run instead of creating one: nothing is logged, `end` leaves it as it is."""
        self.run_id = run.run_id
        self.model_uri = run.model_uri
        self.registered_version = run.registered_version
        self.recorded = True

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
        if not self.writing or not params:
            return
        from mlflow.entities import Param

        items = [Param(k[:250], v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metric(self, name: str, value: float, step: int | None = None) -> None:
        if self.writing:
            self.client.log_metric(self.run_id, name, float(value), step=step or 0)

    def set_tag(self, key: str, value: str) -> None:
        if self.writing:
            self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: Path) -> None:
        if self.writing:
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
        elif event.get("type") == "param" and self.writing:
            self.client.log_param(self.run_id, (prefix + event["name"])[:250], str(event["value"])[:500])

    def resume(self, prefix: str) -> None:
        """A job resumed from a checkpoint: learn which steps of its metrics this run holds already (none for a
        fresh run; those of the earlier attempt when the run is the same, as on an Azure ML requeue)."""
        if not self.writing:
            return
        for name in self.client.get_run(self.run_id).data.metrics:
            if name.startswith(prefix):
                self._logged.update((name, m.step) for m in self.client.get_metric_history(self.run_id, name))

    def replay(self, events: list[dict[str, Any]], prefix: str) -> None:
        """A cached pass's recorded metrics and params, as its run logged them: every step of its loss history
        with the original step numbers and times (not one point at step 0); each (metric, step) once."""
        if not self.writing:
            return
        from mlflow.entities import Metric, Param

        metrics, params = [], {}
        for event in events:
            if event.get("type") == "metric":
                name, step = (prefix + event["name"])[:250], int(event.get("step") or 0)
                if (name, step) in self._logged:
                    continue
                self._logged.add((name, step))
                stamp = int(float(event.get("t") or 0) * 1000)
                metrics.append(Metric(name, float(event["value"]), stamp, step))
            elif event.get("type") == "param":
                params[(prefix + event["name"])[:250]] = str(event["value"])[:500]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limits: 1000 metrics, 100 params
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_model(self, model_dir: Path, model_format: str, register_as: str | None) -> str | None:
        """Log the final model as an MLflow pyfunc (ONNX GenAI or HF folder) in this run's store and register it in
        this run's registry; returns its URI (also kept as the run's tags orch.model_uri and
        orch.registered_version, for runs that point to this one later)."""
        if not self.writing:
            return None
        from orchestrator.engine.mlflow_model import log_model_folder

        assert self.run_id is not None and self.registry_uri is not None
        logged = log_model_folder(
            self.tracking_uri, self.registry_uri, self.run_id, model_dir, model_format, register_as
        )
        self.model_uri, self.registered_version = logged.model_uri, logged.version
        self.set_tag("orch.model_uri", self.model_uri)
        if logged.version:
            self.set_tag("orch.registered_version", logged.version)
        return self.model_uri

    def end(self, status: str) -> None:
        if self.writing:
            self.client.set_terminated(self.run_id, status=status)
