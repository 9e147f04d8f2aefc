"""Pictures of a run without a browser: loss curves and before/after metrics, drawn with matplotlib.

Two sources, one drawing: a finished run's cache entries (events.jsonl: training.png beside the published model)
and an MLflow run's metric history (`orch ui --plot PNG`). Every pass that logged a loss-like metric gets a panel,
whatever the pass and metric are called (`lora/train_loss`, `finetune/eval_loss`, `sft/loss`); the evaluation's
metrics of the input model (step evaluate_input) and of the final model (step evaluate) are drawn side by side.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.core.errors import UserError
from orchestrator.core.job import EVENTS_FILE
from orchestrator.engine.steps import INPUT_EVAL_STEP
from orchestrator.engine.tracking import read_events

Points = list[tuple[int, float]]
FINAL_EVAL_STEP = "evaluate"
EVAL_STEPS = (INPUT_EVAL_STEP, FINAL_EVAL_STEP)
MAX_EVAL_PANELS = 6
# logged for every step by the engine, or counts of what was scored: not results to compare before and after
NOT_RESULTS = ("duration_s", "model_size_bytes", "n_samples", "n_tokens")


class NothingToPlot(UserError):
    """The run logged no loss-like metric and no evaluation: an empty chart is an error, not a picture."""


def is_loss(metric: str) -> bool:
    """train_loss, eval_loss, loss, val_loss, ...: what a loss curve is drawn from."""
    return "loss" in metric.lower()


@dataclass
class RunPicture:
    """What one picture shows: per pass, its loss curves; per evaluation metric, (before, after)."""

    curves: dict[str, dict[str, Points]] = field(default_factory=dict)
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)

    def empty(self) -> bool:
        return not any(any(c.values()) for c in self.curves.values()) and not self.eval_metrics()

    def describe(self) -> list[str]:
        """One line per panel: what was drawn (for the user, and for tests that read it)."""
        lines = [
            f"{name}: " + ", ".join(f"{metric} ({len(points)} points)" for metric, points in curves.items())
            for name, curves in self.curves.items()
        ]
        if self.before or self.after:
            names = self.eval_metrics()
            lines.append("evaluation (before/after): " + ", ".join(names))
        return lines

    def eval_metrics(self) -> list[str]:
        """The evaluation's results, those known before and after first (at most MAX_EVAL_PANELS)."""
        results = [m for m in {**self.after, **self.before} if not m.endswith(NOT_RESULTS)]
        both = [m for m in results if m in self.before and m in self.after]
        rest = [m for m in results if m not in both]
        groups: dict[str, str] = {}  # one of each evaluator metric (latency-..., throughput-...) before its others
        for m in rest:
            groups.setdefault(m.partition("-")[0], m)
        firsts = list(groups.values())
        return (both + firsts + [m for m in rest if m not in firsts])[:MAX_EVAL_PANELS]


def picture_from_events(step_dirs: dict[str, Path]) -> RunPicture:
    """The loss curves each pass's job streamed (its cache entry's events.jsonl), and the evaluations."""
    picture = RunPicture()
    for name, folder in step_dirs.items():
        curves: dict[str, Points] = {}
        finals: dict[str, float] = {}
        for event in read_events(folder / EVENTS_FILE):
            if event.get("type") != "metric":
                continue
            metric, value = str(event.get("name")), float(event["value"])
            if is_loss(metric) and event.get("step") is not None and name not in EVAL_STEPS:
                curves.setdefault(metric, []).append((int(event["step"]), value))
            finals[metric] = value
        if curves:
            picture.curves[name] = curves
        if name == INPUT_EVAL_STEP:
            picture.before = finals
        elif name == FINAL_EVAL_STEP:
            picture.after = finals
    return picture


def picture_from_mlflow(client: Any, run_id: str) -> RunPicture:
    """The same from an MLflow run's metric history (keys `<pass>/<metric>`)."""
    picture = RunPicture()
    run = client.get_run(run_id)
    for key, value in sorted(run.data.metrics.items()):
        step, _, metric = key.partition("/")
        if not metric:
            step, metric = "run", key
        if is_loss(metric) and step not in EVAL_STEPS:  # an evaluation's loss is a result, drawn below
            history = client.get_metric_history(run_id, key)
            picture.curves.setdefault(step, {})[metric] = sorted((int(m.step), float(m.value)) for m in history)
        if step == INPUT_EVAL_STEP:
            picture.before[metric] = float(value)
        elif step == FINAL_EVAL_STEP:
            picture.after[metric] = float(value)
    return picture


def draw(picture: RunPicture, out_png: Path, *, title: str = "") -> Path:
    """Loss panels on the first row, before/after bars on the second; written atomically. NothingToPlot when the
    picture would be empty."""
    if picture.empty():
        raise NothingToPlot("no loss-like metric and no evaluation metric: nothing to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: c for name, c in picture.curves.items() if any(c.values())}
    evals = picture.eval_metrics()
    rows = [row for row in (curves, evals) if row]
    width = max(6.0 * len(curves), 3.2 * len(evals), 7.0)
    fig = plt.figure(figsize=(width, 4.2 * len(rows) + (0.4 if title else 0)), layout="constrained")
    subfigs = fig.subfigures(len(rows), 1, squeeze=False)[:, 0]
    if title:
        fig.suptitle(title)
    row = 0
    if curves:
        axes = subfigs[row].subplots(1, len(curves), squeeze=False)[0]
        for ax, (name, series) in zip(axes, curves.items(), strict=True):
            for metric, points in series.items():
                if points:
                    steps, values = zip(*sorted(points), strict=True)
                    ax.plot(steps, values, marker="o", markersize=3, label=metric)
            ax.set_title(f"{name}: loss")
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.grid(alpha=0.3)
            ax.legend()
        row += 1
    if evals:
        axes = subfigs[row].subplots(1, len(evals), squeeze=False)[0]
        for ax, metric in zip(axes, evals, strict=True):
            labels, values, colors = [], [], []
            for label, source, color in (("before", picture.before, "#999999"), ("after", picture.after, "#2a7")):
                if metric in source:
                    labels.append(label)
                    values.append(source[metric])
                    colors.append(color)
            bars = ax.bar(labels, values, color=colors)
            ax.bar_label(bars, fmt="%.4g")
            ax.set_title(metric, fontsize=9)
            ax.margins(y=0.2)
        subfigs[row].suptitle("evaluation: input model (before) vs final model (after)", fontsize=10)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own per writer: two runs sharing an output_dir must not rename each other's temp file away.
    tmp = out_png.with_name(f".{out_png.name}.{uuid.uuid4().hex[:8]}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        tmp.replace(out_png)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out_png


def plot_training_curves(step_dirs: dict[str, Path], out_png: Path) -> Path | None:
    """training.png beside the published model; None when no pass logged a loss (nothing to draw)."""
    picture = picture_from_events(step_dirs)
    picture.before, picture.after = {}, {}  # the manifest holds the evaluation; this picture is about training
    if picture.empty():
        return None
    return draw(picture, out_png)


def plot_mlflow_run(tracking_uri: str, run_id: str, out_png: Path) -> RunPicture:
    """`orch ui --plot`: the run's loss curves and before/after metrics from MLflow's metric history."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)  # not the global registry
    picture = picture_from_mlflow(client, run_id)
    if picture.empty():
        raise NothingToPlot(
            f"MLflow run {run_id} logged no loss-like metric (no key with 'loss' in its name) and no evaluation: "
            "nothing to plot"
        )
    name = client.get_run(run_id).info.run_name or run_id
    draw(picture, out_png, title=f"{name} ({run_id[:8]})")
    return picture

