"""The Olive commands of `orch` (finetune, auto-opt / optimize, quantize, capture-onnx-graph, generate-adapter,
convert-adapters, tune-session-params, and one-line refusals of those orch does not run): their flags and help;
olive/commands.py translates their values into the workflow to run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli.app import DryRunOpt, HostOpt, ModelNameOpt, NoTrackingOpt, TargetOpt, TrackingOpt, app
from orchestrator.cli.errors import _guarded, fail
from orchestrator.cli.run import _run_workflow

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


EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


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
