"""Rich rendering of an engine run: the plan table, a progress bar per pass, live logs and metrics."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text

from orchestrator.core.errors import RunFailure
from orchestrator.core.progress import ProgressLines
from orchestrator.engine import Step, StepRecord

SHOWN_METRICS = ("train_loss", "eval_loss", "accuracy", "perplexity", "tokens_per_s", "parity_max_abs_diff")


def plan_table(steps: list[Step]) -> Table:
    table = Table(title="plan", show_lines=False)
    for col in ("#", "pass", "type", "system", "cache"):
        table.add_column(col)
    for i, s in enumerate(steps, 1):
        where = f" ({s.where})" if s.where and s.where != "local" else ""
        cache = f"[green]hit{where}[/]" if s.cached else "[yellow]run[/]"
        table.add_row(str(i), escape(s.name), s.pass_type, escape(f"{s.system_name} ({s.role})"), cache)
    return table


class RichReporter:
    def __init__(self, console: Console | None = None, *, verbose: bool = False) -> None:
        self.console = console or Console(stderr=True)
        self.verbose = verbose
        # fixed widths for the pass, bar, count and time; the metrics fold onto a second line rather than being
        # cut with "..." (at 120 columns a long pass name squeezed every other column to nothing)
        self.progress = Progress(
            SpinnerColumn(table_column=Column(no_wrap=True, min_width=1)),
            TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True, min_width=12)),
            BarColumn(bar_width=20, table_column=Column(no_wrap=True, min_width=20)),
            TextColumn("{task.completed:>4.0f}/{task.total!s:<5}", table_column=Column(no_wrap=True, min_width=10)),
            TimeElapsedColumn(table_column=Column(no_wrap=True, min_width=7)),
            TextColumn("[dim]{task.fields[info]}", table_column=Column(ratio=1, overflow="fold", min_width=20)),
            console=self.console,
            transient=False,
            expand=True,
        )
        self.tasks: dict[str, TaskID] = {}
        self.latest: dict[str, dict[str, float]] = {}

    def plan(self, steps: list[Step]) -> None:
        self.console.print(plan_table(steps))

    def note(self, message: str) -> None:
        self.progress.console.print(Text("note: ", style="cyan") + Text(message), highlight=False, soft_wrap=True)

    def step_start(self, step: Step) -> None:
        if not self.progress.live.is_started:
            self.progress.start()
        self.tasks[step.name] = self.progress.add_task(escape(f"{step.name} ({step.pass_type})"), total=None, info="")
        self.latest[step.name] = {}

    def step_progress(self, step: Step, done: int, total: int, desc: str, **_: Any) -> None:
        self.progress.update(self.tasks[step.name], completed=done, total=total)

    def step_log(self, step: Step, line: str) -> None:
        if self.verbose:
            # a Text: the step name dim, the log line exactly as written (no markup is read from it)
            self.progress.console.print(Text(f"{step.name}| ", style="dim") + Text(line), highlight=False)
        else:
            # the info column is rendered as markup: a log line's "[...]" must print as written
            self.progress.update(self.tasks[step.name], info=escape(line.strip()[:60]))

    def step_metric(self, step: Step, name: str, value: float, at: int | None = None) -> None:
        self.latest[step.name][name] = value
        shown = ", ".join(f"{k}={v:.4g}" for k, v in self.latest[step.name].items() if k in SHOWN_METRICS)
        self.progress.update(self.tasks[step.name], info=shown)

    def step_note(self, step: Step, message: str) -> None:
        """A line that stays (the info column only shows the latest one): e.g. `lora: resumed from step 20`."""
        self.progress.console.print(Text(f"{step.name}: ", style="cyan") + Text(message), highlight=False)

    def step_end(self, step: Step, record: StepRecord) -> None:
        task = self.tasks[step.name]
        total = self.progress.tasks[task].total or 1
        shown = ", ".join(f"{k}={v:.4g}" for k, v in record.metrics.items() if k in SHOWN_METRICS)
        if record.cached:
            note = f"cached ({record.cached_in})" if record.cached_in not in ("", "local") else "cached"
        else:
            note = f"{record.duration_s:.1f}s" + (f" ${record.cost_usd:.4f}" if record.cost_usd else "")
        if record.resumed_from_step is not None and not record.cached:
            note += f" (resumed from step {record.resumed_from_step})"
        self.progress.update(task, completed=total, total=total, info=f"{note} {shown}")
        if step.role == "target" or step is None:
            self.stop()

    def stop(self) -> None:
        if self.progress.live.is_started:
            self.progress.stop()


class LineReporter:
    """The run as plain lines, for a stderr that is no terminal (CI, `| tee`, a log file): rich's bars would
    print nothing until the end there. One line when a pass starts and ends, and a progress line every few seconds
    (core.progress: step/total, loss, tokens/s, ETA). With `verbose` the job's own log is shown instead, which
    carries the same progress lines (written by the runner)."""

    def __init__(self, console: Console, *, verbose: bool = False) -> None:
        self.console = console
        self.verbose = verbose
        self.lines: dict[str, ProgressLines] = {}
        self.latest: dict[str, dict[str, float]] = {}

    def _say(self, text: str) -> None:
        self.console.print(Text(text), highlight=False, soft_wrap=True)
        self.console.file.flush()

    def plan(self, steps: list[Step]) -> None:
        self.console.print(plan_table(steps))  # a table prints as text too

    def step_start(self, step: Step) -> None:
        self.lines[step.name] = ProgressLines()
        self.latest[step.name] = {}
        what = "from the cache" if step.cached else f"running on {step.system_name}"
        self._say(f"{step.name} ({step.pass_type}): {what}")

    def step_progress(
        self, step: Step, done: int, total: int, desc: str, *, tokens: int | None = None, t: float | None = None
    ) -> None:
        desc = "" if desc == step.pass_type else desc  # the pass type is on the line already
        line = self.lines[step.name].update(done, total, t=t, tokens=tokens, desc=desc)
        if line and not self.verbose:
            self._say(f"{step.name} ({step.pass_type}) {line}")

    def step_log(self, step: Step, line: str) -> None:
        if self.verbose:
            self._say(f"{step.name}| {line.rstrip()}")

    def step_note(self, step: Step, message: str) -> None:
        self._say(f"{step.name}: {message}")

    def note(self, message: str) -> None:
        self._say(f"note: {message}")

    def step_metric(self, step: Step, name: str, value: float, at: int | None = None) -> None:
        self.lines[step.name].metric(name, value)
        self.latest[step.name][name] = value

    def step_end(self, step: Step, record: StepRecord) -> None:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in record.metrics.items() if k in SHOWN_METRICS)
        if record.cached:
            note = f"cached ({record.cached_in})" if record.cached_in not in ("", "local") else "cached"
        else:
            note = f"done in {record.duration_s:.1f}s" + (f" ${record.cost_usd:.4f}" if record.cost_usd else "")
        self._say(f"{step.name} ({step.pass_type}): {note}" + (f"  {shown}" if shown else ""))

    def stop(self) -> None: ...


def make_reporter(console: Console, *, verbose: bool = False) -> RichReporter | LineReporter:
    """Bars on a terminal, lines anywhere else."""
    return RichReporter(console, verbose=verbose) if console.is_terminal else LineReporter(console, verbose=verbose)


def metrics_table(metrics: dict[str, Any], title: str = "metrics") -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    return table


# ---------------------------------------------------------------------------------------------- `orch ui`
# The MLflow UI on one run: a local `mlflow server` over the run's tracking store (sqlite), and the run page's URL.


def mlflow_run_ref(manifest_path: Path) -> tuple[str, str]:
    """(tracking_uri, run_id) recorded by a published workflow run (output_dir/manifest.json)."""
    import json

    if not manifest_path.is_file():
        raise UiError(f"{manifest_path} does not exist: run the workflow first (`orch demo`, `orch run ...`)")
    mlflow_info = json.loads(manifest_path.read_text()).get("mlflow") or {}
    if not mlflow_info.get("run_id") or not mlflow_info.get("tracking_uri"):
        raise UiError(f"{manifest_path} names no MLflow run (was it run with --no-tracking?)")
    return str(mlflow_info["tracking_uri"]), str(mlflow_info["run_id"])


def experiment_of(tracking_uri: str, run_id: str) -> str:
    """The experiment id of a run (read-only sqlite query: no MLflow import, no store migration)."""
    import sqlite3

    db = sqlite_path(tracking_uri)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT experiment_id FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
    if row is None:
        raise UiError(f"run {run_id} is not in {tracking_uri}")
    return str(row[0])


def loss_metric_keys(tracking_uri: str, run_id: str) -> list[str]:
    """The run's loss-like metric keys, whatever the pass calls them (read-only sqlite query)."""
    import sqlite3

    from orchestrator.engine.plots import is_loss

    db = sqlite_path(tracking_uri)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT DISTINCT key FROM metrics WHERE run_uuid = ?", (run_id,)).fetchall()
    return sorted(key for (key,) in rows if is_loss(key.rpartition("/")[2]))


def sqlite_path(tracking_uri: str) -> Path:
    if not tracking_uri.startswith("sqlite:///"):
        raise UiError(f"orch ui serves local sqlite tracking stores; {tracking_uri} is a server: open it in a browser")
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    if not db.is_file():
        raise UiError(f"tracking store {db} does not exist")
    return db


def run_page_url(base_url: str, experiment_id: str, run_id: str, tab: str = "model-metrics") -> str:
    """The MLflow UI's page of one run (React router hash URL); tab model-metrics holds the loss charts."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/{tab}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class UiError(RunFailure, RuntimeError):
    """A one-line problem of `orch ui` (what is missing and the fix)."""


# The name headless Chromium loads the UI by for screenshots. MLflow's UI opens its assistant panel over a quarter
# of the page when it is served from "localhost" / "127.0.0.1"; from another name that still is loopback (Chromium
# resolves *.localhost itself) it does not. The server is told to accept this Host header.
SCREENSHOT_HOST = "orch-ui.localhost"


def start_mlflow_ui(
    tracking_uri: str, *, port: int | None = None, log_path: Path | None = None, screenshot: bool = False
) -> tuple[Any, str]:
    """Start `mlflow server` on 127.0.0.1 over a sqlite store; returns (process, base URL) once /health answers.

    One worker and no job execution: healthy in ~10 s with ~0.5 GB, where the default start spawns 15 processes
    (../shared/FACTS.md). With `screenshot` the base URL uses SCREENSHOT_HOST. The caller stops the process
    (stop_mlflow_ui)."""
    import os
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    db = sqlite_path(tracking_uri)
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_path = log_path or Path(tempfile.gettempdir()) / f"orch-mlflow-ui-{port}.log"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if screenshot:
        cmd += ["--allowed-hosts", ",".join(f"{h}:{port}" for h in ("127.0.0.1", "localhost", SCREENSHOT_HOST))]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-600:]
            raise UiError(f"mlflow server exited with {proc.returncode}; log {log_path}: {' '.join(tail.split())}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, (f"http://{SCREENSHOT_HOST}:{port}" if screenshot else base)
        except OSError:
            time.sleep(0.5)
    stop_mlflow_ui(proc)
    raise UiError(f"mlflow server did not answer {base}/health within 90 s; log {log_path}")


def stop_mlflow_ui(proc: Any) -> None:
    """Stop the server this module started (its own process group: the worker goes with it)."""
    import os
    import signal
    import subprocess

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def metric_page_url(base_url: str, experiment_id: str, run_id: str, key: str | list[str]) -> str:
    """The MLflow UI's chart page of one run's metrics, drawn in one chart (the route its "Plot chart" links
    build)."""
    import json
    from urllib.parse import quote

    keys_list = [key] if isinstance(key, str) else list(key)
    runs, exps, keys = json.dumps([run_id]), json.dumps([experiment_id]), json.dumps(keys_list)
    query = (
        f"?runs={quote(runs)}&metric={quote(json.dumps(keys_list[0]))}&experiments={quote(exps)}"
        f"&plot_metric_keys={quote(keys)}&plot_layout={quote('{}')}&x_axis=step&y_axis_scale=linear"
        "&line_smoothness=1&show_point=false&deselected_curves=%5B%5D&last_linear_y_axis_range=%5B%5D"
    )
    return f"{base_url.rstrip('/')}/#/metric{query}"


CHROMIUM_HINT = "apt-get install -y chromium (scripts/services.sh installs it), or `orch ui --plot PNG` (matplotlib)"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium_binary() -> str:
    import shutil

    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    raise UiError(f"chromium is not installed: {CHROMIUM_HINT}")


def capture_page(url: str, screenshot: Path, *, budget_ms: int = 20000, size: str = "1400,1000") -> str:
    """Load a page of the local MLflow UI in headless Chromium (the React app runs for budget_ms of virtual
    time), write a PNG screenshot and return the rendered DOM. A fresh profile each call; nothing but the page's
    own server is contacted (background networking, component updates and sync are off)."""
    import subprocess
    import tempfile

    if not url.startswith(("http://127.0.0.1:", "http://localhost:", f"http://{SCREENSHOT_HOST}:")):
        raise UiError(f"capture_page loads the local MLflow UI only, not {url}")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="orch-chromium-") as profile:
        cmd = [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}"]
        cmd += [f"--host-resolver-rules=MAP {SCREENSHOT_HOST} 127.0.0.1"]  # loopback, never a DNS query
        cmd += [f"--virtual-time-budget={budget_ms}", f"--screenshot={screenshot}", "--dump-dom", url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0 or not screenshot.is_file():
        tail = " ".join(proc.stderr.split()[-40:])
        raise UiError(f"chromium failed on {url} (exit {proc.returncode}): {tail}")
    return proc.stdout
