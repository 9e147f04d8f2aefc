"""The `orch` Typer app and what every command shares: the root options (-V, -q, -v), the stderr / stdout
consoles, progress notes (`say`), and the option types several commands declare (--host, --target, ...)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text


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
    """Libraries' own chatter stays out of orch's output unless -v: MLflow's INFO lines, azure-identity's
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
TrackingOpt = Annotated[bool, typer.Option("--no-tracking", help="do not log to MLflow")]
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


JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON (one document on stdout) instead of a table")]


def _stream_line(line: str) -> None:
    console.print(line, style="dim", highlight=False, markup=False)


def _demo_dir(create: bool = True) -> Path:
    """The demo job's folder: the checkout's jobs/tone-classification, or (installed from a wheel) a copy in
    ./jobs/tone-classification of the working folder (core.shipped)."""
    from orchestrator.core.shipped import demo_job_dir

    return demo_job_dir(create=create)


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
