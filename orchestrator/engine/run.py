"""The Engine: plan and run the pass chain: one Job per pass, cached by content, on the host; evaluation on the target.

Cache key of a pass = hash(pass type, pass version + code hash, normalized config, input model identity, the
content of the data it names, the environment's library versions). The input identity of a pass that follows
another is the previous pass's key (content-addressed by derivation), so the whole plan — which passes run and
which come from the cache — is known on the client before anything is submitted.
The engine never knows how a system moves bytes: it hands Jobs to `System.submit` and reads their results.
Its parts: steps (what is planned and reported), plan (steps and their cache keys), inputs (the input model and
data made local), devices (each step's device and execution providers on this host), shared_steps (the shared
cache's hits and uploads), execute (one step's job built and followed to its end), run_results (relative goals,
cost, prompt format), publish (output_dir and the manifest), preflight (every input checked first).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from orchestrator import __version__
from orchestrator.core.cache import Cache, SharedCache, folder_size
from orchestrator.core.job import EVENTS_FILE, JobResult, ModelArtifact, is_uri
from orchestrator.core.links import short, written_path
from orchestrator.core.redact import remember_secret, secret_parts
from orchestrator.core.secrets import split_secrets
from orchestrator.engine.devices import HostDevices
from orchestrator.engine.execute import run_step_job
from orchestrator.engine.inputs import data_files, input_model
from orchestrator.engine.plan import environment_for, for_accelerator, initial_steps, step_key
from orchestrator.engine.preflight import WorkflowCheck
from orchestrator.engine.publish import Publisher
from orchestrator.engine.run_results import baseline_comparison, final_prompt_format, step_cost
from orchestrator.engine.shared_steps import SharedSteps, needs_local
from orchestrator.engine.steps import (
    EngineError,
    QuietReporter,
    Reporter,
    RunSummary,
    Step,
    StepRecord,
    SystemNameError,
)
from orchestrator.engine.tracking import Tracker, flatten_params, plan_key, read_events, resolve_tracking_uri
from orchestrator.engine.weights_check import known_matches, remember_matches
from orchestrator.passes.registry import load_pass
from orchestrator.systems.base import System
from orchestrator.systems.registry import MAIN_KEYWORDS, is_azureml, make_system, system_config


class Engine:
    """Runs one workflow. `host`/`target` override the config's engine.host/target (system names or keywords)."""

    def __init__(
        self,
        workflow: Any,
        *,
        host: str | None = None,
        target: str | None = None,
        tracking_uri: str | None = None,
        tracking: bool = True,
        reporter: Reporter | None = None,
        model_name: str | None = None,
        shared_cache: SharedCache | None = None,
        planned_keys: dict[str, str] | None = None,
        node_price: Any = None,
    ) -> None:
        """shared_cache: a cache where the work runs, for every step (the Azure ML driver passes the workspace's);
        without it a step uses its system's own (`System.shared_cache`, e.g. AzureMLSystem's). planned_keys: step
        name -> cache key decided by the client that submitted this run (the driver job keeps the client's keys,
        so client and job agree on what is cached). node_price: the price of the compute every step runs on
        (the driver's; else each system's `node_price`)."""
        self.wf = workflow
        self.base_dir = Path(workflow.base_dir)
        eng = workflow.engine
        # a link loop in either folder is named by the pre-flight
        self.cache = Cache(written_path(self.base_dir, eng.cache_dir or ".orch/cache"))
        self.output_dir = written_path(self.base_dir, eng.output_dir) if eng.output_dir else None
        self.host_name = host or eng.host or "local"
        # Olive's rule, the target defaults to the host: a host given here (the CLI's --host) takes the evaluation
        # with it unless a target is given too; the config's engine.target pairs with the config's engine.host
        self.target_name = target or host or eng.target or self.host_name
        self.reporter: Reporter = reporter or QuietReporter()
        self.tracking_enabled = tracking
        mlflow_cfg = getattr(eng, "mlflow", None)
        self.tracking_uri = resolve_tracking_uri(
            tracking_uri, getattr(mlflow_cfg, "tracking_uri", None), base_dir=self.base_dir
        )
        self.experiment = getattr(mlflow_cfg, "experiment_name", None) or "orch"
        # the registered model's name follows the workflow: never one name shared by unrelated workflows
        self.register_as = (
            model_name
            or getattr(mlflow_cfg, "register_model_name", None)
            or getattr(workflow, "workflow_id", None)
            or (self.output_dir.name if self.output_dir is not None else None)
            or "workflow"
        )
        for value in split_secrets(workflow.to_json_dict())[1].values():  # tokens written into the config, and
            for part in secret_parts(value) or [value]:  # credentials inside URIs, masked in every line from now
                remember_secret(part)
        with contextlib.suppress(ValueError):  # a malformed URI is named by the pre-flight
            remember_secret(urlsplit(self.tracking_uri).password if "://" in self.tracking_uri else None)
        self._systems: dict[str, System] = {}
        self._data = {dc.name: dc for dc in workflow.data_configs}
        self._fetch = True  # False for a dry run: hub references are pinned (cache keys), nothing downloaded
        self._shared_override = shared_cache
        self._planned_keys = planned_keys
        self._node_price = node_price
        self.devices = HostDevices(workflow, self.host_name, self.target_name, self.system)
        self.shared_steps = SharedSteps(
            self.cache, self.shared_cache_for, lambda step, line: self.reporter.step_log(step, line)
        )
        self.publisher = Publisher(
            workflow, self.cache, self.output_dir, self.host_name, self.target_name, self.tracking_uri, self.register_as
        )

    # ---- helpers ----------------------------------------------------------------------------------------
    def system(self, name: str) -> System:
        """A system by workflow name, or by keyword (local/docker/aml: the first such system in the config)."""
        if name not in self._systems:
            type_name, cfg = self._system_config(name)
            self._systems[name] = make_system(
                type_name, cfg, base_dir=self.base_dir, cache_dir=self.cache.root, environment_for=environment_for
            )
        return self._systems[name]

    def shared_cache_for(self, step: Step) -> SharedCache | None:
        """The cache where this step's work runs, if its system keeps one (None: the local cache only)."""
        if self._shared_override is not None:
            return self._shared_override
        return self.system(step.system_name).shared_cache()

    def node_price_for(self, step: Step) -> Any:
        """The price per node-hour (systems.base.NodePrice) of the compute the step runs on, or None."""
        if self._node_price is not None:
            return self._node_price
        return self.system(step.system_name).node_price(load_pass(step.pass_type))

    def _system_config(self, name: str) -> tuple[str, dict[str, Any]]:
        """(type name, config) of a system by workflow name or keyword; SystemNameError (exit 2) if none."""
        found = system_config(name, {k: s.model_dump(mode="json") for k, s in self.wf.systems.items()})
        if found is None:
            known = ", ".join(dict.fromkeys([*self.wf.systems, *MAIN_KEYWORDS]))
            raise SystemNameError(f"--host/--target (engine.host/target) {name!r}: no such system; use one of {known}")
        return found

    def _fetches(self, system_name: str) -> bool:
        """Whether the engine downloads hub references for jobs on this system (not if the system's jobs do)."""
        return self._fetch and not self.system(system_name).fetches_hub_refs

    def _input_model(self) -> tuple[ModelArtifact, str]:
        """The workflow's input model as an artifact, and its identity for cache keys."""
        return input_model(
            self.wf.input_model, base_dir=self.base_dir, cache=self.cache, fetch=self._fetches(self.host_name)
        )

    def _data_files(
        self, names: list[str], system_name: str | None = None
    ) -> tuple[dict[str, dict[str, Any]], dict[str, str], list[str]]:
        """Json form of the named data configs, local data paths to hand the job, and their content hashes."""
        fetch = self._fetches(system_name or self.host_name)
        return data_files([self._data[n] for n in names], base_dir=self.base_dir, cache=self.cache, fetch=fetch)

    # ---- pre-flight -------------------------------------------------------------------------------------
    def preflight(self, *, tracking: bool = True) -> None:
        """Every input checked before anything is hashed, written or submitted (engine/preflight.py):
        raises PreflightError (one line: the field and the fix)."""
        for name in dict.fromkeys([self.host_name, self.target_name]):  # both named right, used or not
            self._system_config(name)
        check = WorkflowCheck(
            self.wf,
            base_dir=self.base_dir,
            cache_root=self.cache.root,
            output_dir=self.output_dir,
            host_name=self.host_name,
            target_name=self.target_name,
            providers=self.devices.providers(),
            tracking_uri=self.tracking_uri,
            matched=known_matches(self.cache.root),
        )
        check.run(tracking=tracking and self.tracking_enabled)
        self.devices.check(self._note)
        remember_matches(self.cache.root, check.matched)  # only once every check passed: a refusal writes nothing

    # ---- planning ---------------------------------------------------------------------------------------
    def plan(self) -> list[Step]:
        """Ordered steps with cache keys and hit/miss, decided on the client before anything is submitted."""
        steps = initial_steps(self.wf, self.host_name, self.target_name)
        _, identity = self._input_model()
        prev = identity
        for step in steps:
            pass_cls = load_pass(step.pass_type)
            step.data_names = pass_cls.data_refs(step.config, set(self._data))
            if self._planned_keys is not None:
                if step.name not in self._planned_keys:
                    raise EngineError(f"step {step.name!r} is not in the plan this run was submitted with")
                step.key = self._planned_keys[step.name]
            else:
                _, _, data_hashes = self._data_files(step.data_names, step.system_name)
                config = pass_cls.Config.model_validate(split_secrets(step.config)[0])  # a token never keys the cache
                requirements = pass_cls().requirements(config)
                self.system(step.system_name).require(step.pass_type, tuple(pass_cls.libraries))
                env = self.system(step.system_name).environment_fingerprint(
                    tuple(pass_cls.libraries),
                    environment=for_accelerator(requirements.environment, self.devices.accelerator(step.system_name)),
                )
                step.key = step_key(
                    step.pass_type,
                    pass_cls,
                    config,
                    prev,
                    data_hashes,
                    env,
                    accelerator=self.devices.accelerator(step.system_name),
                    processes=self.system(step.system_name).processes_for(pass_cls),
                    providers=self.devices.step_providers(step),
                )
            if step.role == "host":
                prev = step.key
        self.shared_steps.look_up(steps)  # every environment checked above, before the first shared-cache request
        return steps

    def _report_damaged(self) -> None:
        """Cache entries that failed their checks while planning were quarantined: said once, here."""
        for found in self.cache.damaged:
            self._note(
                f"cache entry {found.key[:16]} ({found.meta.get('pass') or 'a pass'}) was damaged: {found.reason}; "
                f"moved to {short(found.path)} (`orch cache clean` removes it), the pass runs again"
            )
        self.cache.damaged.clear()

    def _note(self, message: str) -> None:
        note = getattr(self.reporter, "note", None)
        if note is not None:
            note(message)

    def share_local_entries(self, steps: list[Step]) -> list[str]:
        """Steps cached on this machine only, saved into their system's shared cache before a job that runs there
        is submitted (shared_steps.SharedSteps.share_local_entries, from this workflow's input model)."""
        return self.shared_steps.share_local_entries(steps, self._input_model()[0])

    # ---- running ----------------------------------------------------------------------------------------
    def run(self, *, dry_run: bool = False) -> tuple[list[Step], RunSummary | None]:
        self.preflight(tracking=not dry_run)
        if not dry_run:  # an Azure ML system's workspace settings, before any pass starts (WorkspaceError: exit 2)
            for name in dict.fromkeys([self.host_name, self.target_name]):
                if is_azureml(self._system_config(name)[0]):
                    getattr(self.system(name), "settings", None)
        self._fetch = not dry_run
        steps = self.plan()
        self._report_damaged()
        self.reporter.plan(steps)
        if dry_run:
            return steps, None
        self.shared_steps.needed = needs_local(steps, publishes=self.output_dir is not None)
        self.cache.ensure()
        tracker = self._tracker(steps)
        for note in tracker.notes:  # a local store rebuilt
            self._note(note)
        records: list[StepRecord] = []
        model, input_identity = self._input_model()
        tracker.set_tag("orch.input_model", input_identity)
        status = "FAILED"
        try:
            for step in steps:
                record, out_model = self._run_step(step, model, tracker)
                records.append(record)
                if step.role == "host" and out_model is not None:
                    model = out_model
            final_metrics = {f"{r.name}/{k}": v for r in records for k, v in r.metrics.items()}
            final_metrics |= baseline_comparison(steps, records, tracker, self._note)
            costs = [r.cost_usd for r in records if r.cost_usd is not None]
            total = sum(costs) if costs else None
            if total is not None:
                final_metrics["cost_usd"] = total
                tracker.log_metric("cost_usd", total)
            summary = RunSummary(records, model, final_metrics, self.output_dir, tracker.run_id,
                                 input_identity=input_identity, cost_usd=total)  # fmt: skip
            summary.recorded, summary.model_uri = tracker.recorded, tracker.model_uri
            summary.registry_uri, summary.registered_version = tracker.registry_uri, tracker.registered_version
            summary.prompt_format = final_prompt_format(self._input_model()[0], steps, records)
            if self.output_dir is not None:
                self.publisher.publish(summary, records, steps, model, tracker)
            status = "FINISHED"
            return steps, summary
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            tracker.end(status)

    def _tracker(self, steps: list[Step]) -> Tracker:
        """The MLflow run of this workflow run. When every pass is cached and a finished run recorded the same
        plan, that run is pointed to and nothing is logged again (no new run, model copy or model version)."""
        plan = plan_key(self.register_as, [(s.name, s.key) for s in steps])
        tracker = Tracker(
            self.tracking_uri,
            self.experiment,
            getattr(self.wf, "workflow_id", None) or self.register_as,
            enabled=self.tracking_enabled,
            start=False,
        )
        recorded = tracker.find_recorded(plan) if all(s.cached for s in steps) else None
        if recorded is not None:
            tracker.adopt(recorded)
            return tracker
        tracker.start({"orch.plan": plan, "orch.host": self.host_name, "orch.target": self.target_name})
        tracker.log_params(flatten_params(self.wf.to_json_dict()))
        return tracker

    def _run_step(self, step: Step, model: ModelArtifact, tracker: Tracker) -> tuple[StepRecord, ModelArtifact | None]:
        self.reporter.step_start(step)
        started = time.time()
        shared = self.shared_cache_for(step)
        entry = self.cache.get(step.key)
        cached_in = "local" if entry is not None else ""
        if entry is None and step.key in self.shared_steps.remote and shared is not None:
            entry = self.shared_steps.fetch(step, model, shared)
            cached_in = shared.where if entry is not None else ""
        cost = None
        if entry is None:
            system = self.system(step.system_name)
            with self.cache.staging(step.key) as stage:
                entry = self.cache.get(step.key)  # a concurrent run may have finished it while we waited
                if entry is None:
                    self._execute(step, system, model, stage, tracker, shared)
                    result = JobResult.read(stage)
                    cost = step_cost(self.node_price_for(step), result)
                    if cost is not None:
                        result.metrics.update(cost)
                        result.write(stage)
                    meta = {"pass": step.name, "pass_type": step.pass_type, "system": step.system_name,
                            "orch": __version__, "resumed_from_step": step.resumed_from_step,
                            **({"cost_usd": cost["cost_usd"]} if cost else {})}  # fmt: skip
                    entry = self.cache.commit(step.key, stage, meta)
                    cached = False
                else:
                    cached, cached_in = True, "local"
            if not cached and shared is not None:
                self.shared_steps.publish(step, entry, model, shared)
        else:
            cached = True
        result = entry.result
        out_model = result.model.with_root(entry.path) if result.model else None
        events = read_events(entry.path / EVENTS_FILE)
        if cached:  # a cached pass's metrics belong in this run's record as its own run logged them
            tracker.replay(events, f"{step.name}/")
        # final metrics the pass did not stream (train_runtime_s, ...), at its last step: no step-0 point in a curve
        streamed = {e.get("name") for e in events if e.get("type") == "metric"}
        last_step = max((int(e.get("step") or 0) for e in events if e.get("type") == "metric"), default=0)
        for k, v in result.metrics.items():
            if k not in streamed:
                tracker.log_metric(f"{step.name}/{k}", v, last_step)
        record = StepRecord(
            name=step.name,
            pass_type=step.pass_type,
            system=step.system_name,
            cache_key=step.key,
            cached=cached,
            status=result.status.value,
            duration_s=result.duration_s if not cached else time.time() - started,
            metrics=result.metrics,
            versions=result.versions,
            output=out_model.model_dump(mode="json") if out_model else None,
            output_size_bytes=folder_size(out_model.path)
            if out_model and not is_uri(out_model.path) and Path(out_model.path).exists()
            else 0,
            resumed_from_step=entry.meta.get("resumed_from_step"),  # how the entry was made, cached or not
            cost_usd=cost["cost_usd"] if cost else None,
            cached_in=cached_in if cached else "",
        )
        tracker.log_metric(f"{step.name}/duration_s", result.duration_s)
        if record.output_size_bytes:
            tracker.log_metric(f"{step.name}/model_size_bytes", record.output_size_bytes)
        self.reporter.step_end(step, record)
        return record, out_model

    def _execute(
        self,
        step: Step,
        system: System,
        model: ModelArtifact,
        stage: Path,
        tracker: Tracker,
        shared: SharedCache | None,
    ) -> None:
        """The step's job (execute.run_step_job) with what the engine knows of it: its data, whether its system
        passes the hub token, the device and execution providers it gets on this host, the log level."""
        configs, files, _ = self._data_files(step.data_names, step.system_name)
        sys_cfg = self.wf.systems.get(step.system_name)
        run_step_job(
            step, system, model, stage, tracker, self.reporter, self.cache, shared,
            configs=configs,
            files=files,
            hf_token=bool(sys_cfg is not None and getattr(sys_cfg, "hf_token", False)),
            accelerator=self.devices.accelerator(step.system_name),
            providers=self.devices.step_providers(step),
            log_level=int(getattr(self.wf.engine, "log_severity_level", 3) or 3),
        )  # fmt: skip

    # ---- outputs ----------------------------------------------------------------------------------------
    def export(self, summary: RunSummary, dest: Path | None = None) -> None:
        """Copy the final model into dest (default output_dir): adapter/ + model/ for an adapter, else model/."""
        self.publisher.export(summary, dest)
