"""`orch logs JOB [-f]` against the local Azure stand-in: the real azure-ai-ml SDK (job status, run-history
logFiles) and real requests reads of Azurite blobs through SAS URLs. No job is submitted: each test makes a job
record in the stand-in's state, uploads the log blobs where Azure ML keeps them (ExperimentRun/dcid.<job>/ in
the artifact container) and drives the status by setting job.status.

Flaky networks are real sockets: a small TCP proxy in front of Azurite (the SAS URLs of run history point at it)
resets connections or cuts a response mid-body. Nothing of requests is mocked."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from orchestrator.systems.azureml import logstream

pytestmark = pytest.mark.azure

BUILD = logstream.BUILD_LOG
STD = logstream.SINGLE_LOG


# ---- fixtures + helpers -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.azure_standin import start_standin

    tmp = tmp_path_factory.mktemp("aml-logs")
    saved = dict(os.environ)
    with start_standin(tmp / "standin") as s:
        os.environ.update(s.settings["env"])
        os.environ["ORCH_AZURE_CLOUD"] = s.cloud_name
        os.environ["ORCH_AZURE_CLOUD_METADATA"] = json.dumps(s.cloud_metadata())
        os.environ["ORCH_PROFILE"] = str(tmp / "profile.json")
        os.environ["ORCH_CACHE_DIR"] = str(tmp / "client-cache")
        try:
            yield s
        finally:
            os.environ.clear()
            os.environ.update(saved)


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Poll and back off in tens of milliseconds instead of seconds."""
    monkeypatch.setattr(logstream, "POLL_S", 0.05)
    monkeypatch.setattr(logstream, "RETRY_BASE_S", 0.02)
    monkeypatch.setattr(logstream, "RETRY_CAP_S", 0.2)
    monkeypatch.setattr(logstream, "RETRY_ATTEMPTS", 6)


def _job(s: Any, status: str, *, listed_std_log: bool = False) -> str:
    """A Command job record, as PUT would have made it, without running anything. listed_std_log: run history
    lists user_logs/std_log.txt even before (or after) its blob exists, as for a started job."""
    from tests.azure_standin import state as st

    name = f"orch-logs-{uuid.uuid4().hex[:10]}"
    props = {
        "jobType": "Command", "command": "echo hi", "environmentId": "azureml:orch-env:1",
        "experimentName": "Default", "displayName": name, "properties": {}, "tags": {}, "inputs": {},
        "outputs": {}, "environmentVariables": {}, "isArchived": False, "computeId": None,
    }  # fmt: skip
    job = st.JobRecord(name=name, body=props, created=st.now_iso(), status=status)
    if listed_std_log:
        job.log_path = "listed"
    with s.state.lock:
        s.state.jobs[name] = job
    return name


def _set_status(s: Any, job: str, status: str) -> None:
    with s.state.lock:
        s.state.jobs[job].status = status


def _blob(job: str, file: str) -> str:
    from tests.azure_standin.routes_runhistory import log_prefix

    return log_prefix(job) + file


def _put(s: Any, job: str, file: str, text: str) -> None:
    from tests.azure_standin import state as st

    s.azurite.upload_bytes(st.ARTIFACT_CONTAINER, _blob(job, file), text.encode())


def _delete(s: Any, job: str, file: str) -> None:
    from tests.azure_standin import state as st

    s.azurite.service().get_blob_client(st.ARTIFACT_CONTAINER, _blob(job, file)).delete_blob()


def _orch(*args: str) -> Any:
    from orchestrator.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def _lines(n: int, start: int = 0, tag: str = "line") -> list[str]:
    return [f"{tag} {i:05d} " + "x" * 40 for i in range(start, start + n)]


def _text(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def _offsets(job: str) -> dict[str, int]:
    return logstream.OffsetStore(os.environ["ORCH_CACHE_DIR"], job).load()


def _assert_no_sig(*texts: str) -> None:
    """No SAS signature value: `sig=` appears only as `sig=REDACTED`."""
    for text in texts:
        assert not re.search(r"(?i)sig(=|%3D)(?!REDACTED)", text), text


@contextlib.contextmanager
def _interrupt_after(n: int) -> Iterator[list[str]]:
    """The boundary of an interrupted follow: `out.print` of the CLI raises KeyboardInterrupt (what Ctrl-C does
    there) when asked to print line n+1, so exactly n lines were shown. The next `orch logs -f` must start with
    line n+1: a line counts as shown once its print returned."""
    from orchestrator.cli import azure as aml_cli

    shown: list[str] = []
    real = aml_cli.out.print

    def print_or_interrupt(*args: Any, **kwargs: Any) -> None:
        if len(shown) == n:
            raise KeyboardInterrupt
        real(*args, **kwargs)
        shown.append(str(args[0]))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(aml_cli.out, "print", print_or_interrupt)
        yield shown


class FlakyProxy:
    """A TCP proxy 127.0.0.1:port -> 127.0.0.1:target (TLS passes through untouched). `drops`: the next new
    connections are reset at once; `cuts`: that many connections are closed once the server has sent them
    `cut_at` bytes (mid-response); `down`: every connection is reset. kill_all() closes live connections."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.drops = 0
        self.cuts = 0
        self.cut_at = 30_000
        self.down = False
        self.stats: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.live: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                drop = self.down or self.drops > 0
                if drop and not self.down:
                    self.drops -= 1
                self.stats["drop" if drop else "conn"] += 1
            if drop:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
                client.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target))
        except OSError:
            client.close()
            return
        with self.lock:
            self.live |= {client, upstream}
        threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
        self._pump(upstream, client, True)

    def _pump(self, src: socket.socket, dst: socket.socket, may_cut: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                if may_cut and sent + len(data) >= self.cut_at:
                    with self.lock:
                        cut = self.cuts > 0
                        self.cuts -= cut
                    if cut:
                        dst.sendall(data[: self.cut_at - sent])
                        self.stats["cut"] += 1
                        break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            self._close(src, dst)

    def _close(self, *socks: socket.socket) -> None:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            with self.lock:
                self.live.discard(sock)

    def kill_all(self) -> None:
        with self.lock:
            live = list(self.live)
        self._close(*live)

    def stop(self) -> None:
        self.listener.close()
        self.kill_all()


@pytest.fixture
def proxy(standin: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlakyProxy]:
    """Run history hands out SAS URLs that go through a FlakyProxy in front of Azurite."""
    p = FlakyProxy(standin.azurite.port)
    real = standin.azurite.blob_sas_url
    direct = f".localhost:{standin.azurite.port}/"

    def via_proxy(container: str, blob: str, hours: int = 24) -> str:
        return real(container, blob, hours).replace(direct, f".localhost:{p.port}/", 1)

    monkeypatch.setattr(standin.azurite, "blob_sas_url", via_proxy)
    yield p
    p.stop()


def _wait(cond: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


# ---- tests --------------------------------------------------------------------------------------------------
def test_follow_resumes_where_an_interrupted_follow_stopped(standin: Any) -> None:
    s = standin
    job = _job(s, "Running")
    first = _lines(10)
    _put(s, job, STD, _text(first))
    with _interrupt_after(4) as shown:
        res = _orch("logs", job, "-f")
    assert res.exit_code == 130, res.output
    assert shown == first[:4]
    assert "continues from here" in res.output
    assert _offsets(job) == {STD: len(_text(first[:4]))}  # saved on the way out

    more = _lines(5, start=10)
    _put(s, job, STD, _text(first + more) + "last line without newline")
    _set_status(s, job, "Completed")
    res = _orch("logs", job, "-f")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == first[4:] + more + ["last line without newline"]  # nothing repeated
    assert f"{job}: Completed" in res.stderr

    everything = first + more + ["last line without newline"]
    res = _orch("logs", job)  # plain: the whole log, whatever -f saw
    assert res.exit_code == 0 and res.stdout.splitlines() == everything, res.output
    res = _orch("logs", job, "-f")  # resumes at the end: nothing new
    assert res.exit_code == 0 and res.stdout == "", res.output
    res = _orch("logs", job, "-f", "--from-start")
    assert res.exit_code == 0 and res.stdout.splitlines() == everything, res.output
    _assert_no_sig(res.output)


def test_flaky_connection_is_retried_without_losing_or_doubling_lines(standin: Any, proxy: FlakyProxy) -> None:
    """Preparing (image build log) -> Running (a ~85 KB user log, read through connections cut mid-body) ->
    more log -> Completed, while the first three connections to the blob store are reset."""
    s = standin
    job = _job(s, "Preparing")
    build = ["build step 1", "build step 2", "build step 3"]
    part1, part2 = _lines(1500), _lines(1500, start=1500)
    _put(s, job, BUILD, _text(build))
    proxy.drops = 3
    errors: list[BaseException] = []

    def drive() -> None:
        try:
            _wait(lambda: _offsets(job).get(BUILD) == len(_text(build)), "build log read while Preparing")
            _put(s, job, BUILD, _text([*build, "build step 4"]) + "build done")
            proxy.cuts, proxy.cut_at = 2, 30_000
            proxy.kill_all()  # fresh connections: the next two are cut once 30 KB went through
            _put(s, job, STD, _text(part1))
            _set_status(s, job, "Running")
            _wait(lambda: _offsets(job).get(STD) == len(_text(part1)), "first part of the user log read")
            _put(s, job, STD, _text(part1 + part2) + "tail")
            _set_status(s, job, "Completed")
        except BaseException as exc:  # noqa: BLE001 - reported below; the follow must end either way
            errors.append(exc)
            _set_status(s, job, "Canceled")

    driver = threading.Thread(target=drive)
    driver.start()
    res = _orch("logs", job, "-f")
    driver.join(30)
    assert not errors, errors
    assert res.exit_code == 0, res.output
    expected = [f"[image build] {b}" for b in [*build, "build step 4", "build done"]] + part1 + part2 + ["tail"]
    assert res.stdout.splitlines() == expected
    assert proxy.stats["drop"] == 3 and proxy.stats["cut"] == 2, proxy.stats
    notices = [line for line in res.stderr.splitlines() if line.startswith("log read: ")]
    assert len(notices) >= 5, res.stderr
    assert f"{job}: Completed" in res.stderr
    _assert_no_sig(res.output)


def test_rank_zero_by_default_all_ranks_and_one_rank(standin: Any) -> None:
    s = standin
    job = _job(s, "Completed")
    for r in range(3):
        _put(s, job, f"user_logs/std_log_process_{r}.txt", _text([f"rank{r} a", f"rank{r} b"]))
    res = _orch("logs", job)
    assert res.exit_code == 0 and res.stdout.splitlines() == ["rank0 a", "rank0 b"], res.output
    res = _orch("logs", job, "--all-ranks")
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [f"[rank {r}] rank{r} {x}" for r in range(3) for x in "ab"]
    res = _orch("logs", job, "--rank", "2")
    assert res.exit_code == 0 and res.stdout.splitlines() == ["rank2 a", "rank2 b"], res.output
    res = _orch("logs", job, "--rank", "5")
    assert res.exit_code == 1 and "no log for rank 5" in res.output and "Traceback" not in res.output
    assert _orch("logs", job, "--rank", "1", "--all-ranks").exit_code == 2

    single = _job(s, "Completed")
    _put(s, single, STD, _text(["only one process"]))
    res = _orch("logs", single, "--all-ranks")
    assert res.exit_code == 0 and res.stdout.splitlines() == ["[rank 0] only one process"], res.output


def test_build_log_while_preparing_then_user_log(standin: Any) -> None:
    s = standin
    job = _job(s, "Preparing")
    _put(s, job, BUILD, _text(["Step 1/3 : FROM mcr.microsoft.com/azureml/base", "Step 2/3 : RUN conda env"]))
    res = _orch("logs", job)
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == [
        "[image build] Step 1/3 : FROM mcr.microsoft.com/azureml/base",
        "[image build] Step 2/3 : RUN conda env",
    ]
    _set_status(s, job, "Running")
    _put(s, job, STD, _text(["training starts"]))
    res = _orch("logs", job)
    assert res.exit_code == 0 and res.stdout.splitlines() == ["training starts"], res.output


def test_no_sas_signature_when_the_blob_is_gone(standin: Any) -> None:
    """A log blob that was read and then deleted answers 404: retried (run history may hand out a fresh URL),
    then one line, exit 1, no traceback, no signature."""
    s = standin
    job = _job(s, "Running", listed_std_log=True)
    _put(s, job, STD, _text(_lines(3)))
    with _interrupt_after(2):
        assert _orch("logs", job, "-f").exit_code == 130
    _delete(s, job, STD)
    res = _orch("logs", job, "-f")
    assert res.exit_code == 1, res.output
    assert "ended before the job finished" in res.output and "HTTP 404" in res.output
    assert "Traceback" not in res.output
    assert sum(line.startswith("log read: ") for line in res.stderr.splitlines()) == logstream.RETRY_ATTEMPTS - 1
    _assert_no_sig(res.output)


def test_no_sas_signature_when_the_blob_store_is_down(standin: Any, proxy: FlakyProxy) -> None:
    import requests

    s = standin
    job = _job(s, "Running")
    _put(s, job, STD, _text(_lines(3)))
    proxy.down = True
    res = _orch("logs", job, "-f")
    assert res.exit_code == 1, res.output
    assert "ended before the job finished" in res.output and "orch logs" in res.output
    assert "Traceback" not in res.output
    assert sum(line.startswith("log read: ") for line in res.stderr.splitlines()) == logstream.RETRY_ATTEMPTS - 1
    _assert_no_sig(res.output)
    res = _orch("logs", job)
    assert res.exit_code == 1 and "failed after" in res.output, res.output
    _assert_no_sig(res.output)

    proxy.stop()  # nothing listens any more: connection refused, and requests' message names the URL
    res = _orch("logs", job, "-f")
    assert res.exit_code == 1 and "ended before the job finished" in res.output, res.output
    assert "Max retries exceeded with url" in res.output  # the URL was in the error ...
    _assert_no_sig(res.output)  # ... but not its signature

    from tests.azure_standin import state as st

    url = s.azurite.blob_sas_url(st.ARTIFACT_CONTAINER, _blob(job, STD))
    with pytest.raises(requests.ConnectionError) as err:
        requests.get(url, timeout=5)
    assert "sig=" in str(err.value)  # what made redact_sas necessary
    _assert_no_sig(logstream.describe(err.value), logstream.redact_sas(str(err.value)))


def test_redact_sas() -> None:
    url = "https://a.blob.core.windows.net/c/b.txt?se=2026-12-03T15%3A18%3A27Z&sp=r&sv=2026-10-06&sr=b&sig=7a2V%2B/o%3D"
    assert logstream.redact_sas(url).endswith("&sr=b&sig=REDACTED")
    assert "se=2026-12-03" in logstream.redact_sas(url)
    assert logstream.redact_sas(f"GET {url} failed") == f"GET {url.split('sig=')[0]}sig=REDACTED failed"
    assert logstream.redact_sas("u?SIG=abc&x=1 and u%3Fsig%3Dabc%26x") == "u?SIG=REDACTED&x=1 and u%3Fsig%3DREDACTED"
    assert logstream.redact_sas("signal=3 design=ok") == "signal=3 design=ok"


def test_the_poll_interval_is_a_user_setting(standin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """ORCH_AZURE_POLL_S sets how often a followed job is polled; a value that is no interval is refused in one
    line naming the variable (exit 2), not taken as some other number."""
    from orchestrator.core.errors import UserError, exit_code

    monkeypatch.delenv("ORCH_AZURE_POLL_S", raising=False)
    assert logstream.poll_seconds() == logstream.POLL_S
    monkeypatch.setenv("ORCH_AZURE_POLL_S", "0.25")
    assert logstream.poll_seconds() == 0.25
    for bad in ("0", "-1", "fast", "1e9"):
        monkeypatch.setenv("ORCH_AZURE_POLL_S", bad)
        with pytest.raises(UserError, match=r"^ORCH_AZURE_POLL_S: .* between 0\.05 and 600") as info:
            logstream.poll_seconds()
        assert exit_code(info.value) == 2
    job = _job(standin, "Running", listed_std_log=True)
    monkeypatch.setenv("ORCH_AZURE_POLL_S", "fast")
    res = _orch("logs", job, "-f")
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert res.output.strip().splitlines()[-1].startswith("orch: error: ORCH_AZURE_POLL_S: 'fast'"), res.output
