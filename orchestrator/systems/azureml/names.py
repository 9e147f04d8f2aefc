"""What an Azure ML job is called and where its output lives, both fixed on the client before the first submit
attempt: a submit retried after a lost answer, or run again while its job is live, finds that job by name instead
of creating a twin, and the next pass can take the output by reference before the job has ended."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from orchestrator.core.job import JobState
from orchestrator.systems.azureml.retries import with_retries
from orchestrator.systems.azureml.states import map_state
from orchestrator.systems.base import SystemFailure

DEFAULT_DATASTORE = "workspaceblobstore"
RESULT_OUTPUT = "result"


def output_uri(job_name: str, output: str = RESULT_OUTPUT, datastore: str = DEFAULT_DATASTORE) -> str:
    """Where a job's named output lives: fixed at submit time, so it is known before the job ends."""
    return f"azureml://datastores/{datastore}/paths/azureml/{job_name}/{output}/"


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", label.lower()).strip("-")[:40] or "job"


def definition_name(label: str, definition: Any) -> str:
    """orch-<label>-<hash of the job's definition>: the same workflow submitted twice gets the same name, so a
    submit retried after a lost answer, or run again while its job is live, finds that job instead of a twin."""
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"orch-{_slug(label)}-{digest}"


def claim_job_name(ml: Any, base: str, *, force: bool = False, limit: int = 50) -> tuple[str, Any]:
    """(name, live job or None) for a definition-named job: a live job of that definition is returned to attach to
    (unless `force`); a finished one is never reused (Azure ML job names are unique forever): -2, -3, ... follow."""
    from azure.core.exceptions import ResourceNotFoundError

    for i in range(1, limit + 1):
        name = base if i == 1 else f"{base}-{i}"
        try:
            existing = with_retries(lambda n=name: ml.jobs.get(n), what="job lookup")
        except ResourceNotFoundError:
            return name, None
        if not force and map_state(existing.status) in (JobState.QUEUED, JobState.RUNNING):
            return name, existing
    raise SystemFailure(f"{limit} jobs named {base}-N exist already; pass --name")
