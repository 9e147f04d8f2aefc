"""The Azure ML driver job: why one driver job per submit.

`orch submit` must return once the work is queued, and a workflow is several passes whose order and cache are
orch's business. So submit sends ONE command job that runs the whole workflow on the compute
(`python -m orchestrator.cli aml-drive ...`, which is `orch run --host local --target local` with the job's bound
inputs put in place of the workflow's Azure references), with the registry model and datastore data bound as job
inputs, the final model as the job output `model`, and the workflow's metrics logged to the job's own MLflow run
(studio charts, `orch status`). Before submitting, the client plans the run against its own cache and the
workspace cache (`orch-cache/` in the default datastore, systems/azureml/workspace_cache.py): a fully cached run submits
nothing and exports the cached model right away; otherwise the job gets the client's plan (`plan.json`: every
step's cache key), so the driver takes what the workspace holds and runs only the rest, whichever client submitted
it. Inside the job the driver downloads only what a step that runs needs, saves every pass it ran to the workspace
cache, and saves a running pass's checkpoints there as they are written: a requeued attempt (preemption) or a
later submit (after a cancel or a failure) resumes from the newest one. Each pass's cost (nodes x hours x the VM
size's price) is logged with its metrics.
(`orch run --host aml` is the other shape: one command job per pass, chained by reference, blocking.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

DRIVER_OUTPUT = "model"
BIND_PREFIX = "${orch.input:"  # a placeholder in the driver's workflow.json, replaced by a bound input path
PLAN_FILE = "plan.json"  # the client's plan in the code snapshot: {"keys": {step: cache key}}
ENV_PRICE = "ORCH_NODE_PRICE"  # the driver node's price (systems.base.NodePrice as JSON): not a secret
RESUMED_RX = re.compile(r"resumed from step (\d+)")


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


def plan_rows(steps: list[Any]) -> list[dict[str, Any]]:
    """What `orch submit --dry-run` shows and returns (--json): each step, its key, where it is cached."""
    return [{"pass": s.name, "type": s.pass_type, "key": s.key, "cached": s.cached, "where": s.where or "runs"}
            for s in steps]  # fmt: skip


def _arm_endpoint(system: Any) -> str:
    """The cloud's resource manager endpoint, for the job's own datastore lookup (not a secret)."""
    meta = getattr(system.settings, "cloud_metadata", None) or {}
    if meta.get("resource_manager"):
        return str(meta["resource_manager"])
    try:
        from azure.ai.ml._azure_environments import _get_base_url_from_metadata

        return str(_get_base_url_from_metadata())
    except Exception:  # noqa: BLE001 - the public cloud
        return "https://management.azure.com/"


def submit_workflow(
    config: Path,
    *,
    host: str | None = None,
    target: str | None = None,
    name: str | None = None,
    force: bool = False,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Plan on the client; if anything must run, submit one driver job and return {name, studio_url, ...}.
    dry_run: the plan only ({"plan": [...]}: each pass cached here, cached in the workspace, or to run).

    Exactly once: the job is named after its definition (plan, code snapshot, inputs, environment, compute), so
    an unchanged workflow whose job is still live is attached to (`attached: True`) instead of submitted twice,
    unless `force`; a PUT whose answer was lost is found by that name on the retry (create_job_once)."""
    from azure.ai.ml import Input, Output

    from orchestrator.engine import Engine
    from orchestrator.olive import load_workflow
    from orchestrator.systems.azureml.jobspec import OUTPUT_MODE, input_for
    from orchestrator.systems.azureml.names import claim_job_name, definition_name, output_uri
    from orchestrator.systems.azureml.snapshot import code_snapshot
    from orchestrator.systems.azureml.states import status_text

    wf = load_workflow(config)
    engine = Engine(wf, host=host or "aml", target=target or host or "aml", tracking=False)
    steps = engine.plan()
    system = engine.system(engine.host_name)
    shared = system.shared_cache()
    if dry_run:
        return {"name": None, "dry_run": True, "plan": plan_rows(steps),
                "workspace_cache": shared.location if shared is not None else None}  # fmt: skip
    if shared is not None:
        engine.share_local_entries(steps)  # what only this machine has: the job finds it in the workspace
    if steps and all(s.cached for s in steps):
        _, summary = engine.run()
        return {"name": None, "cached": len(steps), "output_dir": str(summary.output_dir) if summary else None,
                "plan": plan_rows(steps)}  # fmt: skip
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
    system.check_compute()
    if shared is not None:  # where the job finds the workspace cache; it reaches it with its own identity
        from orchestrator.systems.azureml.cache_datastore import ENV_ARM, ENV_CACHE

        env[ENV_CACHE] = shared.location
        env[ENV_ARM] = _arm_endpoint(system)
    price = system.node_price(None)
    if price is not None:
        env[ENV_PRICE] = json.dumps(dataclasses.asdict(price))
    plan = {"keys": {s.name: s.key for s in steps}}
    code = code_snapshot(engine.cache.root, {"workflow.json": json.dumps(doc, indent=2).encode(),
                                             PLAN_FILE: json.dumps(plan, indent=1).encode()})  # fmt: skip
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
              "orch.plan": json.dumps([[s.name, s.key[:16], s.where or "runs"] for s in steps])},
        environment_variables=env,
        reads_hub=reads_hub(doc),
    )  # fmt: skip
    return {
        "name": created.name,
        "studio_url": getattr(created, "studio_url", None),
        "status": status_text(created.status),
        "attached": False,
        "plan": plan_rows(steps),
    }


def reads_hub(doc: dict[str, Any]) -> bool:
    """Whether the driver workflow reads a Hugging Face reference (its job then reaches the hub)."""
    from orchestrator.core.hub import is_dataset_id

    model_path = (doc.get("input_model") or {}).get("model_path")
    return (isinstance(model_path, dict) and model_path.get("type") == "hf_hub") or any(
        is_dataset_id((dc.get("load_dataset_config") or {}).get("data_name")) for dc in doc.get("data_configs") or []
    )


# ---- the driver (runs on the compute) -----------------------------------------------------------------------
_SAY_LOCK = threading.Lock()


def say(line: str) -> None:
    """One whole line to the job log. print() writes the text and its newline separately, so a line from the
    checkpoint-upload thread could land between them and glue two lines together (a loss line lost to a parser)."""
    with _SAY_LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


class DriverReporter:
    """The engine's progress inside the driver job: lines to the job log, metrics to the job's MLflow run.

    A metric is logged once per (name, step) in the run: a requeued attempt of the job (Azure ML keeps its MLflow
    run) replays what the first attempt logged, and those points are skipped (the run's history is read once
    per metric). A pass that resumed (the engine's step_note) gets `<pass>/resumed_from_step`."""

    def __init__(self, attempt: int = 1, price: Any = None) -> None:
        self.run_id = os.environ.get("MLFLOW_RUN_ID")
        self.client = None
        self.attempt = attempt
        self._logged: dict[str, set[int]] = {}
        self._counters: dict[str, int] = {}
        if self.run_id:
            import mlflow

            self.client = mlflow.MlflowClient()
            if price is not None:
                self._safe(lambda: self.client.set_tag(self.run_id, "orch.price", price.describe()))

    def _safe(self, fn: Any) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - tracking is not worth failing the workflow
            say(f"orch: mlflow: {type(exc).__name__}: {str(exc)[:200]}")

    def _steps_logged(self, name: str) -> set[int]:
        if name not in self._logged:
            self._logged[name] = set()
            if self.client is not None:  # a requeued attempt finds the points its first attempt logged
                with contextlib.suppress(Exception):  # a metric the run does not have yet
                    self._logged[name] = {m.step for m in self.client.get_metric_history(self.run_id, name)}
        return self._logged[name]

    def log_metric(self, name: str, value: float, step: int = 0) -> None:
        if self.client is None:
            return
        done = self._steps_logged(name)
        if step in done:
            return
        done.add(step)
        self._safe(lambda: self.client.log_metric(self.run_id, name, float(value), step=step))

    def plan(self, steps: list[Any]) -> None:
        for s in steps:
            verdict = "cached" if s.cached else "runs"
            if self.attempt == 1:
                say(f"orch: plan {s.name} ({s.pass_type}) {verdict}")
            else:  # one plan line per pass in the job's log, whatever happens to the job
                say(f"orch: attempt {self.attempt}: {s.name} ({s.pass_type}) {verdict}")
        remote = [s.name for s in steps if s.cached and s.where not in ("", "local")]
        if remote:
            say(f"orch: cached in the workspace: {', '.join(remote)}")

    def step_start(self, step: Any) -> None:
        say(f"orch: >> {step.name} ({step.pass_type})")

    def step_progress(self, step: Any, done: int, total: int, desc: str, **_: Any) -> None:
        """Nothing: the pass's job log, printed by step_log, carries its progress lines (orchestrator.runner)."""

    def step_log(self, step: Any, line: str) -> None:
        say(f"[{step.name}] {line}")

    def step_note(self, step: Any, message: str) -> None:
        """A line the user must see; `resumed from step N` also becomes `<pass>/resumed_from_step` (orch status)."""
        say(f"orch: {step.name} {message} (attempt {self.attempt})")
        m = RESUMED_RX.search(message)
        if m:
            self.log_metric(f"{step.name}/resumed_from_step", int(m[1]), int(m[1]))

    def step_metric(self, step: Any, name: str, value: float, at: int | None = None) -> None:
        key = f"{step.name}/{name}"
        if at is None:
            self._counters[key] = self._counters.get(key, -1) + 1
            at = self._counters[key]
        self.log_metric(key, value, int(at))

    def note(self, message: str) -> None:
        say(f"note: {message}")

    def step_end(self, step: Any, record: Any) -> None:
        cost = f" (${record.cost_usd:.4f})" if record.cost_usd is not None else ""
        where = f" ({record.cached_in})" if record.cached and record.cached_in not in ("", "local") else ""
        say(f"orch: << {step.name} {record.status}{where} in {record.duration_s:.1f}s{cost}")
        self.log_metric(f"{step.name}/duration_s", record.duration_s)
        if not record.cached:
            for k in ("cost_usd", "tokens_per_usd"):
                if k in record.metrics:
                    self.log_metric(f"{step.name}/{k}", record.metrics[k])


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
        say("orch: hf_token read from Key Vault")
    doc = _substitute(json.loads(config.read_text()), bound)
    wf = load_workflow(doc, base_dir=Path.cwd())
    plan_path = config.with_name(PLAN_FILE)
    keys = json.loads(plan_path.read_text())["keys"] if plan_path.is_file() else None
    shared, attempt = None, 1
    from orchestrator.systems.azureml.cache_datastore import ENV_CACHE
    from orchestrator.systems.azureml.workspace_cache import WorkspaceCache

    if os.environ.get(ENV_CACHE):
        shared = WorkspaceCache.in_job(os.environ[ENV_CACHE])
        attempt = shared.count_attempt(os.environ.get("AZUREML_RUN_ID") or "job")
        say(f"orch: workspace cache {shared.location} (attempt {attempt})")
    price = None
    if os.environ.get(ENV_PRICE):
        from orchestrator.systems.base import NodePrice

        price = NodePrice(**json.loads(os.environ[ENV_PRICE]))
        say(f"orch: priced as {price.describe()}")
    reporter = DriverReporter(attempt, price)
    engine = Engine(wf, host="local", target="local", tracking=False, reporter=reporter, shared_cache=shared,
                    planned_keys=keys, node_price=price)  # fmt: skip
    started = time.time()
    _, summary = engine.run()
    if summary is not None:
        for k, v in summary.metrics.items():
            reporter.log_metric(k, v)
        cost = f"; cost ${summary.cost_usd:.4f}" if summary.cost_usd is not None else ""
        say(f"orch: workflow finished in {time.time() - started:.1f}s{cost}; output {summary.output_dir}")
    return 0
