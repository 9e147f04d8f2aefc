"""Log the final model to MLflow as a pyfunc and register it in the model registry."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PYFUNC_CODE = Path(__file__).with_name("mlflow_pyfunc.py")


def log_model_folder(mlflow: Any, run_id: str, model_dir: Path, model_format: str, register_as: str | None) -> str:
    """Log `model_dir` under the run as a pyfunc named "model"; register it when `register_as` is given."""
    from mlflow.utils import logging_utils

    requirements = ["onnxruntime-genai"] if model_format == "onnx_genai" else ["torch", "transformers"]
    # MLflow prints "Successfully registered model ..." / "Created version ..." with its own print (not its
    # logger): at MLFLOW_LOGGING_LEVEL WARNING and above (the CLI's default, -v lifts it) its stream is muted
    quiet = (os.environ.get("MLFLOW_LOGGING_LEVEL") or "INFO").upper() not in ("DEBUG", "INFO")
    if quiet:
        logging_utils.disable_logging()
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_CODE),
                model_config={"format": model_format},
                artifacts={"model": str(model_dir)},
                pip_requirements=requirements,
                registered_model_name=register_as,
            )
    finally:
        if quiet:
            logging_utils.enable_logging()
    return info.model_uri
