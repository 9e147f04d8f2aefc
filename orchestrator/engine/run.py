"""The Engine: plan and run the pass chain: one Job per pass, cached by content, on the host; evaluation on the target.

Cache key of a pass = hash(pass type, pass version + code hash, normalized config, input model identity, the
content of the data it names, the environment's library versions). The input identity of a pass that follows
another is the previous pass's key (content-addressed by derivation), so the whole plan — which passes run and
which come from the cache — is known on the client before anything is submitted.
The engine never knows how a system moves bytes: it hands Jobs to `System.submit` and reads their results.
Its parts: steps (what is planned and reported), plan (steps and their cache keys), inputs (the input model and
data made local), execute (one job followed to its end), publish (output_dir and the manifest), preflight.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from orchestrator import __version__
from orchestrator.core.cache import Cache, CacheEntry, SharedCache, SharedEntry, folder_size, result_from_portable
from orchestrator.core.errors import RunFailure
from orchestrator.core.gpu import cuda_available, wants_gpu
from orchestrator.core.job import EVENTS_FILE, Job, JobResult, JobTracking, ModelArtifact, is_uri
from orchestrator.core.links import real, short
from orchestrator.core.prompt import PromptFormat, read_prompt_format
from orchestrator.core.redact import remember_secret, secret_parts
from orchestrator.core.secrets import CONFIG_SECRET, secret_files, split_secrets
from orchestrator.engine.execute import follow_job
from orchestrator.engine.inputs import data_files, input_model
from orchestrator.engine.plan import environment_for, for_accelerator, initial_steps, step_key
from orchestrator.engine.preflight import PreflightError, WorkflowCheck
from orchestrator.engine.publish import Publisher
from orchestrator.engine.steps import (  # noqa: F401  (re-exported: the engine's public names)
    EVALUATE,
    INPUT_EVAL_STEP,
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


def safe_name(name: str) -> str:
    """A pass name as a file / container name: "a/b c" -> "a_b_c" (a '/' would make the job's log a subfolder)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:64] or "pass"


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
        self.cache = Cache(self._abs(eng.cache_dir or ".orch/cache"))
        self.output_dir = self._abs(eng.output_dir) if eng.output_dir else None
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
        self._remote: dict[str, SharedEntry] = {}  # key -> committed shared entry found while planning
        self._needed: set[str] = set()  # keys whose shared entry must be local (a later step runs on it here)
        self.publisher = Publisher(
            workflow, self.cache, self.output_dir, self.host_name, self.target_name, self.tracking_uri, self.register_as
        )

    # ---- helpers ----------------------------------------------------------------------------------------
    def _abs(self, p: str | Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else real(self.base_dir / p)  # a link loop is named by the pre-flight

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
            providers=self._providers(),
            tracking_uri=self.tracking_uri,
            matched=known_matches(self.cache.root),
        )
        check.run(tracking=tracking and self.tracking_enabled)
        self._check_devices()
        remember_matches(self.cache.root, check.matched)  # only once every check passed: a refusal writes nothing

    def _check_devices(self) -> None:
        """A system on this host that asks for a GPU this host lacks: a CUDA-only pass is refused now (one line,
        what to use instead), the others run on CPU in their CPU environment, said once. Never a GPU environment
        built (CUDA wheels downloaded) for a machine that cannot use it."""
        said: set[str] = set()
        for step in initial_steps(self.wf, self.host_name, self.target_name):
            if step.role != "host" or not self._on_this_host(step.system_name):
                continue
            pass_cls = load_pass(step.pass_type)
            req = pass_cls().requirements(pass_cls.Config.model_validate(step.config))
            if req.cuda and not cuda_available():
                why = req.without_cuda or f"{step.pass_type} needs a CUDA GPU; run it on a GPU system"
                raise PreflightError(f"passes.{step.name} ({step.pass_type}): {why}")
            if step.system_name in said or not self._gpu_missing(step.system_name):
                continue
            said.add(step.system_name)
            env = for_accelerator(req.environment, "cpu")
            moved = f" (environment {req.environment} -> {env})" if env != req.environment else ""
            self._note(
                f"system {step.system_name!r} asks for a GPU and this host has no CUDA GPU: its passes run on the "
                f"CPU{moved}; run on a GPU host (or --host aml) for the GPU path"
            )
        steps = initial_steps(self.wf, self.host_name, self.target_name)
        for step in steps:
            if step.role == "host" and self._step_providers(step) != self._providers():
                self._note(
                    f"passes.{step.name} ({step.pass_type}) times the model with CUDAExecutionProvider and this host "
                    "has no CUDA GPU: it runs on CPUExecutionProvider (its timings are the CPU's)"
                )
        evaluates = any(s.role == "target" for s in steps)
        if evaluates and self._cpu_evaluation():
            self._note(
                f"target {self.target_name!r} evaluates with CUDAExecutionProvider and this host has no CUDA GPU: "
                "the evaluation runs on CPUExecutionProvider (its latency is the CPU's); run on a GPU host for CUDA"
            )

    def _cpu_evaluation(self) -> bool:
        """The target evaluates with CUDA (its first execution provider) on this host, which has no CUDA GPU:
        evaluation runs on the CPU execution provider instead (said once in _check_devices)."""
        return (
            self._providers()[0] == "CUDAExecutionProvider"
            and self._on_this_host(self.target_name)
            and not cuda_available()
        )

    def _step_providers(self, step: Step) -> list[str]:
        """The execution providers a step's job gets: the engine's, but the CPU for an evaluation that would ask
        this GPU-less host for CUDA (the passes still build for the configured providers)."""
        if step.role == "target" and self._cpu_evaluation():
            return ["CPUExecutionProvider"]
        providers = self._providers()
        measures = step.role == "host" and getattr(load_pass(step.pass_type), "runs_model_on_provider", False)
        cuda_missing = providers[0] == "CUDAExecutionProvider" and not cuda_available()
        if measures and cuda_missing and self._on_this_host(step.system_name):
            return ["CPUExecutionProvider"]
        return providers

    def _gpu_missing(self, system_name: str) -> bool:
        """The system asks for a GPU (its first accelerator, as Olive reads it), runs on this host (not Azure ML)
        and this host has no usable CUDA device."""
        accs = getattr(self.system(system_name), "accelerators", None) or ["cpu"]
        return wants_gpu(accs[:1]) and self._on_this_host(system_name) and not cuda_available()

    def _on_this_host(self, system_name: str) -> bool:
        """Local and Docker systems use this machine's devices; Azure ML brings its own."""
        sys_cfg = self.wf.systems.get(system_name)
        kind = str(sys_cfg.model_dump(mode="json").get("type", "")) if sys_cfg is not None else system_name
        return not is_azureml(kind)

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
                    environment=for_accelerator(requirements.environment, self._accelerator(step.system_name)),
                )
                step.key = step_key(
                    step.pass_type,
                    pass_cls,
                    config,
                    prev,
                    data_hashes,
                    env,
                    accelerator=self._accelerator(step.system_name),
                    processes=self.system(step.system_name).processes_for(pass_cls),
                    providers=self._step_providers(step),
                )
            if step.role == "host":
                prev = step.key
        for step in steps:  # every environment checked above before the first request to a shared cache
            step.cached, step.where = self.cache.get(step.key) is not None, "local"
            if not step.cached:
                shared = self.shared_cache_for(step)
                hit = shared.lookup(step.key) if shared is not None else None
                if hit is not None:
                    self._remote[step.key] = hit
                    step.cached, step.where = True, shared.where
                else:
                    step.where = ""
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
        """Steps cached on this machine only, saved into their system's shared cache (before a job that runs
        there is submitted, so it finds them too); the names of those saved. Walks the chain of inputs as a run
        would; stops where a step is not cached."""
        saved: list[str] = []
        model: ModelArtifact | None = self._input_model()[0]
        final = model
        for step in steps:
            entry = self.cache.get(step.key)
            if entry is None and step.key not in self._remote:
                if step.role == "host":
                    break
                continue
            shared = self.shared_cache_for(step)
            given = model if step.role == "host" else final
            if entry is not None and step.where == "local" and shared is not None:
                with contextlib.suppress(Exception):  # best effort: the job runs the step if it is not there
                    if shared.publish(step.key, entry.path, meta=entry.meta, input_model=given) is not None:
                        step.where = shared.where
                        saved.append(step.name)
            if step.role == "host":
                if entry is not None:
                    result = entry.result
                    model = result.model.with_root(entry.path) if result.model else None
                else:
                    remote = self._remote[step.key]
                    model = result_from_portable(remote.result, given, root=remote.uri).model
                final = model
                if model is None:
                    break
        return saved

    def _needs_local(self, steps: list[Step]) -> set[str]:
        """Keys of shared-cache hits whose files must be here: the input of a step that runs, and the final model
        when it is published. Other hits stay where they are (a LoRA cached in the workspace is not downloaded
        when only the evaluation after the export runs)."""
        host = [s for s in steps if s.role == "host"]
        needed = {s.key for s, nxt in zip(host, host[1:], strict=False) if not nxt.cached}
        targets_run = any(s.role == "target" and s.name != INPUT_EVAL_STEP and not s.cached for s in steps)
        if host and (self.output_dir is not None or targets_run):
            needed.add(host[-1].key)
        return needed

    def _accelerator(self, system_name: str) -> str:
        """The device a job runs on: the system's first accelerator decides, as Olive's does; a GPU asked on
        this host without one is the CPU (_check_devices said so, or refused a CUDA-only pass)."""
        accs = getattr(self.system(system_name), "accelerators", None) or ["cpu"]
        if not wants_gpu(accs[:1]) or self._gpu_missing(system_name):
            return "cpu"
        return "gpu"

    def _providers(self) -> list[str]:
        return list(getattr(self.wf.engine, "execution_providers", None) or ["CPUExecutionProvider"])

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
        self._needed = self._needs_local(steps)
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
            final_metrics |= self._baseline_comparison(steps, records, tracker)
            costs = [r.cost_usd for r in records if r.cost_usd is not None]
            total = sum(costs) if costs else None
            if total is not None:
                final_metrics["cost_usd"] = total
                tracker.log_metric("cost_usd", total)
            summary = RunSummary(records, model, final_metrics, self.output_dir, tracker.run_id,
                                 input_identity=input_identity, cost_usd=total)  # fmt: skip
            summary.recorded, summary.model_uri = tracker.recorded, tracker.model_uri
            summary.registry_uri, summary.registered_version = tracker.registry_uri, tracker.registered_version
            summary.prompt_format = self._prompt_format(steps, records)
            if self.output_dir is not None:
                self.publisher.publish(summary, records, steps, model, tracker)
            status = "FINISHED"
            return steps, summary
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            tracker.end(status)

    def _baseline_comparison(self, steps: list[Step], records: list[StepRecord], tracker: Tracker) -> dict[str, float]:
        """Olive's relative goals: the final evaluation against the input model's (engine.evaluate_input_model),
        compared by the Evaluate pass once both are known; each result is a note and a metric."""
        by_name = {r.name: r for r in records}
        final = next((s for s in steps if s.role == "target" and s.name != INPUT_EVAL_STEP), None)
        if final is None or INPUT_EVAL_STEP not in by_name or final.name not in by_name:
            return {}
        compare = getattr(load_pass(final.pass_type), "compare_with_baseline", None)
        if compare is None:
            return {}
        results, lines = compare(final.config, by_name[INPUT_EVAL_STEP].metrics, by_name[final.name].metrics)
        for line in lines:
            self._note(line)
        out = {f"{final.name}/{k}": v for k, v in results.items()}
        for k, v in out.items():
            tracker.log_metric(k, v)
        return out

    def _prompt_format(self, steps: list[Step], records: list[StepRecord]) -> PromptFormat | None:
        """The prompt format the final model was last fine-tuned with: the latest one recorded along the chain
        (the input model's folder, then each pass's output; an adapter before the model it sits on)."""
        start, _ = self._input_model()
        host = {s.name for s in steps if s.role == "host"}
        artifacts = [start.model_dump()] + [r.output for r in records if r.name in host and r.output]
        found = None
        for art in artifacts:
            for path in (art.get("adapter_path"), art.get("path")):
                fmt = read_prompt_format(path) if path and not is_uri(path) else None
                if fmt is not None:
                    found = fmt
                    break
        return found

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
        if entry is None and step.key in self._remote and shared is not None:
            entry = self._from_shared(step, model, shared)
            cached_in = shared.where if entry is not None else ""
        cost = None
        if entry is None:
            system = self.system(step.system_name)
            with self.cache.staging(step.key) as stage:
                entry = self.cache.get(step.key)  # a concurrent run may have finished it while we waited
                if entry is None:
                    self._execute(step, system, model, stage, tracker, shared)
                    result = JobResult.read(stage)
                    cost = self._cost(step, result)
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
                self._share(step, entry, model, shared)
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

    def _from_shared(self, step: Step, model: ModelArtifact, shared: SharedCache) -> CacheEntry | None:
        """A step cached in the shared cache: used where it is (its model paths become references) unless a
        later step runs here on it, then downloaded (checked against its manifest) into the local cache. A
        download that fails its checks is reported and the step runs instead (None)."""
        remote = self._remote[step.key]
        if shared.by_reference or step.key not in self._needed:
            result = result_from_portable(remote.result, model, root=remote.uri)
            return CacheEntry(step.key, self.cache.entry_dir(step.key), result, dict(remote.meta))
        with self.cache.staging(step.key) as stage:
            try:
                shared.materialize(remote, stage)
            except RunFailure as exc:
                self.reporter.step_log(step, f"orch: {exc}; running {step.name} instead")
                return None
            result_from_portable(remote.result, model).write(stage)  # this run's input paths
            return self.cache.commit(step.key, stage, {**remote.meta, "from": shared.where})

    def _share(self, step: Step, entry: CacheEntry, model: ModelArtifact, shared: SharedCache) -> None:
        """A pass that ran: its entry into the shared cache (files, then the commit marker); its checkpoints
        there are dropped. A failed upload costs the next run a rerun, not this run its result."""
        try:
            committed = shared.publish(step.key, entry.path, meta=entry.meta, input_model=model)
        except Exception as exc:  # noqa: BLE001 - reported; the run goes on with its local entry
            self.reporter.step_log(step, f"orch: could not save {step.name} to the {shared.where} cache: {exc}")
            return
        if committed is None:
            self.reporter.step_log(step, f"orch: {step.name}'s result names local paths: not shared")
            return
        self.reporter.step_log(step, f"orch: {step.name} saved to the {shared.where} cache ({step.key[:16]})")
        with contextlib.suppress(Exception):
            shared.drop_partial(step.key)

    def _cost(self, step: Step, result: JobResult) -> dict[str, float] | None:
        """cost_usd = nodes x hours x price per node-hour, and tokens_per_usd for a pass that counts the tokens
        it trained on (train_tokens)."""
        price = self.node_price_for(step)
        if price is None:
            return None
        usd = price.nodes * result.duration_s / 3600.0 * price.usd_per_hour
        out = {"cost_usd": usd}
        tokens = result.metrics.get("train_tokens")
        if tokens and usd > 0:
            out["tokens_per_usd"] = float(tokens) / usd
        return out

    def _execute(
        self,
        step: Step,
        system: System,
        model: ModelArtifact,
        stage: Path,
        tracker: Tracker,
        shared: SharedCache | None,
    ) -> None:
        configs, files, _ = self._data_files(step.data_names, step.system_name)
        secrets = {}
        sys_cfg = self.wf.systems.get(step.system_name)
        if sys_cfg is not None and getattr(sys_cfg, "hf_token", False):
            secrets = system.secret_sources(["hf_token"]) if hasattr(system, "secret_sources") else {}
        # secrets written into the pass or data config (a hub token in training_args) leave the job spec: the job
        # carries a placeholder and a private file the runner reads (core.secrets), never the value
        pass_config, written = split_secrets(step.config)
        found = {f"{CONFIG_SECRET}pass:{k}": v for k, v in written.items()}
        for name, cfg in list(configs.items()):
            configs[name], written = split_secrets(cfg)
            found.update({f"{CONFIG_SECRET}data:{name}:{k}": v for k, v in written.items()})
        private = Path(tempfile.mkdtemp(prefix="orch-secrets-")) if found else None
        if private is not None:
            secrets = {**secrets, **secret_files(found, private)}
        job = Job(
            job_id=f"{safe_name(step.name)}-{step.key[:12]}-{uuid.uuid4().hex[:6]}",  # names files and containers
            pass_name=step.name,
            pass_type=step.pass_type,
            pass_config=pass_config,
            model=model,
            data_configs=configs,
            data_files=files,
            output_dir=str(stage),
            # outlives this attempt (the staging folder does not): a pass that can resume checkpoints here
            checkpoint_dir=str(self.cache.partial_dir(step.key) / "checkpoints"),
            accelerator=self._accelerator(step.system_name),
            processes_per_node=system.processes_for(load_pass(step.pass_type)),  # >1: data parallel (DDP passes)
            execution_providers=self._step_providers(step),
            secrets=secrets,
            tracking=JobTracking(mode="events", metric_prefix=f"{step.name}/"),
            log_level=int(getattr(self.wf.engine, "log_severity_level", 3) or 3),
            cache_key=step.key,
        )
        sync = contextlib.nullcontext()
        if shared is not None and not shared.by_reference and job.checkpoint_dir:
            # on the compute: checkpoints restored from the shared cache first, saved there while the pass runs
            sync = shared.checkpoints(
                step.key, Path(job.checkpoint_dir), lambda line: self.reporter.step_log(step, line)
            )
        try:
            with sync:
                follow_job(step, job, system, model, stage, tracker, self.reporter, self.cache)
        finally:
            if private is not None:
                shutil.rmtree(private, ignore_errors=True)

    # ---- outputs ----------------------------------------------------------------------------------------
    def export(self, summary: RunSummary, dest: Path | None = None) -> None:
        """Copy the final model into dest (default output_dir): adapter/ + model/ for an adapter, else model/."""
        self.publisher.export(summary, dest)
