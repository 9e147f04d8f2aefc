"""`orch run` and what every command that runs a workflow shares: notes, Olive's pass_flows (one run per
flow), the engine with its reporter, the metrics table, the output / MLflow lines, packaging_config zips."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli.app import HostOpt, ModelNameOpt, TargetOpt, TrackingOpt, Verbosity, _say, console, out
from orchestrator.cli.errors import _guarded, _redact
from orchestrator.olive.flags import run_flag_help


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
    if summary.cost_usd is not None:
        shares = ", ".join(f"{r.name} ${r.cost_usd:.4f}" for r in summary.steps if r.cost_usd is not None)
        out.print(f"cost: ${summary.cost_usd:.4f} ({shares})", highlight=False)
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
        registered = f"registered as {engine.register_as!r}"
        if summary.registered_version:
            registered += f" version {summary.registered_version}"
        if summary.registry_uri and summary.registry_uri != engine.tracking_uri:  # $MLFLOW_REGISTRY_URI
            registered += f" in {_redact(summary.registry_uri)}"
        out.print(f"mlflow: model {summary.model_uri} ({registered})", markup=False, soft_wrap=True)
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


OLIVE_RUN = "Olive's run flags"


def run(
    config: Annotated[
        Path,
        typer.Option(
            "--config", "-c", "--run-config", "--run_config", help="workflow config (Olive format, JSON or YAML)"
        ),  # fmt: skip
    ],
    host: HostOpt = None,
    target: TargetOpt = None,
    tracking_uri: TrackingOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", "--dry_run", help="print the plan (what runs, what is cached) and stop")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="stream job logs")] = False,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", "--no_tracking", help="do not log to MLflow")] = False,
    list_required_packages: Annotated[
        bool,
        typer.Option(
            "--list_required_packages",
            "--list-required-packages",
            "--packages",
            rich_help_panel=OLIVE_RUN,
            help=run_flag_help("--list_required_packages"),
        ),
    ] = False,
    setup: Annotated[bool, typer.Option("--setup", rich_help_panel=OLIVE_RUN, help=run_flag_help("--setup"))] = False,
    tempdir: Annotated[
        str | None, typer.Option("--tempdir", rich_help_panel=OLIVE_RUN, help=run_flag_help("--tempdir"))
    ] = None,
    package_config: Annotated[
        str | None,
        typer.Option(
            "--package-config", "--package_config", rich_help_panel=OLIVE_RUN, help=run_flag_help("--package-config")
        ),
    ] = None,
    model_name_or_path: Annotated[
        str | None,
        typer.Option(
            "--model_name_or_path",
            "--model-name-or-path",
            "-m",
            rich_help_panel=OLIVE_RUN,
            help=run_flag_help("--model_name_or_path"),
        ),
    ] = None,
    output_path: Annotated[
        str | None,
        typer.Option(
            "--output_path", "--output-path", "-o", rich_help_panel=OLIVE_RUN, help=run_flag_help("--output_path")
        ),
    ] = None,
    task: Annotated[
        str | None, typer.Option("--task", "-t", rich_help_panel=OLIVE_RUN, help=run_flag_help("--task"))
    ] = None,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust_remote_code",
            "--trust-remote-code",
            rich_help_panel=OLIVE_RUN,
            help=run_flag_help("--trust_remote_code"),
        ),
    ] = False,
    adapter_path: Annotated[
        str | None,
        typer.Option(
            "--adapter_path", "--adapter-path", "-a", rich_help_panel=OLIVE_RUN, help=run_flag_help("--adapter_path")
        ),
    ] = None,
    test: Annotated[
        str | None, typer.Option("--test", rich_help_panel=OLIVE_RUN, metavar="[DIR]", help=run_flag_help("--test"))
    ] = None,
    model_script: Annotated[
        str | None,
        typer.Option(
            "--model_script", "--model-script", rich_help_panel=OLIVE_RUN, help=run_flag_help("--model_script")
        ),
    ] = None,
    script_dir: Annotated[
        str | None,
        typer.Option("--script_dir", "--script-dir", rich_help_panel=OLIVE_RUN, help=run_flag_help("--script_dir")),
    ] = None,
    log_level: Annotated[
        int | None,
        typer.Option("--log_level", "--log-level", rich_help_panel=OLIVE_RUN, help=run_flag_help("--log_level")),
    ] = None,
    disable_telemetry: Annotated[
        bool,
        typer.Option(
            "--disable_telemetry",
            "--disable-telemetry",
            rich_help_panel=OLIVE_RUN,
            help=run_flag_help("--disable_telemetry"),
        ),
    ] = False,
    model_name: ModelNameOpt = None,
) -> None:
    """Run a workflow config: passes on the host, evaluation on the target. Olive's `run` flags replace the
    input model (-m, -a, --test), output_dir (-o) and log level."""
    from orchestrator.olive.commands import run_overrides

    def go() -> Any:
        with temporary_root(tempdir):
            source, base_dir, notes = run_overrides(
                config, package_config=package_config, model_name_or_path=model_name_or_path, output_path=output_path,
                task=task, trust_remote_code=trust_remote_code, adapter_path=adapter_path, test=test,
                model_script=model_script or script_dir, log_level=log_level, dry_run=dry_run or list_required_packages,
            )  # fmt: skip
            for line in notes:
                _say(line, label="note: ")
            if list_required_packages or setup:
                return _packages(source, base_dir, host=host, target=target, setup=setup)
            return _run_workflow(
                source, base_dir=base_dir, host=host, target=target, tracking_uri=tracking_uri, dry_run=dry_run,
                verbose=verbose or (log_level is not None and log_level <= 1), no_tracking=no_tracking,
                model_name=model_name,
            )  # fmt: skip

    _guarded(go)


def _packages(source: Any, base_dir: Path | None, *, host: str | None, target: str | None, setup: bool) -> None:
    """Olive's --list_required_packages / --setup: the environment each pass runs in and its packages; --setup
    builds the side environments on this host (what a first run would build)."""
    import tempfile

    from orchestrator.core.job import Job
    from orchestrator.engine import Engine
    from orchestrator.olive import load_workflow
    from orchestrator.systems.environments.spec import load_env_spec, resolve_env_file

    wf = load_workflow(source, base_dir=base_dir)
    engine = Engine(wf, host=host, target=target, tracking=False)
    from orchestrator.engine.plan import environment_for

    shown: set[str] = set()
    for step in engine.plan():
        accelerator = engine.devices.accelerator(step.system_name)
        job = Job(job_id=f"setup-{step.name}", pass_name=step.name, pass_type=step.pass_type, pass_config=step.config,
                  output_dir=tempfile.gettempdir(), accelerator=accelerator)  # fmt: skip
        env = environment_for(job)
        spec = load_env_spec(resolve_env_file(env))
        out.print(f"{step.name} ({step.pass_type}) on {step.system_name}: environment {env}", markup=False)
        if env not in shown:
            shown.add(env)
            out.print("  " + " ".join(spec.pip_requirements), markup=False, highlight=False)
        if setup and step.role == "host":
            engine.system(step.system_name).prepare(job)
    if setup:
        out.print("environments ready", markup=False)


@contextlib.contextmanager
def temporary_root(path: str | None) -> Iterator[None]:
    """Olive's --tempdir: the root of temporary files for this command and the jobs it starts; the process's own
    TMPDIR comes back when the command ends (a command run in-process must not move every later temp file)."""
    if not path:
        yield
        return
    import tempfile

    Path(path).mkdir(parents=True, exist_ok=True)
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(Path(path).resolve())
    tempfile.tempdir = None  # recomputed from TMPDIR
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved
        tempfile.tempdir = None
