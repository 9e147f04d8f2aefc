"""Training curves as a PNG beside the final model: a loss curve is read at a glance, a table is not."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from orchestrator.core.job import EVENTS_FILE

CURVES = ("train_loss", "eval_loss")


def read_curves(events_file: Path) -> dict[str, list[tuple[int, float]]]:
    curves: dict[str, list[tuple[int, float]]] = {name: [] for name in CURVES}
    if not events_file.exists():
        return curves
    for line in events_file.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("type") == "metric" and event.get("name") in curves and event.get("step") is not None:
            curves[event["name"]].append((int(event["step"]), float(event["value"])))
    return curves


def plot_training_curves(step_dirs: dict[str, Path], out_png: Path) -> Path | None:
    """One panel per pass that logged losses; None when no pass did (nothing to draw)."""
    series = {name: read_curves(d / EVENTS_FILE) for name, d in step_dirs.items()}
    series = {name: c for name, c in series.items() if any(c.values())}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4), squeeze=False)
    for ax, (name, curves) in zip(axes[0], series.items(), strict=True):
        for metric, points in curves.items():
            if points:
                steps, values = zip(*sorted(points), strict=True)
                ax.plot(steps, values, marker="o", markersize=3, label=metric)
        ax.set_title(f"{name}: loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
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
