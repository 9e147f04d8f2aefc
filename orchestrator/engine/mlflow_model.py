"""Log the final model to MLflow as a pyfunc and register it in the registry of the store the run is tracked in.

MLflow's fluent API (`mlflow.start_run`, `mlflow.pyfunc.log_model`, `registered_model_name=`) reads the process's
global tracking and registry URIs: module globals that `mlflow.set_tracking_uri` / `set_registry_uri` set, and
the MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI variables they also write for subprocesses. A registered version
then lands wherever the last caller in the process (another Tracker, a notebook, a test) pointed them. So the
logging call runs with both pointed at this run's store and put back afterwards (`mlflow_store`), and the version
is created by a client that names its tracking and registry URIs.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PYFUNC_CODE = Path(__file__).with_name("mlflow_pyfunc.py")
URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
_GLOBALS = threading.RLock()  # one store at a time holds MLflow's process globals


@dataclass(frozen=True)
class LoggedModel:
    """What was logged: the model's URI (models:/<model id>) and, when registered, its name and version."""

    model_uri: str
    registered_name: str | None = None
    version: str | None = None


@contextlib.contextmanager
def mlflow_store(tracking_uri: str, registry_uri: str) -> Iterator[None]:
    """MLflow's process-global tracking and registry URIs point at one store for the block, then back to what they
    were (module globals and environment alike): nothing of this store is left for the next caller in the
    process, and no subprocess started later inherits it."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _GLOBALS:
        saved_tracking, saved_registry = tracking_utils._tracking_uri, registry_utils._registry_uri
        saved_env = {name: os.environ.get(name) for name in URI_VARIABLES}
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(registry_uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved_tracking)  # None unsets MLFLOW_TRACKING_URI as well
            registry_utils._registry_uri = saved_registry  # set_registry_uri(None) would leave the variable set
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def register_version(client: Any, name: str, model_uri: str, model_id: str | None, run_id: str) -> str:
    """A new version of registered model `name` (created on first use) for the logged model, in the client's
    registry; returns the version."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS, ErrorCode

    try:
        client.create_registered_model(name)
    except MlflowException as exc:  # a later version of the same name: the model is there already
        if exc.error_code not in (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(ALREADY_EXISTS)):
            raise
    version = client.create_model_version(name, source=model_uri, run_id=run_id, model_id=model_id)
    return str(version.version)


def log_model_folder(
    tracking_uri: str,
    registry_uri: str,
    run_id: str,
    model_dir: Path,
    model_format: str,
    register_as: str | None,
) -> LoggedModel:
    """Log `model_dir` under the run as a pyfunc named "model" in the run's store; register it in `registry_uri`
    when `register_as` is given."""
    import mlflow

    requirements = ["onnxruntime-genai"] if model_format == "onnx_genai" else ["torch", "transformers"]
    # the registry store looks the logged model up through the global tracking URI (MLflow's sqlalchemy registry
    # store builds a bare MlflowClient() for it): registration stays inside the block too. The version is created
    # here rather than by log_model(registered_model_name=...), whose registration prints "Successfully registered
    # model ..." / "Created version ..." to stderr with print(); orch says what it registered itself
    with mlflow_store(tracking_uri, registry_uri):
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_CODE),
                model_config={"format": model_format},
                artifacts={"model": str(model_dir)},
                pip_requirements=requirements,
            )
        version = None
        if register_as:
            client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
            version = register_version(client, register_as, info.model_uri, getattr(info, "model_id", None), run_id)
    return LoggedModel(info.model_uri, register_as if version else None, version)
