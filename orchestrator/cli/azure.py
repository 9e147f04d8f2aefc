"""Azure ML job control verbs: `orch submit | status | logs | cancel | download | config` (and the hidden
`aml-drive` that the driver job runs). Thin: parse flags, call the system / driver, render."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from orchestrator.core.errors import EXIT_FAILED, OrchError, exit_code
from orchestrator.engine.aml_driver import DRIVER_OUTPUT, drive, submit_workflow

console = Console(stderr=True)
out = Console()
config_app = typer.Typer(help="Per-machine Azure ML settings (~/.config/orch/profile.json).", no_args_is_help=True)


def _fail(message: str, code: int = 1, detail: str = "") -> typer.Exit:
    """One line (main.error_line: plain text, never wrapped), the detail dim below it."""
    from orchestrator.cli.errors import error_line

    error_line(message)
    if detail:
        console.print(detail, style="dim", highlight=False, markup=False)
    return typer.Exit(code)


def _guard(fn: Any) -> Any:
    """User-facing failures -> one line + their exit code (core.errors: 2 bad input, 1 a failed run; Azure SDK
    errors by main.azure_error: credentials and unknown names 2); Ctrl-C -> exit 130 without touching the remote
    job. Anything else goes through main.classify like every other command's error."""
    from orchestrator.cli.errors import classify

    try:
        return fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        raise _fail("interrupted (the remote job keeps running; `orch cancel JOB` stops it)", 130) from None
    except Exception as exc:
        if isinstance(exc, OrchError):  # the one code map (core.errors): bad input 2, a failed run 1
            raise _fail(str(exc), exc.exit_code, getattr(exc, "log_tail", "")) from None
        raise classify(exc) from None


def _system(config_path: Path | None = None) -> Any:
    """An AzureMLSystem from the workflow's AzureML system (if given) or from the workspace settings alone."""
    from orchestrator.systems.azureml.system import AzureMLSystem

    if config_path is None:
        return AzureMLSystem(cache_dir=Path(os.environ.get("ORCH_CACHE_DIR") or ".orch/cache"))
    from orchestrator.olive import load_workflow

    wf = load_workflow(config_path)
    cfg = _aml_system_config(wf)
    return AzureMLSystem.from_config(cfg, base_dir=wf.base_dir, cache_dir=wf.engine.cache_dir)


def _aml_system_config(wf: Any, name: str | None = None) -> dict[str, Any]:
    systems = {k: v.model_dump(mode="json") for k, v in wf.systems.items()}
    if name and name in systems:
        return systems[name]
    for cfg in systems.values():
        if cfg.get("type") == "AzureML":
            if wf.azureml_client and not cfg.get("azureml_client"):
                cfg["azureml_client"] = wf.azureml_client.model_dump(mode="json", exclude_none=True)
            return cfg
    raise _fail("the workflow has no AzureML system in `systems` (add one: type AzureML, aml_compute, ...)", 2)


# ---- commands ------------------------------------------------------------------------------------------------
def register(app: typer.Typer) -> None:
    """Add the Azure ML commands to the main `orch` app (called from orchestrator/cli.py)."""
    app.command("submit")(submit)
    app.command("status")(status)
    app.command("logs")(logs)
    app.command("cancel")(cancel)
    app.command("download")(download)
    app.command("aml-drive", hidden=True)(aml_drive)
    app.add_typer(config_app, name="config")


def submit(
    config: Annotated[Path, typer.Option("--config", "-c", help="workflow config (Olive format)")],
    host: Annotated[str, typer.Option("--host", help="aml (the workflow's AzureML system)")] = "aml",
    target: Annotated[
        str | None, typer.Option("--target", help="system that evaluates, in the same job (default: the host)")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="job name (default orch-<workflow>-<hash of the job definition>)")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="submit a new job even if this workflow's job is still running")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the plan (cached here, cached in the workspace, runs) and stop")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="with --dry-run: the plan as JSON on stdout")] = False,
) -> None:
    """Queue the workflow as one Azure ML job and return: prints the job name and its studio URL. An unchanged
    workflow whose job is still live is attached to, not submitted again (--force submits anyway). Passes cached
    in the workspace (by any earlier submit, from any machine) are not run again."""

    def go() -> None:
        info = submit_workflow(config, host=host, target=target, name=name, force=force, dry_run=dry_run)
        if info.get("dry_run"):
            if as_json:
                print(json.dumps(info, indent=1))
                return
            _print_plan(info["plan"], info.get("workspace_cache"))
            runs = sum(not r["cached"] for r in info["plan"])
            out.print(f"dry run: {runs} pass(es) would run, {len(info['plan']) - runs} cached; nothing was submitted")
            return
        if info["name"] is None:
            out.print(f"all {info['cached']} passes are cached; nothing submitted. output: {info['output_dir']}")
            return
        out.print(info["name"])
        verb = "attached to live job" if info.get("attached") else "queued:"
        console.print(f"{verb} {info['name']}  status {info['status']}\nstudio: {info['studio_url']}")
        if info.get("attached"):
            console.print("(the same workflow is already running; --force submits another job)")
        rows = info.get("plan") or []
        for where, label in (("workspace", "cached in the workspace"), ("local", "cached here"), ("runs", "runs")):
            names = [r["pass"] for r in rows if r["where"] == where]
            if names:
                console.print(f"{label}: {', '.join(names)}", highlight=False)
        console.print(f"follow: orch logs {info['name']} -f   |   orch status {info['name']}")

    _guard(go)


WHERE_TEXT = {"local": "cached here", "workspace": "cached in the workspace", "runs": "runs"}


def _print_plan(rows: list[dict[str, Any]], location: str | None) -> None:
    """One line per pass: `<pass> (<type>)  cached in the workspace | cached here | runs`."""
    if location:
        console.print(f"workspace cache: {location}", highlight=False)
    width = max((len(f"{r['pass']} ({r['type']})") for r in rows), default=0)
    for r in rows:
        label = f"{r['pass']} ({r['type']})"
        out.print(f"  {label:<{width}}  {WHERE_TEXT.get(r['where'], r['where'])}  {r['key'][:16]}", highlight=False)


def latest_metrics(handle: Any) -> dict[str, float]:
    """The latest value of every metric of the job's MLflow run (run id = job name on Azure ML; the run
    tagged azureml.runId / named after the job otherwise)."""
    run = job_run(handle)
    return dict(run.data.metrics) if run is not None else {}


def job_run(handle: Any) -> Any:
    """The job's MLflow run (metrics, tags), or None."""
    from orchestrator.systems.azureml.workspace import mlflow_client

    client = mlflow_client(handle.ml)
    run = None
    try:
        run = client.get_run(handle.name)
    except Exception:  # noqa: BLE001 - not the run id here; search by name below
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            filter_string=f"tags.mlflow.runName = '{handle.name}'",
            max_results=1,
        )
        run = runs[0] if runs else None
    return run


def cost_lines(metrics: dict[str, float], tags: dict[str, str]) -> list[str]:
    """`cost: $X` for the run, with each pass's share and how it was priced; `<pass>: resumed from step N`."""
    lines = []
    passes = {k.rsplit("/", 1)[0]: v for k, v in metrics.items() if k.endswith("/cost_usd")}
    total = metrics.get("cost_usd", sum(passes.values()) if passes else None)
    if total is not None:
        shares = ", ".join(f"{k} ${v:.4f}" for k, v in sorted(passes.items()))
        how = tags.get("orch.price")
        lines.append(f"cost: ${total:.4f}" + (f" ({shares})" if shares else "") + (f"; priced as {how}" if how else ""))
    for k, v in sorted(metrics.items()):
        if k.endswith("/resumed_from_step"):
            lines.append(f"{k.rsplit('/', 1)[0]}: resumed from step {int(v)}")
    return lines


def status(
    job: Annotated[str, typer.Argument(help="job name")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON: status, studio_url, error, metrics")] = False,
) -> None:
    """State of a job and the latest of its MLflow metrics."""

    def go() -> None:
        handle = _system().attach(job)
        raw = handle.raw_status()
        if as_json:
            error = handle.error() if raw == "Failed" else None
            doc = {"job": job, "status": raw, "studio_url": handle.studio_url, "error": error,
                   "metrics": latest_metrics(handle)}  # fmt: skip
            out.print_json(json.dumps(doc, default=str))
            if raw == "Failed":
                raise typer.Exit(1)
            return
        out.print(f"{job}: {raw}")
        if handle.studio_url:
            console.print(f"studio: {handle.studio_url}")
        retry = None
        if raw == "Failed":
            err = handle.error()
            if err:
                console.print(f"[bold red]error:[/] {err}", highlight=False, markup=False)
            retry = handle.retried_as()
            if retry is not None:
                out.print(f"preempted: submitted again as {retry[0]} ({retry[1]}); `orch status {retry[0]}`")
        run = job_run(handle)
        metrics = dict(run.data.metrics) if run is not None else {}
        for line in cost_lines(metrics, dict(run.data.tags) if run is not None else {}):
            out.print(line, highlight=False)
        for k in sorted(metrics):
            out.print(f"  {k} = {metrics[k]:.6g}")
        if raw == "Failed" and retry is None:
            raise typer.Exit(1)

    _guard(go)


def logs(
    job: Annotated[str, typer.Argument(help="job name")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="stream until the job ends, resuming")] = False,
    from_start: Annotated[bool, typer.Option("--from-start", help="with -f: replay from the start")] = False,
    all_ranks: Annotated[bool, typer.Option("--all-ranks", help="every rank, lines prefixed \\[rank N]")] = False,
    rank: Annotated[int | None, typer.Option("--rank", min=0, help="this rank's log (default 0)")] = None,
) -> None:
    """Print a job's log (rank 0's by default); -f follows it live (Ctrl-C stops following, never the job).

    Without -f: the whole current log from its start, every time (the saved -f position is neither used nor
    moved). With -f: continues where the previous `orch logs JOB -f` stopped (Ctrl-C, a crash, a lost
    connection; position per log file in <cache>/aml-logs/<job>.json, ORCH_CACHE_DIR), --from-start replays.
    Dropped connections, timeouts and 429/5xx are retried (a dim notice each). While the job is Preparing, the
    environment image build log is shown, lines prefixed \\[image build]."""
    from orchestrator.systems.azureml.logstream import redact_sas

    if all_ranks and rank is not None:
        raise _fail("--all-ranks and --rank exclude each other", 2)

    def notice(message: str) -> None:
        console.print(message, style="dim", highlight=False, markup=False, soft_wrap=True)

    def go() -> None:
        handle = _system().attach(job)
        stream = handle.logs(follow=follow, ranks="all" if all_ranks else (rank or 0), resume=follow,
                             from_start=from_start, on_notice=notice)  # fmt: skip
        try:
            for line in stream:
                out.print(line, highlight=False, markup=False, soft_wrap=True)
        except KeyboardInterrupt:
            stream.close()  # saves the position: the line being printed comes again next time
            again = f"; `orch logs {job} -f` continues from here" if follow else ""
            raise _fail(f"interrupted (the remote job keeps running){again}", 130) from None
        finally:
            stream.close()
        if follow:
            raw = handle.raw_status()
            console.print(f"{job}: {raw}")
            if raw == "Failed":
                raise _fail(redact_sas(f"job {job} failed: {handle.error() or 'see the log above'}"))

    def guarded() -> None:
        """Every failure is one line without a SAS signature (requests' messages carry the URL)."""
        try:
            go()
        except (typer.Exit, KeyboardInterrupt):
            raise
        except Exception as exc:
            from orchestrator.cli.errors import azure_user_error

            user = None if isinstance(exc, OrchError) else azure_user_error(exc)  # credentials, unknown job: 2
            if user is not None:
                raise user from None
            name = type(exc).__name__
            known = isinstance(exc, OrchError)
            text = str(exc).strip() if known else f"{name}: {str(exc).strip()}"
            first = (text.splitlines() or [name])[0]
            raise _fail(redact_sas(first), exit_code(exc) or EXIT_FAILED,
                        redact_sas(getattr(exc, "log_tail", "") or "")) from None  # fmt: skip

    _guard(guarded)


def cancel(job: Annotated[str, typer.Argument(help="job name")]) -> None:
    """Cancel a job (idempotent)."""

    def go() -> None:
        handle = _system().attach(job)
        was = handle.cancel()
        out.print(f"{job}: {'canceled' if was else 'already ' + handle.raw_status()}")

    _guard(go)


def download(
    job: Annotated[str, typer.Argument(help="job name")],
    output_dir: Annotated[Path, typer.Option("--output", "-o", help="where to put the output")] = Path("."),
    output: Annotated[
        str | None, typer.Option("--output-name", help="which named output (default model/result)")
    ] = None,
    register_model: Annotated[
        str | None, typer.Option("--register-model", help="also register the model as a workspace model NAME")
    ] = None,
) -> None:
    """Download a finished job's output (the driver's `model`: manifest.json + model/) into a folder."""

    def go() -> None:
        from orchestrator.core.cache import Cache
        from orchestrator.core.fs import replace_dir
        from orchestrator.systems.azureml.download import download_reference
        from orchestrator.systems.azureml.names import RESULT_OUTPUT, output_uri

        system = _system()
        handle = system.attach(job)
        remote = handle.ml.jobs.get(job)
        names = list((remote.outputs or {}).keys())
        which = output or (DRIVER_OUTPUT if DRIVER_OUTPUT in names else RESULT_OUTPUT)
        raw = handle.raw_status()
        if raw != "Completed":
            raise _fail(f"job {job} is {raw}; only a Completed job's outputs are downloaded")
        uri = getattr((remote.outputs or {}).get(which), "path", None) or output_uri(job, which)
        local, _ = download_reference(uri, cache=Cache(system.cache_dir), field=f"{job}.{which}", ml_client=handle.ml)
        dest = output_dir.resolve()
        dest.mkdir(parents=True, exist_ok=True)
        for child in sorted(Path(local).iterdir()):
            target = dest / child.name
            if child.is_dir():
                replace_dir(child, target)
            else:
                import shutil

                shutil.copy2(child, target)
        out.print(f"downloaded {job}.{which} to {dest}")
        if register_model:
            manifest = json.loads((dest / "manifest.json").read_text()) if (dest / "manifest.json").exists() else {}
            model_uri = uri.rstrip("/") + ("/model/" if (Path(local) / "model").is_dir() else "/")
            tags = {"orch.job": job, "orch.workflow": str(manifest.get("workflow_id")),
                    "orch.passes": json.dumps([p.get("name") for p in manifest.get("passes", [])]),
                    "orch.sha256": str((manifest.get("final_model") or {}).get("sha256"))}  # fmt: skip
            m = system.register_model(register_model, model_uri, tags=tags, description=f"orch job {job}")
            out.print(f"registered azureml:{m.name}:{m.version}")

    _guard(go)


def aml_drive(
    config: Annotated[Path, typer.Option("--config", help="the submitted workflow (in the job's code)")],
    bind: Annotated[list[str], typer.Option("--bind", help="NAME=PATH of a bound input/output")],
) -> None:
    """(inside an Azure ML job) run the submitted workflow with the job's bound inputs."""
    try:
        code = drive(config, bind)
    except Exception as exc:
        print(f"orch: error: {exc}", file=sys.stderr, flush=True)
        tail = getattr(exc, "log_tail", "")
        if tail:
            print(tail, file=sys.stderr, flush=True)
        raise typer.Exit(exit_code(exc) or EXIT_FAILED) from None
    raise typer.Exit(code)


@config_app.command("set")
def config_set(
    key: Annotated[str, typer.Argument(help="subscription_id | resource_group | workspace_name | key_vault_url | ...")],
    value: Annotated[str, typer.Argument(help="the value ('' removes it)")],
) -> None:
    """Save one Azure ML setting for this machine (workflow files then need no azureml_client)."""
    from orchestrator.systems.azureml.workspace import write_profile_value

    _guard(lambda: out.print(f"{key} saved in {write_profile_value(key, value)}"))


@config_app.command("show")
def config_show() -> None:
    """The Azure ML settings in effect, and where each comes from (config > env > profile)."""
    from orchestrator.systems.azureml.workspace import PROFILE_KEYS, WorkspaceError, profile_path, resolve_settings

    try:
        s = resolve_settings()
        values = s.public()
        for key in PROFILE_KEYS:
            v = values.get(key)
            if v is None:
                continue
            shown = json.dumps(v) if isinstance(v, dict) else v
            out.print(f"{key} = {shown}   [dim]({s.sources.get(key, 'default')})[/]")
    except WorkspaceError as exc:
        console.print(f"[yellow]{exc}[/]")
    out.print(f"profile: {profile_path()}")
