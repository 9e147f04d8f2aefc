"""One step run as a job: the Job built for its system (secrets written into a config leave the spec for private
files, checkpoints go where they outlive the attempt), submitted and followed to its end: logs pumped on a thread,
events turned into progress and metrics, a failure turned into one EngineError line naming the pass, the cause
and the kept log."""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

from orchestrator.core.cache import Cache, SharedCache
from orchestrator.core.extras import install_hint
from orchestrator.core.job import EVENTS_FILE, Job, JobResult, JobState, JobTracking, ModelArtifact
from orchestrator.core.secrets import CONFIG_SECRET, secret_files, split_secrets
from orchestrator.engine.steps import EngineError, Reporter, Step
from orchestrator.engine.tracking import EventTail, Tracker, mask
from orchestrator.passes.registry import load_pass
from orchestrator.systems.base import System


def safe_name(name: str) -> str:
    """A pass name as a file / container name: "a/b c" -> "a_b_c" (a '/' would make the job's log a subfolder)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:64] or "pass"


def run_step_job(
    step: Step,
    system: System,
    model: ModelArtifact,
    stage: Path,
    tracker: Tracker,
    reporter: Reporter,
    cache: Cache,
    shared: SharedCache | None,
    *,
    configs: dict[str, dict[str, Any]],
    files: dict[str, str],
    hf_token: bool,
    accelerator: str,
    providers: list[str],
    log_level: int,
) -> None:
    """The step's Job (its data configs and local data files, the system's hf_token secret when it names one,
    the device and execution providers it runs with) run to its end; its outputs land in `stage`. A shared
    cache that keeps checkpoints restores them first and saves them while the pass runs."""
    secrets = {}
    if hf_token:
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
        checkpoint_dir=str(cache.partial_dir(step.key) / "checkpoints"),
        accelerator=accelerator,
        processes_per_node=system.processes_for(load_pass(step.pass_type)),  # >1: data parallel (DDP passes)
        execution_providers=providers,
        secrets=secrets,
        tracking=JobTracking(mode="events", metric_prefix=f"{step.name}/"),
        log_level=log_level,
        cache_key=step.key,
    )
    sync = contextlib.nullcontext()
    if shared is not None and not shared.by_reference and job.checkpoint_dir:
        # on the compute: checkpoints restored from the shared cache first, saved there while the pass runs
        sync = shared.checkpoints(step.key, Path(job.checkpoint_dir), lambda line: reporter.step_log(step, line))
    try:
        with sync:
            follow_job(step, job, system, model, stage, tracker, reporter, cache)
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)


def follow_job(
    step: Step,
    job: Job,
    system: System,
    model: ModelArtifact,
    stage: Path,
    tracker: Tracker,
    reporter: Reporter,
    cache: Cache,
) -> None:
    """Prepare, submit and wait for `job`; its outputs land in `stage`. Raises EngineError when it failed."""
    system.prepare(job)
    handle = system.submit(job)
    tail = EventTail(stage / EVENTS_FILE)
    stop = threading.Event()

    def pump_logs() -> None:
        for line in handle.logs(follow=True):
            reporter.step_log(step, line)
            if stop.is_set():
                break

    log_thread = threading.Thread(target=pump_logs, daemon=True)
    log_thread.start()
    try:
        while True:
            state = handle.wait(timeout=0.5)
            for event in tail.read():
                _on_event(step, event, tracker, reporter)
            if state.is_terminal():
                break
    except KeyboardInterrupt:
        handle.cancel()
        raise
    finally:
        stop.set()
        log_thread.join(timeout=2)
    for event in tail.read():
        _on_event(step, event, tracker, reporter)
    out = handle.outputs(stage)
    try:
        result = JobResult.read(out)
    except (FileNotFoundError, ValueError):
        result = None
    if state != JobState.COMPLETED or result is None or result.status != JobState.COMPLETED:
        reason = (result.error if result else None) or f"job ended {state.value}"
        reason = reason.strip().splitlines()[0] if reason.strip() else f"job ended {state.value}"
        missing = re.search(r"No module named '([\w.]+)'", reason)
        hint = install_hint(missing.group(1)) if missing else None
        if hint:  # the system's Python lacks an extra: say which (on another system, its environment file)
            reason += f" (this system {hint})"
        tail_text = handle.log_tail() if hasattr(handle, "log_tail") else ""
        log = _keep_log(cache, stage, job.job_id, tail_text)
        raise EngineError(
            f"pass {step.name!r} ({step.pass_type}) failed on {step.system_name} (input {model.path}): "
            f"{mask(reason)}" + (f"; full log: {log}" if log else ""),
            log_tail=tail_text,
        )


def _keep_log(cache: Cache, stage: Path, job_id: str, tail: str) -> Path | None:
    """The failed job's log (with its traceback) outlives the staging folder: <cache>/logs/<job_id>.log."""
    dest = cache.ensure() / "logs" / f"{job_id}.log"
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


def _on_event(step: Step, event: dict[str, Any], tracker: Tracker, reporter: Reporter) -> None:
    kind = event.get("type")
    if kind == "progress":
        tokens = event.get("tokens")
        reporter.step_progress(
            step, int(event["done"]), int(event["total"]), event.get("desc", ""),
            tokens=int(tokens) if tokens is not None else None, t=event.get("t"),
        )  # fmt: skip
    elif kind == "metric":
        tracker.forward(event, f"{step.name}/")
        reporter.step_metric(step, event["name"], event["value"], event.get("step"))
    elif kind == "param":
        tracker.forward(event, f"{step.name}/")
    elif kind == "resume":  # before the replayed history: the run may hold those steps already (a requeue)
        step.resumed_from_step = int(event["step"])
        tracker.resume(f"{step.name}/")
        note = getattr(reporter, "step_note", None) or reporter.step_log
        note(step, f"resumed from step {step.resumed_from_step}")
