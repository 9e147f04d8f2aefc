"""Talking to the Azure ML control plane through flaky networks: which errors are worth another try, retries with
backoff, and a job create that happens exactly once however often its answer is lost. Every SDK call of the
system, the handle and the name claim goes through here."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from orchestrator.systems.base import SystemFailure


def is_transient(exc: BaseException) -> bool:
    """429, 5xx, timeouts and dropped connections: worth another try."""
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

    if isinstance(exc, (ServiceRequestError, ServiceResponseError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, HttpResponseError):
        code = getattr(exc, "status_code", None) or getattr(getattr(exc, "response", None), "status_code", None)
        return code in (408, 429) or (code is not None and code >= 500)
    return False


def with_retries(fn: Callable[[], Any], *, what: str, attempts: int = 5, base_delay: float = 1.0) -> Any:
    """Call fn, retrying transient errors with exponential backoff (on top of azure-core's own retries)."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or attempt == attempts - 1:
                raise
            time.sleep(min(base_delay * 2**attempt, 20))
    raise AssertionError("unreachable")


def create_job_once(ml: Any, job: Any, *, attempts: int = 5) -> Any:
    """Create the job named job.name exactly once: before every (re)try, GET it; if it exists, that is ours."""
    from azure.core.exceptions import ResourceNotFoundError

    last: BaseException | None = None
    for attempt in range(attempts):
        try:
            return ml.jobs.get(job.name)
        except ResourceNotFoundError:
            pass
        except Exception as exc:
            if not is_transient(exc):
                raise
            last = exc
            time.sleep(min(2**attempt, 20))
            continue
        try:
            return ml.jobs.create_or_update(job)
        except Exception as exc:
            if not is_transient(exc):
                raise
            last = exc
            time.sleep(min(2**attempt, 20))
    raise SystemFailure(f"submitting Azure ML job {job.name} failed after {attempts} tries: {last}")
