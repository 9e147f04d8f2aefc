"""The Olive commands of `orch` (finetune, quantize, auto-opt, optimize, capture-onnx-graph, generate-adapter,
convert-adapters, extract-adapters, tune-session-params, run-pass), built from the flag tables olive/flags.py names
(COMMANDS): every flag of Olive 0.7-0.13 with its help, both its underscore and dash spellings, grouped as Olive
groups them. The command's values go to its builder (olive/commands.py's BUILDERS: one module per command), which
returns the workflow to run (or refuses in one line); the Olive commands orch does not run (olive/unsupported.py)
are answered with one line."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.olive.flag_parsing import normalize_argv
from orchestrator.olive.flag_spec import Command, Flag
from orchestrator.olive.flags import COMMANDS, RUN_FLAGS
from orchestrator.olive.unsupported import UNSUPPORTED_COMMANDS

ORCH = "orch"
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
# orch's own options on every command that runs a workflow
ORCH_FLAGS: dict[str, tuple[Any, Any]] = {
    "host": (
        str | None,
        typer.Option(
            "--host", help="system that runs the passes: a name in `systems`, or local|docker|aml", rich_help_panel=ORCH
        ),
    ),
    "target": (
        str | None,
        typer.Option(
            "--target",
            help="system that runs evaluation (default: --host when given, else engine.target)",
            rich_help_panel=ORCH,
        ),
    ),
    "tracking_uri": (
        str | None,
        typer.Option(
            "--tracking-uri",
            "--tracking_uri",
            help="MLflow tracking URI (default: engine.mlflow.tracking_uri, $MLFLOW_TRACKING_URI, or mlruns.db in the "
            "config's folder)",
            rich_help_panel=ORCH,
        ),
    ),
    "no_tracking": (
        bool,
        typer.Option("--no-tracking", "--no_tracking", help="do not log to MLflow", rich_help_panel=ORCH),
    ),
    "model_name": (
        str | None,
        typer.Option(
            "--model-name",
            "--model_name",
            help="the MLflow registered model name (default: <command>-<output folder>)",
            rich_help_panel=ORCH,
        ),
    ),
}
_TYPES = {
    "str": str | None,
    "int": int | None,
    "float": float | None,
    "bool": str | None,
    "list": str | None,
    "optional": str | None,
}


def _option(flag: Flag) -> tuple[Any, Any]:
    """(annotation, default) of one Olive flag as a typer option."""
    metavar = {"list": "ITEM ...", "optional": "[VALUE]", "bool": "true|false"}.get(flag.kind)
    choices = f" [{'|'.join(flag.choices)}]" if flag.choices and len(flag.choices) <= 6 else ""
    info = typer.Option(
        *flag.spellings,
        help=flag.help + choices,
        rich_help_panel=flag.group,
        **({"metavar": metavar} if metavar else {}),
    )
    if flag.kind == "flag":
        return Annotated[bool, info], False
    default = ... if flag.required else flag.default
    return Annotated[_TYPES[flag.kind], info], default


def build_command(spec: Command, handle: Callable[[Command, dict[str, Any], list[str]], None]) -> Callable:
    """A function typer can register: keyword parameters from the table, values handed to `handle`."""
    params: list[inspect.Parameter] = []
    seen: set[str] = set()
    for flag in spec.flags:
        annotation, default = _option(flag)
        params.append(
            inspect.Parameter(flag.dest, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
        )
        seen.add(flag.dest)
    for dest, (kind, info) in ORCH_FLAGS.items():
        if dest not in seen:
            params.append(
                inspect.Parameter(
                    dest,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=False if kind is bool else None,
                    annotation=Annotated[kind, info],
                )
            )
    ctx_param = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)

    def command(ctx: typer.Context, **values: Any) -> None:
        handle(spec, values, list(ctx.args))

    command.__signature__ = inspect.Signature([ctx_param, *params])  # type: ignore[attr-defined]
    command.__annotations__ = {"ctx": typer.Context, **{p.name: p.annotation for p in params}}
    command.__doc__ = spec.help + f" (Olive {spec.versions})"
    command.__name__ = spec.name.replace("-", "_")
    return command


def absolute_paths(workflow: dict[str, Any], cwd: Path) -> dict[str, Any]:
    """The workflow as a file in another folder would need it: its local paths made absolute (a config saved to
    <output_path>/config.json resolves paths against its own folder)."""
    wf = json.loads(json.dumps(workflow))

    def fix(value: Any) -> Any:
        if isinstance(value, str) and value and not value.startswith(("azureml:", "http")) and (cwd / value).exists():
            return str((cwd / value).resolve())
        return value

    model = wf.get("input_model") or {}
    for key in ("model_path", "adapter_path"):
        if key in model:
            model[key] = fix(model[key])
    for dc in wf.get("data_configs") or []:
        load = dc.get("load_dataset_config") or {}
        if "data_files" in load:
            files = load["data_files"]
            load["data_files"] = [fix(f) for f in files] if isinstance(files, list) else fix(files)
        if "data_name" in load:
            load["data_name"] = fix(load["data_name"])
    engine = wf.get("engine") or {}
    for key in ("output_dir", "cache_dir"):
        if engine.get(key):
            engine[key] = str((cwd / engine[key]).resolve())
    return wf


def register(
    app: typer.Typer,
    *,
    run_workflow: Callable[..., Any],
    guarded: Callable[[Callable[[], Any]], Any],
    say: Callable[..., None],
    out: Any,
) -> None:
    """Add the Olive commands (and the one-line refusals of the Olive commands orch does not run) to `app`."""
    from orchestrator.olive.commands import BUILDERS, given_from
    from orchestrator.olive.plan import FlagError, command_workflow_id

    def note(text: str) -> None:
        say(text, label="note: ")  # dropped under --quiet

    def handle(spec: Command, values: dict[str, Any], extra: list[str]) -> None:
        orch = {k: values.pop(k, None) for k in ORCH_FLAGS}

        def go() -> None:
            if extra and not spec.extra_args:
                raise FlagError(f"{spec.name}: unknown argument(s) {' '.join(extra)} (see `orch {spec.name} --help`)")
            g = given_from(spec, values)
            builder = BUILDERS[spec.name]
            args: list[Any] = [g]
            if spec.name == "finetune":
                args += [extra, orch["host"], orch["target"]]
            elif spec.name in ("auto-opt", "optimize"):
                args += [orch["host"], orch["target"]]
            elif spec.name not in ("convert-adapters", "extract-adapters"):
                args.append(orch["host"])
            plan = builder(*args)
            if plan.workflow is not None and not plan.workflow.get("workflow_id"):  # names the MLflow run and model
                output = plan.output_path or plan.workflow["engine"].get("output_dir") or spec.name
                plan.workflow["workflow_id"] = command_workflow_id(spec.name, output)
            for line in plan.notes:
                note(line)
            if plan.workflow is None:
                if plan.message:
                    out.print(plan.message, markup=False, highlight=False)
                return
            if plan.save_config or plan.dry_run:  # Olive writes the workflow it would run, dry run or not
                dest = Path(plan.output_path or plan.workflow["engine"]["output_dir"] or ".") / "config.json"
                from orchestrator.core.job import atomic_write_text

                atomic_write_text(dest, json.dumps(absolute_paths(plan.workflow, Path.cwd()), indent=4) + "\n")
                out.print(f"Config file saved at {dest}", markup=False, highlight=False)
            summary = run_workflow(
                plan.workflow,
                base_dir=Path.cwd(),
                tracking_uri=orch["tracking_uri"],
                dry_run=plan.dry_run,
                verbose=int(g.get("log_level", 3)) <= 1,
                no_tracking=bool(orch["no_tracking"]),
                model_name=orch["model_name"],
            )
            if plan.after is not None and not plan.dry_run:
                plan.after(summary)
            if plan.message:
                out.print(plan.message, markup=False, highlight=False)

        guarded(go)

    for spec in COMMANDS.values():
        app.command(spec.name, context_settings=EXTRA, help=spec.help + f" (Olive {spec.versions})")(
            build_command(spec, handle)
        )

    def refusal(name: str, why: str) -> Callable[..., None]:
        def refuse(ctx: typer.Context) -> None:
            def go() -> None:
                raise FlagError(f"{name}: {why}")

            guarded(go)

        return refuse

    for name, why in UNSUPPORTED_COMMANDS.items():
        app.command(
            name, context_settings={**EXTRA, "help_option_names": []}, help=f"not supported: {why}", hidden=True
        )(refusal(name, why))


def normalize(argv: list[str]) -> list[str]:
    """Olive's list and optional-value grammar for the Olive commands (and `run`) before click parses argv."""
    for i, token in enumerate(argv):
        if token.startswith("-"):
            continue
        spec = COMMANDS.get(token)
        if spec is not None:
            return [*argv[: i + 1], *normalize_argv(spec, argv[i + 1 :])]
        if token == "run":
            return [*argv[: i + 1], *normalize_argv(RUN_FLAGS, argv[i + 1 :])]
        return argv
    return argv
