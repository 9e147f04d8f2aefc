"""The Azure ML service's job status words -> orch's JobState, in one place: the handle's status and wait, the log
follower, the name claim (is the job of that name still live?) and `orch submit`'s answer all read them alike."""

from __future__ import annotations

from typing import Any

from orchestrator.core.job import JobState

STATE_MAP = {
    "NotStarted": JobState.QUEUED,
    "Queued": JobState.QUEUED,
    "Preparing": JobState.QUEUED,
    "Starting": JobState.QUEUED,
    "Provisioning": JobState.QUEUED,
    "Running": JobState.RUNNING,
    "Finalizing": JobState.RUNNING,
    "CancelRequested": JobState.RUNNING,
    "NotResponding": JobState.RUNNING,  # a node missed heartbeats; Azure ML keeps the job and it may recover
    "Paused": JobState.RUNNING,
    "Completed": JobState.COMPLETED,
    "Failed": JobState.FAILED,
    "Canceled": JobState.CANCELED,
}


def status_text(status: Any) -> str:
    """The service's status word (the SDK hands back a JobStatus enum whose str() is 'JobStatus.X')."""
    return str(getattr(status, "value", status) or "NotStarted")


def map_state(status: Any) -> JobState:
    return STATE_MAP.get(status_text(status), JobState.RUNNING)
