"""MLflow: one MLflow run per workflow run; metrics forwarded live from jobs; the final model logged + registered.

Tracking URI precedence: --tracking-uri flag > engine.mlflow.tracking_uri in the config > MLFLOW_TRACKING_URI >
a local store in the working directory (sqlite:///mlruns.db, which also holds the model registry).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SECRET_HINTS = ("token", "secret", "password", "key", "credential", "sas")


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
        out[prefix] = json.dumps(obj, default=str)[:500]
    else:
        out[prefix] = str(obj)[:500]
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


class Tracker:
    """The workflow's MLflow run. Methods are no-ops when tracking is off."""

    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.run_id: str | None = None
        self.tracking_uri = tracking_uri
        if not enabled:
            return
        import logging

        import mlflow

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        self.client = mlflow.MlflowClient(tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        self.experiment_id = exp_id
        self.run_id = self.client.create_run(exp_id, run_name=run_name, tags={"orch.workflow": run_name}).info.run_id

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
        from orchestrator.mlflow_model import log_model_folder

        return log_model_folder(self.mlflow, self.run_id, model_dir, model_format, register_as)

    def end(self, status: str) -> None:
        if self.enabled:
            self.client.set_terminated(self.run_id, status=status)
