"""AzureMLJobHandle: one Azure ML command job followed by name, the way the engine and the CLI verbs see it
(status, wait, live logs, cancel, outputs), including the resubmission of a job whose low-priority node was
preempted. Submitting lives in system.py; reading the log files in logstream.py."""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.core.fs import atomic_write_text
from orchestrator.core.job import RESULT_FILE, JobResult, JobState, is_uri
from orchestrator.systems.azureml.names import RESULT_OUTPUT, output_uri
from orchestrator.systems.azureml.retries import create_job_once, with_retries
from orchestrator.systems.azureml.states import map_state, status_text
from orchestrator.systems.base import JobHandle, SystemFailure

if TYPE_CHECKING:
    from orchestrator.systems.azureml.system import AzureMLSystem

PREEMPTED_RX = re.compile(r"preempt", re.IGNORECASE)  # a job that ended Failed because its node was taken back
RETRY_RX = re.compile(r"-r(\d+)$")  # <job>-r<N>: the N-th resubmission of a preempted job


class AzureMLJobHandle(JobHandle):
    """A command job in the workspace, by name: status, live logs from run history, cancel, outputs."""

    def __init__(
        self, system: AzureMLSystem, name: str, *, refs: dict[str, str] | None = None, studio_url: str | None = None
    ) -> None:
        self.system = system
        self.job_id = name
        self.name = name
        self.refs = refs or {}
        self.studio_url = studio_url
        self._offsets: dict[str, int] = {}  # log file -> bytes already shown (see logs())
        self._log_text: list[str] = []
        self._log_status = "NotStarted"  # the status seen by the last log poll
        self._logs_done: set[str] = set()  # files read to their end (the build log once the job runs)
        self._retry_lock = threading.Lock()

    @property
    def ml(self) -> Any:
        return self.system.ml

    def raw_status(self) -> str:
        job = with_retries(lambda: self.ml.jobs.get(self.name), what="job status")
        return status_text(job.status)

    def status(self) -> JobState:
        return map_state(self.raw_status())

    def wait(self, timeout: float | None = None, poll: float | None = None) -> JobState:
        """Until the job is terminal; a job that ended Failed by preemption is followed into its resubmission
        (up to the system's max_retries): the handle then names the new job. poll: seconds between status
        requests (default logstream.poll_seconds(): $ORCH_AZURE_POLL_S, else 2)."""
        from orchestrator.systems.azureml import logstream as ls

        poll = ls.poll_seconds() if poll is None else poll
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self.status()
            if state == JobState.FAILED and self.follow_retry() is not None:
                continue
            if state.is_terminal():
                return state
            if deadline is not None and time.monotonic() >= deadline:
                return state
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    # ---- preemption: Azure ML requeues a preempted job itself; one that ends Failed instead is submitted again
    def _retry_name(self, n: int) -> str:
        return f"{RETRY_RX.sub('', self.name)}-r{n}"

    def follow_retry(self) -> str | None:
        """If this job ended Failed because its low-priority node was preempted and retries are left (tag
        orch.max_retries, set from the system's max_retries), submit it again as <name>-r<N> (the same command,
        code, environment and inputs; outputs under the new name) and follow that one. Idempotent: the retry's
        name is fixed, so two followers find one job. Returns the new name, or None."""
        from azure.core.exceptions import ResourceNotFoundError

        with self._retry_lock:
            job = with_retries(lambda: self.ml.jobs.get(self.name), what="job lookup")
            if status_text(job.status) != "Failed" or not PREEMPTED_RX.search(self.error() or ""):
                return None
            m = RETRY_RX.search(self.name)
            done = int(m[1]) if m else 0
            allowed = int((job.tags or {}).get("orch.max_retries") or 0)
            if done >= allowed:
                return None
            new = self._retry_name(done + 1)
            try:
                with_retries(lambda: self.ml.jobs.get(new), what="job lookup")
            except ResourceNotFoundError:
                old = self.name
                job.name = new
                job.display_name = f"{job.display_name or old} (retry {done + 1})"
                job.tags = {**(job.tags or {}), "orch.retry_of": old, "orch.retry": str(done + 1)}
                for out in (job.outputs or {}).values():  # a fresh output folder: the failed one may hold a part
                    if getattr(out, "path", None):
                        out.path = out.path.replace(f"/{old}/", f"/{new}/")
                create_job_once(self.ml, job)
            self.name = self.job_id = new
            self._offsets, self._logs_done = {}, set()
            return new

    def retried_as(self) -> tuple[str, str] | None:
        """(name, status) of the newest resubmission of this job after a preemption, if any."""
        from azure.core.exceptions import ResourceNotFoundError

        found = None
        for n in range(1, 21):
            name = self._retry_name(n)
            try:
                found = (name, status_text(self.ml.jobs.get(name).status))
            except ResourceNotFoundError:
                break
        return found

    def error(self) -> str | None:
        """The service's error message for a failed job (run history), one paragraph."""
        details = with_retries(lambda: self.ml.jobs._runs_operations.get_run_details(self.name), what="run details")
        err = getattr(details, "error", None)
        inner = getattr(err, "error", None) if err is not None else None
        return getattr(inner, "message", None) if inner is not None else None

    # ---- logs: files, offsets, retries and SAS redaction live in logstream.py ------------------------------
    def logs(
        self,
        follow: bool = False,
        poll: float | None = None,
        *,
        ranks: int | str = 0,
        resume: bool = False,
        from_start: bool = False,
        on_notice: Callable[[str], None] | None = None,
    ) -> Iterator[str]:
        """Job log lines: rank 0's by default, one rank's (ranks=N) or every rank's (ranks="all", each line
        prefixed "[rank N] "); while the job is Preparing (or has no user log yet) also the environment image
        build log, prefixed "[image build] ". With follow, until the job is terminal.

        resume: the byte offset per log file is read from and saved to <cache>/aml-logs/<job>.json (atomic
        writes; saved after every poll and when the generator is closed), so a later call continues where this
        one stopped; from_start ignores the saved offsets. A line counts as consumed once the consumer asks for
        the next one: after a Ctrl-C or close() the line being handled when it stopped comes again, none is
        skipped. Without resume the offsets live in this handle only (the whole log, read incrementally).

        Transient errors (dropped connections, timeouts, a body cut short, 429/5xx) are retried with capped
        backoff, each retry announced through on_notice; a poll that fails logstream.RETRY_ATTEMPTS times in a
        row, or any other error, raises SystemFailure (for a follow that has not seen a terminal state: the
        stream ended before the job finished). Lines, notices and errors never carry a SAS signature."""
        import requests

        from orchestrator.systems.azureml import logstream as ls

        poll = ls.poll_seconds() if poll is None else poll
        store = ls.OffsetStore(self.system.cache_dir, self.name) if resume else None
        saved: dict[str, int] | None = None
        if store is not None:
            self._offsets = {} if from_start else store.load()
            saved = None if from_start else dict(self._offsets)
        failures = 0
        session = requests.Session()
        try:
            while True:
                try:
                    yield from self._poll_logs(session, ranks, strict=not follow)
                except SystemFailure:
                    raise
                except Exception as exc:
                    if not ls.is_transient(exc):
                        raise SystemFailure(f"reading the log of {self.name} failed: {ls.describe(exc)}") from None
                    failures += 1
                    if failures >= ls.RETRY_ATTEMPTS:
                        if follow and not map_state(self._log_status).is_terminal():
                            raise SystemFailure(
                                f"log stream of {self.name} ended before the job finished ({self._log_status}) "
                                f"after {failures} tries: {ls.describe(exc)}; "
                                f"`orch logs {self.name} -f` resumes where it stopped"
                            ) from None
                        raise SystemFailure(
                            f"reading the log of {self.name} failed after {failures} tries: {ls.describe(exc)}"
                        ) from None
                    delay = ls.backoff(failures)
                    if on_notice is not None:
                        on_notice(
                            f"log read: {ls.describe(exc, 160)}; retry {failures}/{ls.RETRY_ATTEMPTS - 1} "
                            f"in {delay:.1f}s"
                        )
                    time.sleep(delay)
                    continue
                failures = 0
                if store is not None and self._offsets != saved:
                    store.save(self._offsets)
                    saved = dict(self._offsets)
                if not follow or map_state(self._log_status).is_terminal():
                    return
                time.sleep(poll)
        finally:
            session.close()
            if store is not None and self._offsets != saved:
                with contextlib.suppress(OSError):
                    store.save(self._offsets)

    def _poll_logs(self, session: Any, ranks: int | str, *, strict: bool) -> Iterator[str]:
        """One poll: the job's status (kept in _log_status), then the new lines of each file to show, in order
        image build log, rank 0, 1, ... Only complete lines until the job is terminal (or, for the build log,
        past Preparing); each file's offset moves past a line when the consumer comes back for the next."""
        from orchestrator.systems.azureml import logstream as ls

        raw = status_text(self.ml.jobs.get(self.name).status)
        if raw == "Failed" and not strict:
            old = self.name
            if self.follow_retry() is not None:
                self._log_status = "Queued"
                yield f"orch: {old} ended Failed: its low-priority node was preempted; submitted again as {self.name}"
                return
        self._log_status = raw
        details = self.ml.jobs._runs_operations.get_run_details(self.name)
        files = dict(sorted((getattr(details, "log_files", None) or {}).items()))  # name -> SAS URL: never shown
        by_rank = ls.rank_logs(files)
        terminal = map_state(raw).is_terminal()
        chosen: list[tuple[str, str]] = []  # (file, line prefix)
        building = raw in ls.PRE_RUN_STATES or self._offsets.get(ls.BUILD_LOG, 0) > 0 or not by_rank
        if ls.BUILD_LOG in files and ls.BUILD_LOG not in self._logs_done and building:
            chosen.append((ls.BUILD_LOG, "[image build] "))
        if ranks == "all":
            chosen += [(name, f"[rank {r}] ") for r, name in by_rank.items()]
        elif ranks in by_rank:
            chosen.append((by_rank[int(ranks)], ""))
        elif by_rank and (terminal or strict):
            have = ", ".join(str(r) for r in by_rank)
            raise SystemFailure(f"job {self.name} has no log for rank {ranks} (logs of ranks: {have})")
        for name, prefix in chosen:
            build_over = name == ls.BUILD_LOG and raw not in ls.PRE_RUN_STATES
            data = ls.get_range(session, files[name], self._offsets.get(name, 0), name)
            if data:
                end = len(data) if (terminal or build_over) else data.rfind(b"\n") + 1
                for piece in data[:end].splitlines(keepends=True):
                    line = prefix + ls.redact_sas(piece.decode(errors="replace").rstrip("\r\n"))
                    self._log_text = (self._log_text + [line])[-200:]
                    yield line
                    self._offsets[name] = self._offsets.get(name, 0) + len(piece)
            if build_over:
                self._logs_done.add(name)

    def log_tail(self, n: int = 30) -> str:
        with contextlib.suppress(Exception):  # the tail is a courtesy; the error message matters more
            list(self.logs(follow=False))
        tail = "\n".join(self._log_text[-n:])
        err = None
        with contextlib.suppress(Exception):
            err = self.error()
        return f"{tail}\n{err}" if err else tail

    def cancel(self) -> bool:
        if self.status().is_terminal():
            return False
        poller = with_retries(lambda: self.ml.jobs.begin_cancel(self.name), what="cancel")
        poller.result()
        return True

    def output_files(self, output: str = RESULT_OUTPUT) -> Any:
        """(container client, prefix) of a named output (the fixed datastore path set at submit)."""
        from orchestrator.systems.azureml.download import DATASTORE_RX, datastore_source

        job = with_retries(lambda: self.ml.jobs.get(self.name), what="job")
        out = (job.outputs or {}).get(output)
        uri = getattr(out, "path", None) or output_uri(self.name, output)
        m = DATASTORE_RX.match(uri)
        if not m:
            raise SystemFailure(f"output {output} of {self.name} is not on a datastore ({uri})")
        src = datastore_source(self.ml, m[1], m[2])
        return src, uri

    def outputs(self, dest: Path | None = None) -> Path:
        """result.json + events.jsonl + job.log into dest; model paths in result.json become azureml:// URIs of
        the job's output (the model itself stays in the workspace until the final export)."""
        from orchestrator.systems.azureml.download import safe_join

        dest = Path(dest or (self.system.cache_dir / "aml-results" / self.name))
        dest.mkdir(parents=True, exist_ok=True)
        src, uri = self.output_files()
        prefix = src.prefix.rstrip("/") + "/"
        for fname in (RESULT_FILE, "events.jsonl"):
            blob = src.container.get_blob_client(prefix + fname)
            try:
                data = with_retries(lambda blob=blob: blob.download_blob().readall(), what="output download")
            except Exception as exc:  # noqa: BLE001 - a missing file is reported below by the engine
                if type(exc).__name__ == "ResourceNotFoundError":
                    continue
                raise
            atomic_write_text(safe_join(dest, fname), data.decode())
        try:
            log = "\n".join(self._log_text + list(self.logs(follow=False)))
            atomic_write_text(dest / "job.log", log + "\n")
        except Exception:  # noqa: BLE001 - the log is informative only
            pass
        if (dest / RESULT_FILE).exists():
            result = JobResult.read(dest)
            if result.model is not None:
                result.model = result.model.model_copy(
                    update={"path": self._remote(result.model.path, uri, "model"),
                            "adapter_path": self._remote(result.model.adapter_path, uri, "adapter")}
                )  # fmt: skip
                result.write(dest)
        return dest

    def _remote(self, path: str | None, base_uri: str, field: str) -> str | None:
        """A path the runner wrote -> where it is now: relative -> inside the output; absolute (a pass-through
        input) -> the reference that input was given as."""
        if path is None or is_uri(path):
            return path
        if os.path.isabs(path):
            ref = self.refs.get(field)
            if ref is None:
                raise SystemFailure(f"job {self.name}: result names a local path {path} that is not an input")
            return ref
        return base_uri.rstrip("/") + "/" + Path(path).as_posix().removeprefix("./")
