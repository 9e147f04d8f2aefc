"""Rich rendering of an engine run: the plan table, a progress bar per pass, live logs and metrics."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator.engine import Step, StepRecord

SHOWN_METRICS = ("train_loss", "eval_loss", "accuracy", "perplexity", "tokens_per_s", "parity_max_abs_diff")


class RichReporter:
    def __init__(self, console: Console | None = None, *, verbose: bool = False) -> None:
        self.console = console or Console(stderr=True)
        self.verbose = verbose
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:>4.0f}/{task.total!s:<5}"),
            TimeElapsedColumn(),
            TextColumn("[dim]{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}
        self.latest: dict[str, dict[str, float]] = {}

    def plan(self, steps: list[Step]) -> None:
        table = Table(title="plan", show_lines=False)
        for col in ("#", "pass", "type", "system", "cache"):
            table.add_column(col)
        for i, s in enumerate(steps, 1):
            cache = "[green]hit[/]" if s.cached else "[yellow]run[/]"
            table.add_row(str(i), escape(s.name), s.pass_type, escape(f"{s.system_name} ({s.role})"), cache)
        self.console.print(table)

    def step_start(self, step: Step) -> None:
        if not self.progress.live.is_started:
            self.progress.start()
        self.tasks[step.name] = self.progress.add_task(escape(f"{step.name} ({step.pass_type})"), total=None, info="")
        self.latest[step.name] = {}

    def step_progress(self, step: Step, done: int, total: int, desc: str) -> None:
        self.progress.update(self.tasks[step.name], completed=done, total=total)

    def step_log(self, step: Step, line: str) -> None:
        if self.verbose:
            self.progress.console.print(f"[dim]{step.name}|[/] {line}", highlight=False, markup=False)
        else:
            # the info column is rendered as markup: a log line's "[...]" must print as written
            self.progress.update(self.tasks[step.name], info=escape(line.strip()[:60]))

    def step_metric(self, step: Step, name: str, value: float) -> None:
        self.latest[step.name][name] = value
        shown = ", ".join(f"{k}={v:.4g}" for k, v in self.latest[step.name].items() if k in SHOWN_METRICS)
        self.progress.update(self.tasks[step.name], info=shown)

    def step_end(self, step: Step, record: StepRecord) -> None:
        task = self.tasks[step.name]
        total = self.progress.tasks[task].total or 1
        shown = ", ".join(f"{k}={v:.4g}" for k, v in record.metrics.items() if k in SHOWN_METRICS)
        note = "cached" if record.cached else f"{record.duration_s:.1f}s"
        self.progress.update(task, completed=total, total=total, info=f"{note} {shown}")
        if step.role == "target" or step is None:
            self.stop()

    def stop(self) -> None:
        if self.progress.live.is_started:
            self.progress.stop()


def metrics_table(metrics: dict[str, Any], title: str = "metrics") -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in metrics.items():
        table.add_row(k, f"{v:.6g}" if isinstance(v, float) else str(v))
    return table
