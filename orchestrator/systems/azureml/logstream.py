"""Reading an Azure ML job's log files for `orch logs` (AzureMLJobHandle.logs): which files, how to read them
resumably, which errors are worth another try, and keeping SAS signatures out of anything shown.

Azure ML's contract: run-history details list `logFiles`, name -> read SAS URL of a blob in the artifact store:
- `azureml-logs/20_image_build_log.txt`: the environment image build (present while the job is Preparing, and after);
- `user_logs/std_log.txt` for a single-process job, or `user_logs/std_log_process_<rank>.txt` per rank.
Blobs are read with HTTP Range from a byte offset; only complete lines are shown until the job is terminal.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from orchestrator.core.errors import RunFailure, UserError
from orchestrator.core.fs import atomic_write_text
from orchestrator.systems.azureml import retries

BUILD_LOG = "azureml-logs/20_image_build_log.txt"
SINGLE_LOG = "user_logs/std_log.txt"
RANK_LOG_RX = re.compile(r"^user_logs/std_log_process_(\d+)\.txt$")
PRE_RUN_STATES = frozenset({"NotStarted", "Queued", "Preparing", "Starting", "Provisioning"})

# Module settings (tests shrink them): poll interval while following, retries of one poll, backoff.
POLL_S = 2.0  # seconds between polls of a followed job (logs -f, run --host aml); ORCH_AZURE_POLL_S overrides it
POLL_ENV = "ORCH_AZURE_POLL_S"
RETRY_ATTEMPTS = 8  # tries of one poll before giving up (consecutive failures; a good poll resets the count)
RETRY_BASE_S = 0.5
RETRY_CAP_S = 15.0
READ_TIMEOUT = (10.0, 60.0)  # requests (connect, read) seconds

# sig=... as a query parameter, also inside a URL-encoded URL (%3Fsig%3D..., %26sig%3D...)
_SIG_RX = re.compile(r"(?i)(?:(?<![a-z0-9_])|(?<=%3f)|(?<=%26))(sig(?:=|%3D|%253D))[^&\s'\"<>)\]]+")


def poll_seconds() -> float:
    """Seconds between two polls of a job orch follows (status and new log lines): $ORCH_AZURE_POLL_S, else POLL_S.
    Each poll is a few small requests; a shorter interval shows a job's end sooner, a longer one asks less."""
    raw = os.environ.get(POLL_ENV, "").strip()
    if not raw:
        return POLL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.05 <= value <= 600:
        raise UserError(f"{POLL_ENV}: {raw!r} is not a poll interval; set seconds between 0.05 and 600 (default 2)")
    return value


def redact_sas(text: Any) -> str:
    """`text` with the value of every SAS `sig=` query parameter (also URL-encoded) replaced by REDACTED; the
    other SAS fields (se, sp, sv, skoid, ...) are no secret on their own and stay, so expiry stays readable."""
    return _SIG_RX.sub(r"\1REDACTED", str(text))


def describe(exc: BaseException, limit: int = 300) -> str:
    """One redacted line naming an error (requests' messages embed the URL, SAS included)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    text = redact_sas(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LogReadError(RunFailure):
    """A log blob answered an HTTP error. `retry`: worth another poll (429/5xx; 403/404 of a file read before,
    where a fresh SAS URL from run history may help)."""

    def __init__(self, message: str, *, status: int, retry: bool) -> None:
        super().__init__(redact_sas(message))
        self.status = status
        self.retry = retry


def is_transient(exc: BaseException) -> bool:
    """Errors of a log poll worth another try: requests' ConnectionError (not a certificate failure), timeouts,
    a body cut short (ChunkedEncodingError), azure-core's ServiceRequestError / ServiceResponseError, HTTP
    408/429/5xx from run history or the blob, and the LogReadErrors marked retry."""
    import requests

    if isinstance(exc, LogReadError):
        return exc.retry
    if isinstance(exc, requests.exceptions.SSLError):
        return "CERTIFICATE_VERIFY_FAILED" not in str(exc)
    if isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)):
        return True
    return retries.is_transient(exc)  # azure-core's connection errors, timeouts, HTTP 408/429/5xx


def backoff(failures: int) -> float:
    """Seconds before retry number `failures` (1, 2, ...): doubling from RETRY_BASE_S, capped at RETRY_CAP_S."""
    return min(RETRY_BASE_S * 2 ** max(0, failures - 1), RETRY_CAP_S)


def rank_logs(files: dict[str, str]) -> dict[int, str]:
    """rank -> log file name among run history's logFiles: std_log_process_<N>.txt per rank, else std_log.txt as
    rank 0."""
    ranks = {int(m[1]): name for name in files if (m := RANK_LOG_RX.match(name))}
    if not ranks and SINGLE_LOG in files:
        ranks[0] = SINGLE_LOG
    return dict(sorted(ranks.items()))


def get_range(session: Any, url: str, offset: int, name: str) -> bytes | None:
    """Bytes of a log blob from `offset` (HTTP Range); None when there is nothing new (416, or 404 of a file not
    read yet: listed before its first upload). Raises LogReadError (redacted) for the other HTTP errors and lets
    requests' connection errors through (callers redact them with describe())."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with session.get(url, headers=headers, timeout=READ_TIMEOUT) as resp:
        code = resp.status_code
        if code == 416 or (code == 404 and offset == 0):
            return None
        if code >= 400:
            retry = code in (403, 404, 408, 429) or code >= 500
            raise LogReadError(f"{name}: HTTP {code} {resp.reason or ''}".rstrip(), status=code, retry=retry)
        data = resp.content
        if offset and code == 200:  # the server ignored the Range
            return data[offset:]
        return data


class OffsetStore:
    """Byte offsets per log file of one job, in <cache>/aml-logs/<job>.json, written atomically (temp + rename),
    so a later `orch logs JOB -f` continues where an interrupted one stopped."""

    def __init__(self, cache_dir: Path | str, job: str) -> None:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", job)
        self.path = Path(cache_dir) / "aml-logs" / f"{safe}.json"
        self.job = job

    def load(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        offsets = data.get("offsets") if isinstance(data, dict) and data.get("job") == self.job else None
        if not isinstance(offsets, dict):
            return {}
        return {str(k): int(v) for k, v in offsets.items() if isinstance(v, int) and v >= 0}

    def save(self, offsets: dict[str, int]) -> None:
        atomic_write_text(self.path, json.dumps({"job": self.job, "offsets": dict(sorted(offsets.items()))}) + "\n")
