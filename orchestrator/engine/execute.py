"""One job submitted and followed to its end: logs pumped on a thread, events turned into progress and metrics,
a failure turned into one EngineError line naming the pass, the cause and the kept log."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path
from typing import Any

from orchestrator.core.cache import Cache
from orchestrator.core.extras import install_hint
from orchestrator.core.job import EVENTS_FILE, Job, JobResult, JobState, ModelArtifact
from orchestrator.engine.steps import EngineError, Reporter, Step
from orchestrator.engine.tracking import EventTail, Tracker, mask
from orchestrator.systems.base import System


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
