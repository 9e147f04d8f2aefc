"""Log the final model to MLflow as a pyfunc and register it in the model registry."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from pathlib import Path
from typing import Any

PYFUNC_CODE = Path(__file__).with_name("mlflow_pyfunc.py")
REGISTRY_CHATTER = re.compile(
    r"^(Successfully registered model '|Created version '|Registered model '.*' already exists)"
)


def log_model_folder(mlflow: Any, run_id: str, model_dir: Path, model_format: str, register_as: str | None) -> str:
    """Log `model_dir` under the run as a pyfunc named "model"; register it when `register_as` is given."""
    requirements = ["onnxruntime-genai"] if model_format == "onnx_genai" else ["torch", "transformers"]
    # MLflow prints "Successfully registered model ..." / "Created version ..." with its own print to stderr, not
    # through its logger (and its lazy imports turn its stream back on): at MLFLOW_LOGGING_LEVEL WARNING and above
    # (the CLI's default; -v lifts it) those lines are dropped here and everything else it wrote is passed on
    quiet = (os.environ.get("MLFLOW_LOGGING_LEVEL") or "INFO").upper() not in ("DEBUG", "INFO")
    captured = io.StringIO()
    muted = contextlib.redirect_stderr(captured) if quiet else contextlib.nullcontext()
    with muted, mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            model_config={"format": model_format},
            artifacts={"model": str(model_dir)},
            pip_requirements=requirements,
            registered_model_name=register_as,
        )
    kept = [ln for ln in captured.getvalue().splitlines(keepends=True) if not REGISTRY_CHATTER.match(ln)]
    if kept:
        sys.stderr.write("".join(kept))
    return info.model_uri
