"""Olive's CLI commands as workflow configs, flag for flag (olive/flags.py names each command's table of every
flag of Olive 0.7-0.13).

Olive builds a workflow config from its flags and runs it; orch does the same, so `orch finetune ...` and a
workflow file are one code path. Each flag is honoured, accepted with a note that says why it changes nothing
here, or refused with one line naming what to use (FlagError).

This module is the dispatch: each command's builder lives in a module of its own (finetune, auto_opt, optimize,
quantize, capture, adapters, tune_session_params, run_pass) on the shared pieces of plan.py and model_ref.py;
BUILDERS names them, given_from turns typer's values into Given, and run_overrides applies `run`'s flags to a
workflow file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.olive.adapters import build_convert_adapters, build_extract_adapters, build_generate_adapter
from orchestrator.olive.auto_opt import build_auto_opt
from orchestrator.olive.capture import build_capture
from orchestrator.olive.finetune import build_finetune
from orchestrator.olive.flag_parsing import Given
from orchestrator.olive.flag_spec import Command
from orchestrator.olive.model_ref import input_model, make_test_model, resolve_model
from orchestrator.olive.optimize import build_optimize
from orchestrator.olive.plan import MODEL_SCRIPT_REFUSAL, FlagError, Plan
from orchestrator.olive.quantize import build_quantize
from orchestrator.olive.run_pass import build_run_pass
from orchestrator.olive.tune_session_params import build_tune_session_params

BUILDERS: dict[str, Callable[..., Plan]] = {
    "finetune": build_finetune,
    "quantize": build_quantize,
    "auto-opt": build_auto_opt,
    "optimize": build_optimize,
    "capture-onnx-graph": build_capture,
    "generate-adapter": build_generate_adapter,
    "convert-adapters": build_convert_adapters,
    "extract-adapters": build_extract_adapters,
    "tune-session-params": build_tune_session_params,
    "run-pass": build_run_pass,
}


def given_from(command: Command, values: dict[str, Any]) -> Given:
    """The typer values of a command -> Given, with the flags that differ from Olive's default marked explicit."""
    explicit = {f.dest for f in command.flags if values.get(f.dest) not in (None, False, f.default)}
    for f in command.flags:
        if f.choices and values.get(f.dest) is not None and f.kind != "list" and values[f.dest] not in f.choices:
            raise FlagError(f"{f.name} {values[f.dest]!r}: not one of Olive's choices ({', '.join(f.choices)})")
    return Given(values, explicit)


# ---- run ---------------------------------------------------------------------------------------------------------


def run_overrides(
    config: Path,
    *,
    package_config: str | None = None,
    model_name_or_path: str | None = None,
    output_path: str | None = None,
    task: str | None = None,
    trust_remote_code: bool = False,
    adapter_path: str | None = None,
    test: str | None = None,
    model_script: str | None = None,
    log_level: int | None = None,
    dry_run: bool = False,
) -> tuple[Any, Path | None, list[str]]:
    """Olive's `run` flags on a workflow file: -m/-a/-t/--trust_remote_code replace the input model, -o the
    output_dir, --log_level the severity, --test swaps in a 2-layer copy. Returns (source, base_dir, notes): the
    file itself when nothing is replaced."""
    if package_config:
        raise FlagError(
            "--package-config: Olive's pass package registry is not read: orch's passes are built in "
            "(orch run-pass --list-passes lists them); drop it"
        )
    if model_script:
        raise FlagError(MODEL_SCRIPT_REFUSAL)
    if not any([model_name_or_path, output_path, log_level is not None, test]):
        return config, None, []
    from orchestrator.olive.workflow import _read_file

    raw = _read_file(Path(config).expanduser())
    if not isinstance(raw, dict):
        return config, None, []
    base = Path(config).expanduser().resolve().parent
    cwd = Path.cwd()
    notes: list[str] = []

    def here(value: str) -> str:
        return str((cwd / value).resolve()) if (cwd / value).exists() else value

    if model_name_or_path:
        model = resolve_model(model_name_or_path, adapter_path)
        raw["input_model"] = input_model(
            here(model.path),
            trust_remote_code=trust_remote_code,
            task=task,
            adapter_path=here(model.adapter_path) if model.adapter_path else None,
        )
        notes.append(f"-m {model_name_or_path}: replaces the workflow's input model")
    for key, value in (
        ("output_dir", output_path and str((cwd / output_path).resolve())),
        ("log_severity_level", log_level),
    ):
        if value is None:
            continue
        raw.pop(key, None)
        engine = raw.setdefault("engine", {})
        if isinstance(engine, dict):
            engine[key] = value
    if test:
        im = raw.get("input_model") or {}
        path = im.get("model_path") or (im.get("config") or {}).get("model_path") if isinstance(im, dict) else None
        if not isinstance(path, str):
            raise FlagError("--test: the workflow's input_model needs a model_path (a Hugging Face model)")
        src = path if Path(path).is_absolute() or not (base / path).exists() else str(base / path)
        engine = raw.get("engine") if isinstance(raw.get("engine"), dict) else {}
        out_dir = engine.get("output_dir") or raw.get("output_dir") or "."
        dest = Path(test) if str(test).lower() != "true" else (base / str(out_dir) / "test_model")
        if not dry_run:
            make_test_model(src, dest.resolve())
        if "config" in im and isinstance(im["config"], dict):
            im["config"]["model_path"] = str(dest.resolve())
        else:
            im["model_path"] = str(dest.resolve())
        notes.append(f"--test: a random 2-layer copy of {path} at {dest} stands in for the input model")
    return raw, base, notes
