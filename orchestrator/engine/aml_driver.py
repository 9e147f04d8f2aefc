"""The Azure ML driver job: why one driver job per submit.

`orch submit` must return once the work is queued, and a workflow is several passes whose order and cache are
orch's business. So submit sends ONE command job that runs the whole workflow on the compute
(`python -m orchestrator.cli aml-drive ...`, which is `orch run --host local --target local` with the job's bound
inputs put in place of the workflow's Azure references), with the registry model and datastore data bound as job
inputs, the final model as the job output `model`, and the workflow's metrics logged to the job's own MLflow run
(studio charts, `orch status`). Before submitting, the client plans the run against its own cache: a fully cached
run submits nothing and exports the cached model right away.
(`orch run --host aml` is the other shape: one command job per pass, chained by reference, blocking.)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

DRIVER_OUTPUT = "model"
BIND_PREFIX = "${orch.input:"  # a placeholder in the driver's workflow.json, replaced by a bound input path


# ---- submit ------------------------------------------------------------------------------------------------
def _driver_workflow(wf: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """The workflow as the driver job sees it, and {input name: local path or azureml reference} to bind.

    Model and data references become placeholders that the driver replaces with the bound input paths; the
    run is local on the compute, its output folder is the job output."""
    from orchestrator.core import hub
    from orchestrator.engine.resources import is_remote
    from orchestrator.systems.azureml.download import reference_uri

    doc = wf.to_json_dict()
    binds: dict[str, str] = {}
    im = doc["input_model"]
    ref = wf.input_model.model_ref
    dumped = ref.model_dump(mode="json", exclude_none=True) if hasattr(ref, "model_dump") else ref
    if is_remote(dumped):
        binds["model"] = reference_uri(dumped)
    elif getattr(ref, "type", None) == "hf_hub":  # the driver downloads it on the compute, at the client's commit
        pinned, _ = hub.pin(hub.HubRef(ref.name, "model", ref.revision), field="input_model.model_path")
        im["model_path"] = {"type": "hf_hub", "name": ref.name, "revision": pinned.sha}
        hf = im.get("hf_config") or {}
        for kwargs in (im.get("load_kwargs"), hf.get("from_pretrained_args"), hf.get("model_loading_args")):
            if isinstance(kwargs, dict):
                kwargs.pop("revision", None)  # the pinned commit above replaces it
    else:
        binds["model"] = str(getattr(ref, "path", ref))
    if "model" in binds:
        im["model_path"] = f"{BIND_PREFIX}model}}"
    if im.get("adapter_path"):
        binds["adapter"] = im["adapter_path"]
        im["adapter_path"] = f"{BIND_PREFIX}adapter}}"
    for i, dc in enumerate(doc.get("data_configs") or []):
        params = dc.get("load_dataset_config") or {}
        if hub.is_dataset_id(params.get("data_name")):  # read from the hub on the compute, at the client's commit
            field = f"data_configs.{dc.get('name')}.load_dataset_config.data_name"
            pinned, _ = hub.pin(hub.HubRef(params["data_name"], "dataset", params.get("revision")), field=field)
            params["revision"] = pinned.sha
            continue
        for key in ("data_files", "data_dir"):
            value = params.get(key)
            if value is None:
                continue
            name = f"data_{i}_{key}"
            if isinstance(value, dict) or (isinstance(value, str) and value.startswith("azureml:")):
                binds[name] = reference_uri(value)
            elif isinstance(value, str) and Path(value).exists():
                binds[name] = value
            else:
                continue
            params[key] = f"{BIND_PREFIX}{name}}}"
    doc["systems"] = {"local": {"type": "LocalSystem"}}
    engine = doc.setdefault("engine", {})
    engine.update(host="local", target="local", cache_dir=".orch-cache", output_dir=f"{BIND_PREFIX}output}}")
    engine.pop("mlflow", None)
    doc.pop("azureml_client", None)
    return doc, binds


def submit_workflow(
    config: Path, *, host: str | None = None, target: str | None = None, name: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Plan on the client; if anything must run, submit one driver job and return {name, studio_url, ...}.

    Exactly once: the job is named after its definition (plan, code snapshot, inputs, environment, compute), so
    an unchanged workflow whose job is still live is attached to (`attached: True`) instead of submitted twice,
    unless `force`; a PUT whose answer was lost is found by that name on the retry (create_job_once)."""
    from azure.ai.ml import Input, Output

    from orchestrator.engine import Engine
    from orchestrator.olive import load_workflow
    from orchestrator.systems.azureml.system import (
        OUTPUT_MODE,
        claim_job_name,
        code_snapshot,
        definition_name,
        input_for,
        output_uri,
        status_text,
    )

    wf = load_workflow(config)
    engine = Engine(wf, host=host or "aml", target=target or host or "aml", tracking=False)
    steps = engine.plan()
    if steps and all(s.cached for s in steps):
        _, summary = engine.run()
        return {"name": None, "cached": len(steps), "output_dir": str(summary.output_dir) if summary else None}
    system = engine.system(engine.host_name)
    doc, binds = _driver_workflow(wf)
    inputs: dict[str, Any] = {}
    args = [
        "python -m orchestrator.cli aml-drive --config workflow.json",
        f"--bind output=${{{{outputs.{DRIVER_OUTPUT}}}}}",
    ]
    for key, value in binds.items():
        kind, path = input_for(value)
        inputs[key] = Input(type=kind, path=path)
        args.append(f"--bind {key}=${{{{inputs.{key}}}}}")
    env: dict[str, str] = {}
    used = {engine.host_name, engine.target_name}
    if any(getattr(wf.systems.get(n), "hf_token", False) for n in used):  # the systems this run uses, no other
        env["ORCH_HF_TOKEN_SOURCE"] = system.secret_sources(["hf_token"])["hf_token"]  # a reference, not a value
    code = code_snapshot(engine.cache.root, {"workflow.json": json.dumps(doc, indent=2).encode()})
    system.check_compute()
    if name:
        job_name, live = name, None
    else:
        definition = {"code": code.name, "binds": binds, "command": args, "env": sorted(env),
                      "environment": system.environment_id(), "compute": system.compute}  # fmt: skip
        job_name, live = claim_job_name(system.ml, definition_name(wf.workflow_id or "workflow", definition),
                                        force=force)  # fmt: skip
    if live is not None:
        return {"name": live.name, "studio_url": getattr(live, "studio_url", None),
                "status": status_text(live.status), "attached": True}  # fmt: skip
    created = system.submit_command(
        name=job_name,
        command=" ".join(args),
        code=code,
        inputs=inputs,
        outputs={DRIVER_OUTPUT: Output(type="uri_folder", path=output_uri(job_name, DRIVER_OUTPUT), mode=OUTPUT_MODE)},
        display_name=f"orch {wf.workflow_id or 'workflow'}",
        tags={"orch.workflow": wf.workflow_id or "workflow", "orch.kind": "driver",
              "orch.plan": json.dumps([[s.name, s.key[:16], s.cached] for s in steps])},
        environment_variables=env,
        reads_hub=reads_hub(doc),
    )  # fmt: skip
    return {
        "name": created.name,
        "studio_url": getattr(created, "studio_url", None),
        "status": status_text(created.status),
        "attached": False,
    }


def reads_hub(doc: dict[str, Any]) -> bool:
    """Whether the driver workflow reads a Hugging Face reference (its job then reaches the hub)."""
    from orchestrator.core.hub import is_dataset_id

    model_path = (doc.get("input_model") or {}).get("model_path")
    return (isinstance(model_path, dict) and model_path.get("type") == "hf_hub") or any(
        is_dataset_id((dc.get("load_dataset_config") or {}).get("data_name")) for dc in doc.get("data_configs") or []
    )


# ---- the driver (runs on the compute) -----------------------------------------------------------------------
class DriverReporter:
    """The engine's progress inside the driver job: lines to the job log, metrics to the job's MLflow run."""

    def __init__(self) -> None:
        self.run_id = os.environ.get("MLFLOW_RUN_ID")
        self.client = None
        if self.run_id:
            import mlflow

            self.client = mlflow.MlflowClient()

    def log_metric(self, name: str, value: float, step: int = 0) -> None:
        if self.client is not None:
            try:
                self.client.log_metric(self.run_id, name, float(value), step=step)
            except Exception as exc:  # noqa: BLE001 - a metric is not worth failing the workflow
                print(f"orch: could not log metric {name}: {exc}", flush=True)

    def plan(self, steps: list[Any]) -> None:
        for s in steps:
            print(f"orch: plan {s.name} ({s.pass_type}) {'cached' if s.cached else 'runs'}", flush=True)

    def step_start(self, step: Any) -> None:
        print(f"orch: >> {step.name} ({step.pass_type})", flush=True)

    def step_progress(self, step: Any, done: int, total: int, desc: str, **_: Any) -> None:
        """Nothing: the pass's job log, printed by step_log, carries its progress lines (orchestrator.runner)."""

    def step_log(self, step: Any, line: str) -> None:
        print(f"[{step.name}] {line}", flush=True)

    def step_metric(self, step: Any, name: str, value: float) -> None:
        self._steps = getattr(self, "_steps", {})
        key = f"{step.name}/{name}"
        self._steps[key] = self._steps.get(key, -1) + 1
        self.log_metric(key, value, self._steps[key])

    def note(self, message: str) -> None:
        print(f"note: {message}", flush=True)

    def step_end(self, step: Any, record: Any) -> None:
        print(f"orch: << {step.name} {record.status} in {record.duration_s:.1f}s", flush=True)
        self.log_metric(f"{step.name}/duration_s", record.duration_s)


def _substitute(obj: Any, binds: dict[str, str]) -> Any:
    if isinstance(obj, dict):
        return {k: _substitute(v, binds) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, binds) for v in obj]
    if isinstance(obj, str) and obj.startswith(BIND_PREFIX) and obj.endswith("}"):
        key = obj[len(BIND_PREFIX) : -1]
        if key not in binds:
            raise SystemExit(f"orch: error: workflow.json needs input {key!r} but the job did not bind it")
        return binds[key]
    return obj


def drive(config: Path, binds: list[str]) -> int:
    """Run the workflow locally on the compute with the job's bound inputs (the submitted driver job's command)."""
    from orchestrator.engine import Engine
    from orchestrator.olive import load_workflow

    bound = dict(b.split("=", 1) for b in binds)
    source = os.environ.pop("ORCH_HF_TOKEN_SOURCE", None)
    if source:
        from orchestrator.core.secrets import resolve_secret

        os.environ["HF_TOKEN"] = resolve_secret(source)  # the value lives in this process tree only
        print("orch: hf_token read from Key Vault", flush=True)
    doc = _substitute(json.loads(config.read_text()), bound)
    wf = load_workflow(doc, base_dir=Path.cwd())
    reporter = DriverReporter()
    engine = Engine(wf, host="local", target="local", tracking=False, reporter=reporter)
    started = time.time()
    _, summary = engine.run()
    if summary is not None:
        for k, v in summary.metrics.items():
            reporter.log_metric(k, v)
        print(f"orch: workflow finished in {time.time() - started:.1f}s; output {summary.output_dir}", flush=True)
    return 0


