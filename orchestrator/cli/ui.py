"""`orch ui`: the MLflow UI on a workflow's run (or --plot / --screenshot PNGs of it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from orchestrator.cli.app import TrackingOpt, _demo_dir, console, out
from orchestrator.cli.errors import _guarded, fail
from orchestrator.core.errors import EXIT_FAILED


def ui_command(
    manifest: Annotated[
        Path | None,
        typer.Option("--manifest", help="a workflow output's manifest.json (default: the last `orch demo`'s)"),
    ] = None,
    run_id: Annotated[str | None, typer.Option("--run-id", help="another run of the same tracking store")] = None,
    tracking_uri: TrackingOpt = None,
    port: Annotated[int | None, typer.Option("--port", help="local MLflow server port (default: a free one)")] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot", help="write a PNG of the run's loss curves and before/after metrics (matplotlib) and exit"
        ),
    ] = None,
    screenshot: Annotated[
        Path | None,
        typer.Option("--screenshot", help="write a PNG of the MLflow UI's loss chart (headless Chromium) and exit"),
    ] = None,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="print the URL only")] = False,
) -> None:
    """The MLflow UI on a workflow's run: a local MLflow server over its tracking store, opened on the run's
    charts (loss curves, metrics); Ctrl-C stops it. --plot draws the same without a browser."""

    def go() -> None:
        import importlib.util
        import time

        from orchestrator.cli import render as ui

        if importlib.util.find_spec("flask") is None:  # the core's mlflow-skinny has no server
            raise ModuleNotFoundError("the MLflow server is not installed", name="flask")

        if manifest is None:
            demo_dir = _demo_dir(create=False)
            candidates = [demo_dir / "outputs" / "smollm2" / "manifest.json", demo_dir / "outputs" / "manifest.json"]
            found = next((c for c in candidates if c.is_file()), candidates[0])
        else:
            found = manifest
        try:
            if run_id and tracking_uri:
                uri, rid = tracking_uri, run_id
            else:
                recorded_uri, recorded_run = ui.mlflow_run_ref(found)
                uri, rid = tracking_uri or recorded_uri, run_id or recorded_run
            if plot is not None:  # matplotlib from MLflow's metric history: no server, no browser
                from orchestrator.engine.plots import plot_mlflow_run

                picture = plot_mlflow_run(uri, rid, plot)
                for line in picture.describe():
                    console.print(Text(f"  {line}"), highlight=False, soft_wrap=True)
                out.print(f"plot of run {rid}: {plot}", markup=False, soft_wrap=True)
                return
            experiment = ui.experiment_of(uri, rid)
            keys: list[str] = []
            if screenshot is not None:  # what is missing is said before any server starts
                ui.chromium_binary()
                keys = ui.loss_metric_keys(uri, rid)
                if not keys:
                    raise ui.UiError(f"run {rid} logged no loss-like metric: no chart to capture")
            proc, base = ui.start_mlflow_ui(uri, port=port, screenshot=screenshot is not None)
        except ui.UiError as exc:
            raise fail(f"ui: {exc}") from None
        try:
            page = ui.run_page_url(base, experiment, rid)
            if screenshot is not None:
                ui.capture_page(ui.metric_page_url(base, experiment, rid, keys), screenshot)
                out.print(f"screenshot of run {rid}'s loss chart ({', '.join(keys)}): {screenshot}", markup=False)
                return
            out.print(f"MLflow UI on run {rid}: {page}  (Ctrl-C stops the server)", markup=False)
            if not no_browser:
                import webbrowser

                webbrowser.open(page)
            while proc.poll() is None:
                time.sleep(0.5)
            raise fail(f"ui: the MLflow server exited with {proc.returncode}", EXIT_FAILED)
        except ui.UiError as exc:
            raise fail(f"ui: {exc}") from None
        finally:
            ui.stop_mlflow_ui(proc)

    _guarded(go, interrupted="interrupted; the MLflow UI server was stopped")
