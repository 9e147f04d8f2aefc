"""Log the final model to MLflow as a pyfunc and register it in the model registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PYFUNC_CODE = Path(__file__).with_name("mlflow_pyfunc.py")


def log_model_folder(mlflow: Any, run_id: str, model_dir: Path, model_format: str, register_as: str | None) -> str:
    """Log `model_dir` under the run as a pyfunc named "model"; register it when `register_as` is given."""
    requirements = ["onnxruntime-genai"] if model_format == "onnx_genai" else ["torch", "transformers"]
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_CODE),
            model_config={"format": model_format},
            artifacts={"model": str(model_dir)},
            pip_requirements=requirements,
            registered_model_name=register_as,
        )
    return info.model_uri
