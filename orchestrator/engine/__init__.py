"""Plan and run a workflow's passes as Jobs on systems, then publish and track the result.

run: the Engine (plan, run, publish); steps: what it plans and reports; tracking/plots/mlflow_*: MLflow and the
loss chart; preflight (with model_check, data_config_check, outputs_check, tracking_check, devices): input checks
before anything runs; resources: model and data references made local; aml_driver: the whole engine run inside one
Azure ML job."""

from __future__ import annotations

from orchestrator.engine.run import Engine
from orchestrator.engine.steps import EngineError, QuietReporter, Reporter, RunSummary, Step, StepRecord

__all__ = ["Engine", "EngineError", "QuietReporter", "Reporter", "RunSummary", "Step", "StepRecord"]
