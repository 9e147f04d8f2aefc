"""`orch run` and what every command that runs a workflow shares: notes, Olive's pass_flows (one run per
flow), the engine with its reporter, the metrics table, the output / MLflow lines, packaging_config zips."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli.app import HostOpt, ModelNameOpt, TargetOpt, TrackingOpt, Verbosity, _say, console, out
from orchestrator.cli.errors import _guarded, _redact


def _run_workflow(
    source: Any,
    *,
    base_dir: Path | None = None,
    host: str | None = None,
    target: str | None = None,
    tracking_uri: str | None = None,
    dry_run: bool = False,
    verbose: bool = False,
    no_tracking: bool = False,
    model_name: str | None = None,
) -> Any:
    from orchestrator.olive import load_workflow

    wf = load_workflow(source, base_dir=base_dir)
    for note in getattr(wf, "notes", []) or []:
        _say(note, label="note: ")
    if wf.engine.clean_cache and not dry_run:  # Olive's clean_cache: nothing from earlier runs is reused
        from orchestrator.core.cache import Cache

        removed = Cache(wf.engine.cache_dir).clean()
        _say(f"clean_cache: removed {removed} cached pass output(s)", label="note: ")
    summary = None
    for flow, flow_wf in wf.flow_workflows():  # Olive's pass_flows: one run (and output model) per flow
        if flow is not None:
            _say(" -> ".join(flow_wf.passes), label=f"flow {flow}: ", style="bold")
        name = f"{model_name}-{flow}" if model_name and flow is not None else model_name
        summary = _run_one(flow_wf, host, target, tracking_uri, dry_run, verbose, no_tracking, name)
    return summary


def _run_one(
    wf: Any,
    host: str | None,
    target: str | None,
    tracking_uri: str | None,
    dry_run: bool,
    verbose: bool,
    no_tracking: bool,
    model_name: str | None = None,
) -> Any:
    """One engine run of a checked workflow: progress, the metrics table, the output and packaging lines."""
    from orchestrator.cli.render import make_reporter, metrics_table
    from orchestrator.engine import Engine, QuietReporter

    verbose = verbose or Verbosity.verbose or (wf.engine.log_severity_level or 3) <= 1
    reporter: Any = QuietReporter() if Verbosity.quiet else make_reporter(console, verbose=verbose)
    engine = Engine(
        wf,
        host=host,
        target=target,
        tracking_uri=tracking_uri,
        tracking=not no_tracking,
        reporter=reporter,
        model_name=model_name,
    )
    try:
        steps, summary = engine.run(dry_run=dry_run)
    finally:
        getattr(reporter, "stop", lambda: None)()
    if dry_run:
        n_cached = sum(s.cached for s in steps)
        out.print(
            f"dry run: {len(steps) - n_cached} pass(es) would run, {n_cached} from the cache; nothing was submitted"
        )
        return None
    if summary.metrics and not Verbosity.quiet:
        console.print(metrics_table(summary.metrics))
    if summary.output_dir:
        out.print(f"output: {summary.output_dir}  (manifest.json, model/)")
    _package(wf, summary, out)
    if summary.mlflow_run_id and summary.recorded:
        out.print(
            f"mlflow: run {summary.mlflow_run_id} at {_redact(engine.tracking_uri)} (recorded earlier: every pass "
            "was cached, nothing was logged again)",
            markup=False,
            soft_wrap=True,
        )
    elif summary.mlflow_run_id:
        line = f"mlflow: run {summary.mlflow_run_id} at {_redact(engine.tracking_uri)}"
        out.print(line, markup=False, soft_wrap=True)
    if summary.mlflow_run_id and summary.model_uri:
        out.print(
            f"mlflow: model {summary.model_uri} (registered as {engine.register_as!r})", markup=False, soft_wrap=True
        )
    return summary


def _package(wf: Any, summary: Any, out: Any) -> None:
    """Olive's Zipfile packaging of the output model: <output_dir>/<name>.zip of model/; with no output_dir,
    of the final model's folder into the working directory (Olive's default output folder)."""
    import shutil

    for package in wf.engine.packaging_config or []:
        if summary.output_dir:
            dest, src = summary.output_dir / f"{package.name}.zip", summary.output_dir / "model"
        elif summary.final_model is not None and Path(summary.final_model.path).is_dir():
            dest, src = Path.cwd() / f"{package.name}.zip", Path(summary.final_model.path)
        else:
            out.print(f"packaging_config {package.name}: the workflow produced no model folder to package")
            continue
        tmp = shutil.make_archive(str(dest.with_name(f".{dest.stem}.partial")), "zip", src)
        os.replace(tmp, dest)  # a killed run leaves no half zip under the real name
        out.print(f"packaged: {dest}")


def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="workflow config (Olive format, JSON or YAML)")],
    host: HostOpt = None,
    target: TargetOpt = None,
    tracking_uri: TrackingOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the plan (what runs, what is cached) and stop")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="stream job logs")] = False,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", help="do not log to MLflow")] = False,
    model_name: ModelNameOpt = None,
) -> None:
    """Run a workflow config: passes on the host, evaluation on the target."""
    _guarded(
        lambda: _run_workflow(
            config,
            host=host,
            target=target,
            tracking_uri=tracking_uri,
            dry_run=dry_run,
            verbose=verbose,
            no_tracking=no_tracking,
            model_name=model_name,
        )
    )
