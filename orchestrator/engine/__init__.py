"""Plan and run a workflow's passes as Jobs on systems, then publish and track the result.

run: the Engine (plan, run, publish); tracking/plots/mlflow_*: MLflow and the loss chart; preflight: input
checks before anything runs; resources: model and data references made local; aml_driver: the whole engine
run inside one Azure ML job."""

from __future__ import annotations

from orchestrator.engine.run import (
    Engine,
    EngineError,
    QuietReporter,
    Reporter,
    RunSummary,
    Step,
    StepRecord,
)

__all__ = ["Engine", "EngineError", "QuietReporter", "Reporter", "RunSummary", "Step", "StepRecord"]
