"""Plan and run the pass chain: one Job per pass, cached by content, on the host; evaluation on the target.

Cache key of a pass = hash(pass type, pass version + code hash, normalized config, input model identity, the
content of the data it names, the environment's library versions). The input identity of a pass that follows
another is the previous pass's key (content-addressed by derivation), so the whole plan — which passes run and
which come from the cache — is known on the client before anything is submitted.
The engine never knows how a system moves bytes: it hands Jobs to `System.submit` and reads their results.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from filelock import FileLock

from orchestrator import __version__
from orchestrator.cache import Cache, folder_size, stable_hash
from orchestrator.job import (
    EVENTS_FILE,
    Job,
    JobResult,
    JobState,
    JobTracking,
    ModelArtifact,
    atomic_write_text,
    is_uri,
)
from orchestrator.launch import cuda_available
from orchestrator.passes.registry import load_pass
from orchestrator.plots import plot_training_curves
from orchestrator.preflight import (
    PreflightError,
    check_adapter_folder,
    check_data_config,
    check_model_folder,
    check_name,
    check_split,
    check_tracking_uri,
    check_writable_dir,
    local_data_paths,
)
from orchestrator.systems import KEYWORDS, make_system
from orchestrator.systems.base import System
from orchestrator.tracking import EventTail, Tracker, flatten_params, redact, redact_obj, resolve_tracking_uri

INPUT_EVAL_STEP = "evaluate_input"  # the step that scores the input model when engine.evaluate_input_model is set
# Published outputs (see Engine._publish): output_dir/.orch-versions/<version>/{model,adapter,manifest.json,...}
# holds each publication whole; output_dir/.orch-current is a symlink to the current one, switched by one rename;
# output_dir/model, adapter, manifest.json, training.png are fixed symlinks through .orch-current.
VERSIONS_DIR = ".orch-versions"
CURRENT_LINK = ".orch-current"
PUBLISHED = ("model", "adapter", "manifest.json", "training.png")


class EngineError(Exception):
    """A workflow failure for the user: one line, with the failing job's log tail attached."""

    def __init__(self, message: str, *, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


class Reporter(Protocol):
    """What the engine tells the UI (the CLI renders it with rich; tests pass a QuietReporter)."""

    def plan(self, steps: list[Step]) -> None: ...
    def step_start(self, step: Step) -> None: ...
    def step_progress(self, step: Step, done: int, total: int, desc: str) -> None: ...
    def step_log(self, step: Step, line: str) -> None: ...
    def step_metric(self, step: Step, name: str, value: float) -> None: ...
    def step_end(self, step: Step, record: StepRecord) -> None: ...


class QuietReporter:
    def plan(self, steps: list[Step]) -> None: ...
    def step_start(self, step: Step) -> None: ...
    def step_progress(self, step: Step, done: int, total: int, desc: str) -> None: ...
    def step_log(self, step: Step, line: str) -> None: ...
    def step_metric(self, step: Step, name: str, value: float) -> None: ...
    def step_end(self, step: Step, record: StepRecord) -> None: ...


@dataclass
class Step:
    """One planned pass run."""

    name: str
    pass_type: str
    config: dict[str, Any]
    role: str  # "host" (a pass) or "target" (evaluation)
    system_name: str
    key: str = ""
    cached: bool = False
    data_names: list[str] = field(default_factory=list)


@dataclass
class StepRecord:
    name: str
    pass_type: str
    system: str
    cache_key: str
    cached: bool
    status: str
    duration_s: float
    metrics: dict[str, float]
    versions: dict[str, str]
    output: dict[str, Any] | None
    output_size_bytes: int = 0


@dataclass
class RunSummary:
    steps: list[StepRecord]
    final_model: ModelArtifact | None
    metrics: dict[str, float]
    output_dir: Path | None
    mlflow_run_id: str | None
    model_uri: str | None = None


def _code_hash(pass_cls: type) -> str:
    """The pass's module and every orchestrator module it imports (a changed helper must miss the cache)."""
    from orchestrator.code_identity import code_hash

    return code_hash(pass_cls.__module__)


def _environment_for(job: Job) -> str:
    """The environment family a job's pass asks for (cpu-export, cpu-train, gpu-train): systems that build
    images use it when the workflow names no environment. Keeps systems from importing passes."""
    pass_cls = load_pass(job.pass_type)
    env = pass_cls().requirements(pass_cls.Config.model_validate(job.pass_config)).environment
    return for_accelerator(env, job.accelerator)


def for_accelerator(environment: str, accelerator: str) -> str:
    """A gpu-* family's CPU sibling (gpu-quantize -> cpu-quantize) for a job on a CPU, when there is one: its
    torch is the CPU build, so a CPU system never installs CUDA wheels it cannot use."""
    from orchestrator.docker_images import ENVIRONMENTS_DIR

    if accelerator == "cpu" and environment.startswith("gpu-"):
        sibling = "cpu-" + environment.removeprefix("gpu-")
        if (ENVIRONMENTS_DIR / f"{sibling}.conda.yaml").exists():
            return sibling
    return environment


def _data_refs(config: Any, data_names: set[str]) -> list[str]:
    """Data config names a pass config refers to (train_data_config, data_config, ... at any depth)."""
    found: list[str] = []
    if isinstance(config, dict):
        for value in config.values():
            found += _data_refs(value, data_names)
    elif isinstance(config, list):
        for value in config:
            found += _data_refs(value, data_names)
    elif isinstance(config, str) and config in data_names:
        found.append(config)
    return sorted(set(found))


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
    ) -> None:
        self.wf = workflow
        self.base_dir = Path(workflow.base_dir)
        eng = workflow.engine
        self.cache = Cache(self._abs(eng.cache_dir or ".orch/cache"))
        self.output_dir = self._abs(eng.output_dir) if eng.output_dir else None
        self.host_name = host or eng.host or "local"
        self.target_name = target or eng.target or self.host_name
        self.reporter: Reporter = reporter or QuietReporter()
        self.tracking_enabled = tracking
        mlflow_cfg = getattr(eng, "mlflow", None)
        self.tracking_uri = resolve_tracking_uri(tracking_uri, getattr(mlflow_cfg, "tracking_uri", None))
        self.experiment = getattr(mlflow_cfg, "experiment_name", None) or "orch"
        self.register_as = (
            getattr(mlflow_cfg, "register_model_name", None) or getattr(workflow, "workflow_id", None) or "orch-model"
        )
        self._systems: dict[str, System] = {}
        self._data = {dc.name: dc for dc in workflow.data_configs}

    # ---- helpers ----------------------------------------------------------------------------------------
    def _abs(self, p: str | Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()

    def system(self, name: str) -> System:
        """A system by workflow name, or by keyword (local/docker/aml: the first such system in the config)."""
        if name not in self._systems:
            systems = self.wf.systems
            if name in systems:
                cfg = systems[name].model_dump(mode="json")
                type_name = cfg.get("type", "LocalSystem")
            elif name in KEYWORDS:
                type_name = KEYWORDS[name]
                match = [
                    s
                    for s in systems.values()
                    if s.model_dump(mode="json").get("type") in (type_name, f"{type_name}System")
                ]
                cfg = match[0].model_dump(mode="json") if match else {"type": type_name}
            else:
                raise EngineError(
                    f"engine host/target {name!r} is not a system in 'systems' nor one of local, docker, aml"
                )
            self._systems[name] = make_system(
                type_name, cfg, base_dir=self.base_dir, cache_dir=self.cache.root, environment_for=_environment_for
            )
        return self._systems[name]

    def _input_model(self) -> tuple[ModelArtifact, str]:
        """The workflow's input model as an artifact, and its identity for cache keys."""
        im = self.wf.input_model
        from orchestrator.resources import resolve_model_ref

        path, identity = resolve_model_ref(im.model_ref, base_dir=self.base_dir, cache=self.cache)
        adapter = getattr(im, "adapter_path", None)
        fmt = "hf"
        if adapter:
            adapter = str(self._abs(adapter))
            identity = stable_hash([identity, self.cache.content_hash(adapter)])
            fmt = "hf_adapter"
        if Path(path).is_dir() and (Path(path) / "genai_config.json").exists():
            fmt = "onnx_genai"
        elif Path(path).is_dir() and any(Path(path).glob("*.onnx")) or str(path).endswith(".onnx"):
            fmt = "onnx"
        art = ModelArtifact(
            format=fmt,
            path=str(path),
            adapter_path=adapter,
            task=im.task or "text-generation",
            trust_remote_code=bool(im.trust_remote_code),
        )
        return art, identity

    def _data_files(self, names: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str], list[str]]:
        """Json form of the named data configs, local data paths to hand the job, and their content hashes."""
        from orchestrator.resources import resolve_data_files

        configs, files, hashes = {}, {}, []
        for name in names:
            dc = self._data[name]
            cfg = dc.model_dump(mode="json")
            configs[name] = cfg
            local = resolve_data_files(cfg, base_dir=self.base_dir, cache=self.cache)
            if local is not None:
                files[name] = str(local)
                hashes.append(self.cache.content_hash(local))
            # every local file the config reads, whatever its form (a path, a list, globs, a folder), by content
            for fld, _, found in local_data_paths(cfg, self.base_dir):
                hashes.append(stable_hash([fld, [self.cache.content_hash(p) for p in found]]))
            if cfg.get("user_script"):  # the script's code makes the rows: a changed script is new data
                hashes.append(stable_hash(["user_script", self.cache.content_hash(Path(cfg["user_script"]))]))
            hashes.append(stable_hash(cfg))
        return configs, files, hashes

    # ---- pre-flight -------------------------------------------------------------------------------------
    def preflight(self, *, tracking: bool = True) -> None:
        """Every input checked before anything is hashed, written or submitted (orchestrator/preflight.py):
        raises PreflightError (one line: the field and the fix)."""
        from orchestrator.resources import _as_dict, is_remote

        check_name("workflow_id", getattr(self.wf, "workflow_id", None))
        mlflow_cfg = getattr(self.wf.engine, "mlflow", None)
        check_name("engine.mlflow.register_model_name", getattr(mlflow_cfg, "register_model_name", None))
        check_writable_dir("engine.cache_dir", self.cache.root)
        if self.output_dir is not None:
            check_writable_dir("engine.output_dir", self.output_dir)
        im = self.wf.input_model
        ref = _as_dict(im.model_ref)
        if not is_remote(ref):
            raw = (
                (ref.get("config") or {}).get("path") or ref.get("path") or ref.get("model_path")
                if isinstance(ref, dict)
                else ref
            )
            if raw:
                path = self._abs(str(raw))
                check_model_folder(path, "input_model.model_path")
                self._check_not_overwritten(path, "input_model.model_path")
            elif isinstance(ref, dict) and ref.get("type") == "hf_hub" and not self._host_is_aml():
                raise PreflightError(
                    f"input_model: {ref.get('name')!r} is neither a local folder (looked at "
                    f"{self._abs(str(ref.get('name')))}) nor reachable: orch jobs on this host have no model hub; "
                    "give a local model folder (config.json, weights, tokenizer) or an azureml:// model"
                )
        adapter = getattr(im, "adapter_path", None)
        if adapter:
            check_adapter_folder(self._abs(adapter), "input_model.adapter_path")
            self._check_not_overwritten(self._abs(adapter), "input_model.adapter_path")
        # a user_script runs where the data is read; --host / --target may name a system the reader did not check
        names = dict.fromkeys([self.host_name, self.target_name])
        remote = [n for n in names if self._system_type(n) in ("docker", "aml")]
        for i, dc in enumerate(self.wf.data_configs):
            cfg = dc.model_dump(mode="json")
            if cfg.get("user_script") and remote:
                raise PreflightError(
                    f"data_configs[{i}].user_script: runs only on LocalSystem for now ({', '.join(remote)} is not "
                    "one); the script is not shipped with the job: run on a LocalSystem, or use "
                    "load_dataset_config + text_template instead of a script"
                )
            load = cfg.get("load_dataset_config") or {}
            if load.get("data_name") in ("json", "csv", "parquet", "text", "arrow") and not load.get("data_files"):
                raise PreflightError(
                    f"data_configs[{i}].load_dataset_config: data_name {load['data_name']!r} needs data_files "
                    "(the file(s) to read), e.g. --data_files data/train.jsonl"
                )
            check_data_config(cfg, self.base_dir, f"data_configs[{i}]")
            check_split(f"data_configs[{i}].load_dataset_config.split", load.get("split"), cfg)
        data = {dc.name: dc.model_dump(mode="json") for dc in self.wf.data_configs}
        for name, entry in self.wf.passes.items():
            pass_cfg = entry.config or {}
            for key in ("train_split", "eval_split"):
                check_split(f"passes.{name}.{key}", pass_cfg.get(key), data.get(pass_cfg.get("train_data_config")))
        self._check_evaluator_device()
        if tracking and self.tracking_enabled:
            check_tracking_uri(self.tracking_uri)

    def _check_evaluator_device(self) -> None:
        """The evaluator runs the model with the first execution provider on the target: a CUDA-only target on
        this machine without a CUDA GPU is refused now, not after every pass ran."""
        if not getattr(self.wf.engine, "evaluator", None) or self._host_is_aml(self.target_name):
            return
        first = self._providers()[0]
        if first == "CPUExecutionProvider" or (first == "CUDAExecutionProvider" and cuda_available()):
            return
        lacks = "no CUDA GPU" if first == "CUDAExecutionProvider" else f"no {first} runtime"
        raise PreflightError(
            f"engine.evaluator: the target {self.target_name!r} evaluates with {first} (its first execution "
            f"provider) and this machine has {lacks}; list CPUExecutionProvider first, drop the evaluator, "
            "or run on a GPU system"
        )

    def _system_type(self, name: str) -> str:
        """The system's kind ("local", "docker", "aml"; "" when unknown) without building it."""
        sys_cfg = self.wf.systems.get(name)
        type_name = str(sys_cfg.model_dump(mode="json").get("type") or "LocalSystem" if sys_cfg else name).lower()
        kinds = {"local": "local", "localsystem": "local", "pythonenvironment": "local", "docker": "docker",
                 "dockersystem": "docker", "aml": "aml", "azureml": "aml", "azuremlsystem": "aml"}  # fmt: skip
        return kinds.get(type_name, "")

    def _host_is_aml(self, name: str | None = None) -> bool:
        sys_cfg = self.wf.systems.get(name or self.host_name)
        type_name = sys_cfg.model_dump(mode="json").get("type", "") if sys_cfg is not None else (name or self.host_name)
        return str(type_name).lower() in ("aml", "azureml", "azuremlsystem")

    def _check_not_overwritten(self, path: Path, field: str) -> None:
        """Publishing replaces output_dir/model and output_dir/adapter: an input there would be lost."""
        if self.output_dir is None:
            return
        real = path.resolve()
        for name in ("model", "adapter"):
            dest = (self.output_dir / name).resolve()
            if real == dest or dest in real.parents:
                raise PreflightError(
                    f"{field} {path} is inside the output folder {self.output_dir / name}, which this run "
                    "replaces; give another --output_path / engine.output_dir"
                )

    # ---- planning ---------------------------------------------------------------------------------------
    def plan(self) -> list[Step]:
        """Ordered steps with cache keys and hit/miss, decided on the client before anything is submitted."""
        steps = [
            Step(name, entry.type, dict(entry.config or {}), "host", self.host_name)
            for name, entry in self.wf.passes.items()
        ]
        evaluator = self._evaluator_config()
        if evaluator is not None:
            steps.append(Step("evaluate", "Evaluate", evaluator, "target", self.target_name))
            if getattr(self.wf.engine, "evaluate_input_model", False):
                # Olive's baseline: the same metrics on the same rows for the model the workflow starts from
                baseline = {**evaluator, "skip_speed_unless_onnx": True}
                steps.insert(0, Step(INPUT_EVAL_STEP, "Evaluate", baseline, "target", self.target_name))
        _, identity = self._input_model()
        prev = identity
        for step in steps:
            pass_cls = load_pass(step.pass_type)
            step.data_names = _data_refs(step.config, set(self._data))
            _, _, data_hashes = self._data_files(step.data_names)
            config = pass_cls.Config.model_validate(step.config)
            requirements = pass_cls().requirements(config)
            env = self.system(step.system_name).environment_fingerprint(
                tuple(pass_cls.libraries),
                environment=for_accelerator(requirements.environment, self._accelerator(step.system_name)),
            )
            normalized = config.model_dump(mode="json")
            step.key = stable_hash(
                {
                    "pass": step.pass_type,
                    "pass_version": pass_cls.version,
                    "code": _code_hash(pass_cls),
                    "config": normalized,
                    "input": prev,
                    "data": data_hashes,
                    "env": env,
                    "accelerator": self._accelerator(step.system_name),
                    "processes": self.system(step.system_name).processes_for(pass_cls),
                    "providers": self._providers(),
                }
            )[:32]
            step.cached = self.cache.get(step.key) is not None
            if step.role == "host":
                prev = step.key
        return steps

    def _evaluator_config(self) -> dict[str, Any] | None:
        name = getattr(self.wf.engine, "evaluator", None)
        if not name:
            return None
        ev = self.wf.evaluators[name]
        config: dict[str, Any] = {"metrics": [m.model_dump(mode="json", exclude_none=True) for m in ev.metrics]}
        # Score on the rows the fine-tune held out: the same eval_dataset_size and data_seed as the LoRA pass
        # that trained on that data, so accuracy is never measured on training rows.
        data_names = {m.get("data_config") for m in config["metrics"]}
        for entry in self.wf.passes.values():
            cfg = entry.config or {}
            if cfg.get("train_data_config") in data_names and cfg.get("eval_dataset_size"):
                config["eval_dataset_size"] = cfg["eval_dataset_size"]
                config["seed"] = int((cfg.get("training_args") or {}).get("data_seed", 42))
                break
        return config

    def _accelerator(self, system_name: str) -> str:
        accs = getattr(self.system(system_name), "accelerators", None) or ["cpu"]
        first = accs[0]
        device = first.get("device") if isinstance(first, dict) else first
        return "gpu" if str(device).lower() in ("gpu", "cuda") else "cpu"

    def _providers(self) -> list[str]:
        return list(getattr(self.wf.engine, "execution_providers", None) or ["CPUExecutionProvider"])

    # ---- running ----------------------------------------------------------------------------------------
    def run(self, *, dry_run: bool = False) -> tuple[list[Step], RunSummary | None]:
        self.preflight(tracking=not dry_run)
        steps = self.plan()
        self.reporter.plan(steps)
        if dry_run:
            return steps, None
        self.cache.ensure()
        tracker = Tracker(
            self.tracking_uri,
            self.experiment,
            getattr(self.wf, "workflow_id", None) or "workflow",
            enabled=self.tracking_enabled,
        )
        tracker.log_params(flatten_params(self.wf.to_json_dict()))
        tracker.set_tag("orch.host", self.host_name)
        tracker.set_tag("orch.target", self.target_name)
        records: list[StepRecord] = []
        model, _ = self._input_model()
        status = "FAILED"
        try:
            for step in steps:
                record, out_model = self._run_step(step, model, tracker)
                records.append(record)
                if step.role == "host" and out_model is not None:
                    model = out_model
            final_metrics = {f"{r.name}/{k}": v for r in records for k, v in r.metrics.items()}
            summary = RunSummary(records, model, final_metrics, self.output_dir, tracker.run_id)
            if self.output_dir is not None:
                self._publish(summary, records, steps, model, tracker)
            status = "FINISHED"
            return steps, summary
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            tracker.end(status)

    def _publish(
        self,
        summary: RunSummary,
        records: list[StepRecord],
        steps: list[Step],
        model: ModelArtifact | None,
        tracker: Tracker,
    ) -> None:
        """Publish model/ (+ adapter/), training.png and manifest.json into output_dir, atomically as a whole.

        Everything is written into a fresh output_dir/.orch-versions/<version>/ (real copies, or reflinks where
        the filesystem has them: never hard links, so editing an output cannot change the cache, and onnx's
        hard-link check passes), then output_dir/.orch-current is switched to it by one rename. The visible
        names (output_dir/model, manifest.json, ...) are symlinks through .orch-current, so a model and its
        manifest always change together; a run killed before the switch leaves the previous publication
        whole, and its half-written version folder is removed by the next publish. A file lock serializes runs
        sharing one output_dir.
        """
        assert self.output_dir is not None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self._job_output():
            self._publish_flat(summary, records, steps, model, tracker)
            return
        with FileLock(str(self.output_dir / ".orch-publish.lock")):
            versions = self.output_dir / VERSIONS_DIR
            version = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
            vdir = versions / version
            vdir.mkdir(parents=True)
            self._write_publication(vdir, summary, records, steps, model, tracker)
            _switch_current(self.output_dir, version)

    def _job_output(self) -> bool:
        """output_dir is an Azure ML job output (AZURE_ML_OUTPUT_<name>), or ORCH_PUBLISH=flat: the service
        commits that folder as a whole when the job ends and uploads files, not links, so it is written flat."""
        if os.environ.get("ORCH_PUBLISH") == "flat":
            return True
        assert self.output_dir is not None
        here = self.output_dir.resolve()
        for key, value in os.environ.items():
            if key.startswith("AZURE_ML_OUTPUT_") and value and Path(value).resolve() == here:
                return True
        return False

    def _publish_flat(
        self,
        summary: RunSummary,
        records: list[StepRecord],
        steps: list[Step],
        model: ModelArtifact | None,
        tracker: Tracker,
    ) -> None:
        """model/ (+ adapter/), training.png and manifest.json straight into output_dir (real copies)."""
        assert self.output_dir is not None
        self._write_publication(self.output_dir, summary, records, steps, model, tracker)

    def _write_publication(
        self,
        folder: Path,
        summary: RunSummary,
        records: list[StepRecord],
        steps: list[Step],
        model: ModelArtifact | None,
        tracker: Tracker,
    ) -> None:
        """What one publication holds, written into `folder`: the model, the loss curves, the manifest."""
        self.export(summary, folder)
        curves = {r.name: self.cache.entry_dir(r.cache_key) for r in records}
        png = plot_training_curves(curves, folder / "training.png")
        if png is not None:
            tracker.log_artifact(png)
        if model is not None:
            summary.model_uri = tracker.log_model(folder / "model", model.format, self.register_as)
            self._write_manifest(summary, steps, folder)

    def export(self, summary: RunSummary, dest: Path | None = None) -> None:
        """Copy the final model into dest (default output_dir): adapter/ + model/ for an adapter, else model/."""
        dest = dest or self.output_dir
        assert dest is not None
        dest.mkdir(parents=True, exist_ok=True)
        model = summary.final_model
        if model is None:
            return
        if model.format == "hf_adapter" and model.adapter_path:
            _replace_dir(self._local(model.adapter_path), dest / "adapter")
        _replace_dir(self._local(model.path), dest / "model")

    def _run_step(self, step: Step, model: ModelArtifact, tracker: Tracker) -> tuple[StepRecord, ModelArtifact | None]:
        self.reporter.step_start(step)
        started = time.time()
        entry = self.cache.get(step.key)
        if entry is None:
            system = self.system(step.system_name)
            with self.cache.staging(step.key) as stage:
                entry = self.cache.get(step.key)  # a concurrent run may have finished it while we waited
                if entry is None:
                    self._execute(step, system, model, stage, tracker)
                    entry = self.cache.commit(
                        step.key,
                        stage,
                        {
                            "pass": step.name,
                            "pass_type": step.pass_type,
                            "system": step.system_name,
                            "orch": __version__,
                        },
                    )
                    cached = False
                else:
                    cached = True
        else:
            cached = True
        result = entry.result
        out_model = result.model.with_root(entry.path) if result.model else None
        if cached:  # metrics of a cached pass still belong in this run's record
            for k, v in result.metrics.items():
                tracker.log_metric(f"{step.name}/{k}", v)
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
        )
        tracker.log_metric(f"{step.name}/duration_s", result.duration_s)
        if record.output_size_bytes:
            tracker.log_metric(f"{step.name}/model_size_bytes", record.output_size_bytes)
        self.reporter.step_end(step, record)
        return record, out_model

    def _execute(self, step: Step, system: System, model: ModelArtifact, stage: Path, tracker: Tracker) -> None:
        configs, files, _ = self._data_files(step.data_names)
        secrets = {}
        sys_cfg = self.wf.systems.get(step.system_name)
        if sys_cfg is not None and getattr(sys_cfg, "hf_token", False):
            secrets = system.secret_sources(["hf_token"]) if hasattr(system, "secret_sources") else {}
        job = Job(
            job_id=f"{step.name}-{step.key[:12]}-{uuid.uuid4().hex[:6]}",
            pass_name=step.name,
            pass_type=step.pass_type,
            pass_config=step.config,
            model=model,
            data_configs=configs,
            data_files=files,
            output_dir=str(stage),
            accelerator=self._accelerator(step.system_name),
            processes_per_node=system.processes_for(load_pass(step.pass_type)),  # >1: data parallel (DDP passes)
            execution_providers=self._providers(),
            secrets=secrets,
            tracking=JobTracking(mode="events", metric_prefix=f"{step.name}/"),
            log_level=int(getattr(self.wf.engine, "log_severity_level", 3) or 3),
        )
        system.prepare(job)
        handle = system.submit(job)
        tail = EventTail(stage / EVENTS_FILE)
        stop = threading.Event()

        def pump_logs() -> None:
            for line in handle.logs(follow=True):
                self.reporter.step_log(step, line)
                if stop.is_set():
                    break

        log_thread = threading.Thread(target=pump_logs, daemon=True)
        log_thread.start()
        try:
            while True:
                state = handle.wait(timeout=0.5)
                for event in tail.read():
                    self._on_event(step, event, tracker)
                if state.is_terminal():
                    break
        except KeyboardInterrupt:
            handle.cancel()
            raise
        finally:
            stop.set()
            log_thread.join(timeout=2)
        for event in tail.read():
            self._on_event(step, event, tracker)
        out = handle.outputs(stage)
        try:
            result = JobResult.read(out)
        except (FileNotFoundError, ValueError):
            result = None
        if state != JobState.COMPLETED or result is None or result.status != JobState.COMPLETED:
            reason = (result.error if result else None) or f"job ended {state.value}"
            reason = reason.strip().splitlines()[0] if reason.strip() else f"job ended {state.value}"
            tail_text = handle.log_tail() if hasattr(handle, "log_tail") else ""
            log = self._keep_log(stage, job.job_id, tail_text)
            raise EngineError(
                f"pass {step.name!r} ({step.pass_type}) failed on {step.system_name} (input {model.path}): "
                f"{redact(reason)}" + (f"; full log: {log}" if log else ""),
                log_tail=tail_text,
            )

    def _keep_log(self, stage: Path, job_id: str, tail: str) -> Path | None:
        """The failed job's log (with its traceback) outlives the staging folder: <cache>/logs/<job_id>.log."""
        dest = self.cache.ensure() / "logs" / f"{job_id}.log"
        src = stage / "job.log"
        try:
            if src.is_file():
                shutil.copyfile(src, dest)
            elif tail:
                dest.write_text(tail)
            else:
                return None
        except OSError:
            return None
        return dest

    def _on_event(self, step: Step, event: dict[str, Any], tracker: Tracker) -> None:
        kind = event.get("type")
        if kind == "progress":
            self.reporter.step_progress(step, int(event["done"]), int(event["total"]), event.get("desc", ""))
        elif kind == "metric":
            tracker.forward(event, f"{step.name}/")
            self.reporter.step_metric(step, event["name"], event["value"])
        elif kind == "param":
            tracker.forward(event, f"{step.name}/")

    # ---- outputs ----------------------------------------------------------------------------------------
    def _local(self, path: str) -> Path:
        """A local path for an artifact; a remote one (a job output left in the workspace) is downloaded once."""
        if not is_uri(path):
            return Path(path)
        from orchestrator.systems.azureml.download import download_reference

        local, _ = download_reference(path, cache=self.cache, field="final model")
        return Path(local)

    def _write_manifest(self, summary: RunSummary, steps: list[Step], vdir: Path) -> None:
        assert self.output_dir is not None
        model_dir = vdir / "model"
        manifest = {
            "orch_version": __version__,
            "workflow_id": getattr(self.wf, "workflow_id", None),
            "host": self.host_name,
            "target": self.target_name,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "input_model": self.wf.input_model.model_dump(mode="json", exclude_none=True),
            "passes": [r.__dict__ for r in summary.steps],
            "final_model": {
                "format": summary.final_model.format if summary.final_model else None,
                "path": str(self.output_dir / "model"),
                "sha256": self.cache.content_hash(model_dir) if model_dir.exists() else None,
                "size_bytes": folder_size(model_dir) if model_dir.exists() else 0,
            },
            "metrics": summary.metrics,
            "mlflow": {
                "tracking_uri": self.tracking_uri,
                "run_id": summary.mlflow_run_id,
                "model_uri": summary.model_uri,
            },
        }
        manifest = redact_obj(manifest)  # credentials inside URIs (tracking, SAS) never reach the file
        atomic_write_text(vdir / "manifest.json", json.dumps(manifest, indent=2, default=str))


def _replace_dir(src: Path, dest: Path) -> None:
    """Copy src to dest via a temp sibling + rename: dest is either the old or the new copy, never half."""
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    if src.is_dir():
        shutil.copytree(src, tmp, copy_function=copy_file, symlinks=False)
    else:
        tmp.mkdir(parents=True)
        copy_file(str(src), str(tmp / src.name))
    tmp.chmod(0o755)  # staging folders are made 0700 (mkdtemp); the user's output is an ordinary folder
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


FICLONE = 0x40049409  # linux/fs.h: share the blocks copy-on-write (btrfs, xfs, overlay on them)


def copy_file(src: str, dst: str) -> str:
    """A real copy: a reflink where the filesystem offers one (instant, no extra disk), else bytes. Never a
    hard link: an output that shares an inode with the cache (or the user's input model) lets an edit of one
    change the other, and onnx refuses external data with several links."""
    import fcntl

    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
        except OSError:
            shutil.copyfileobj(fin, fout, 1 << 20)
    shutil.copystat(src, dst)
    return dst


def _switch_current(output_dir: Path, version: str) -> None:
    """Point output_dir/.orch-current at the version (one atomic rename), keep the visible names as links
    through it, and remove every other version folder."""
    target = Path(VERSIONS_DIR) / version
    tmp = output_dir / f"{CURRENT_LINK}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.symlink_to(target)
    os.replace(tmp, output_dir / CURRENT_LINK)
    vdir = output_dir / target
    for name in PUBLISHED:
        link = output_dir / name
        wanted = Path(CURRENT_LINK) / name
        if not (vdir / name).exists():
            if link.is_symlink():
                link.unlink()
            continue
        if link.is_symlink() and Path(os.readlink(link)) == wanted:
            continue
        if link.exists() and not link.is_symlink():  # a real folder/file from before versioned publishing
            trash = output_dir / f".{name}.old-{uuid.uuid4().hex[:8]}"
            link.rename(trash)
            if trash.is_dir():
                shutil.rmtree(trash, ignore_errors=True)
            else:
                trash.unlink(missing_ok=True)
        tmp = output_dir / f".{name}.link-{uuid.uuid4().hex[:8]}"
        tmp.symlink_to(wanted)
        os.replace(tmp, link)
    for old in (output_dir / VERSIONS_DIR).iterdir():
        if old.name != version:
            shutil.rmtree(old, ignore_errors=True)
