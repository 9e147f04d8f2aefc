"""Olive's CLI commands (finetune, auto-opt, quantize) as workflow configs, flag for flag.

Olive builds a workflow config from its flags and runs it; orch does the same, so `orch finetune ...` and a
workflow file are one code path. Flags that Olive forwards to transformers' TrainingArguments (any
`--name value` that finetune does not know) are collected into the LoRA pass's training_args.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from orchestrator.core.errors import UserError

FINETUNE_DATA = "train_data"


class FlagError(UserError):
    """A flag orch cannot honour here: one line naming the flag and the fix."""


def parse_extra_args(args: list[str]) -> dict[str, Any]:
    """`--max_steps 100 --bf16 --lr_scheduler_type cosine` -> {"max_steps": 100, "bf16": True, ...}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        flag = args[i]
        if not flag.startswith("--"):
            raise FlagError(f"unexpected argument {flag!r} (training arguments are given as --name value)")
        name, _, inline = flag[2:].partition("=")
        name = name.replace("-", "_")
        if inline:
            out[name] = _coerce(inline)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[name] = _coerce(args[i + 1])
            i += 2
        else:
            out[name] = True
            i += 1
    return out


def _coerce(value: str) -> Any:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}


def decode_escapes(text: str) -> str:
    """The backslash escapes a shell leaves in a template (\\n, \\t, \\\\) -> characters; everything else,
    non-ASCII text included, stays as typed (unicode_escape would decode UTF-8 bytes as Latin-1)."""
    import re

    return re.sub(r"\\([ntr\\\"'])", lambda m: _ESCAPES[m.group(1)], text)


def split_list(value: str | None) -> list[str] | None:
    """Olive takes --target_modules "q_proj","k_proj" (the shell leaves q_proj,k_proj) or space separated."""
    if not value:
        return None
    return [v.strip().strip('"').strip("'") for v in value.replace(" ", ",").split(",") if v.strip()]


# Phi-3-family checkpoints (Phi-3, Phi-3.5, Phi-4-mini: model_type "phi3") fuse these projections.
PHI3_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
              "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}  # fmt: skip


def fused_target_modules(modules: list[str], model_name_or_path: str) -> list[str]:
    """Tutorials list q_proj,k_proj,v_proj,gate_proj,up_proj for Phi-3-family models, which have the fused
    qkv_proj / gate_up_proj instead: map them (what the user means) and say so in one line."""
    import json
    import sys

    cfg = Path(model_name_or_path) / "config.json"
    if not cfg.is_file():
        cfg = _hub_config(model_name_or_path) or cfg
    try:
        model_type = json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None
    except (OSError, ValueError):
        model_type = None
    if model_type != "phi3" or not set(modules) & set(PHI3_FUSED):
        return modules
    mapped = list(dict.fromkeys(PHI3_FUSED.get(m, m) for m in modules))
    sys.stderr.write(
        f"note: --target_modules {','.join(modules)} -> {','.join(mapped)} (this Phi-3-family model fuses "
        "q/k/v into qkv_proj and gate/up into gate_up_proj)\n"
    )
    return mapped


def _hub_config(model_name_or_path: str) -> Path | None:
    """A hub model id's config.json (from the HF cache, or downloaded: the run downloads it anyway); None for a
    path, or when the hub cannot say (the run's pre-flight reports that in one line)."""
    from orchestrator.schema.resources import HUB_NAME

    if Path(model_name_or_path).exists() or not HUB_NAME.match(model_name_or_path):
        return None
    from orchestrator.core import hub

    try:
        pinned, files = hub.pin(hub.HubRef(model_name_or_path), field="--model_name_or_path")
        if "config.json" not in files:
            return None
        return hub.fetch(pinned, ["config.json"], field="--model_name_or_path") / "config.json"
    except hub.HubError:
        return None


def data_files_arg(value: str) -> str | list[str]:
    """Olive's --data_files takes one path or a comma-separated list."""
    parts = [v.strip() for v in value.split(",") if v.strip()]
    return parts[0] if len(parts) == 1 else parts


MODEL_MARKERS = ("config.json", "genai_config.json", "model.onnx")


def model_folder(model_name_or_path: str) -> str:
    """The model a path means: a previous command's --output_path (manifest.json + model/, what finetune and
    auto-opt write) means its model/ folder, as `orch generate` reads it; anything else is taken as given."""
    path = Path(model_name_or_path)
    if (path / "model").is_dir() and path.is_dir() and not any((path / m).exists() for m in MODEL_MARKERS):
        return str(path / "model")
    return model_name_or_path


def input_model(
    model_name_or_path: str, *, trust_remote_code: bool, task: str | None, adapter_path: str | None = None
) -> dict[str, Any]:
    model: dict[str, Any] = {
        "type": "HfModel",
        "model_path": model_folder(model_name_or_path),
        "task": task or "text-generation",
        "trust_remote_code": trust_remote_code,
    }
    if adapter_path:
        model["adapter_path"] = adapter_path
    return model


def command_workflow_id(command: str, output_path: str) -> str:
    """A CLI chain's workflow id, which names its MLflow run and registered model: the command and the output
    folder (`finetune -o models/ft` -> finetune-ft), so unrelated chains never share one registered model."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(output_path)).resolve().name).strip("-.") or "output"
    return f"{command}-{name}"


def _engine(output_path: str, log_level: int, providers: list[str], host: str | None, target: str | None) -> dict:
    return {
        "output_dir": output_path,
        "cache_dir": ".orch/cache",
        "log_severity_level": log_level,
        "execution_providers": providers,
        "host": host or "local",
        "target": target or host or "local",
    }


def finetune_workflow(
    *,
    model_name_or_path: str,
    output_path: str,
    method: str = "lora",
    data_name: str,
    data_files: str | None = None,
    train_split: str = "train",
    eval_split: str | None = None,
    text_template: str | None = None,
    text_field: str | None = None,
    max_seq_len: int = 1024,
    target_modules: str | None = None,
    lora_r: int = 64,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    trust_remote_code: bool = False,
    task: str | None = None,
    log_level: int = 3,
    training_args: dict[str, Any] | None = None,
    host: str | None = None,
    target: str | None = None,
) -> dict[str, Any]:
    method = method.lower()
    if method not in ("lora", "qlora"):
        raise FlagError(f"--method {method!r} is not supported; use lora or qlora")
    params: dict[str, Any] = {"data_name": data_name, "split": train_split}
    if data_files:
        params["data_files"] = data_files_arg(data_files)
    pre: dict[str, Any] = {"dataset_type": "corpus", "source_max_len": max_seq_len, "corpus_strategy": "join"}
    if text_template:
        pre["text_template"] = decode_escapes(text_template)
    elif text_field:
        pre["text_cols"] = [text_field]
    else:
        raise FlagError("finetune needs --text_template or --text_field to know which text to train on")
    pass_config: dict[str, Any] = {
        "train_data_config": FINETUNE_DATA,
        "lora_r": lora_r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "training_args": dict(training_args or {}),
    }
    modules = split_list(target_modules)
    if modules:
        pass_config["target_modules"] = fused_target_modules(modules, model_name_or_path)
    if eval_split:
        pass_config["train_split"] = train_split
        pass_config["eval_split"] = eval_split
    return {
        "input_model": input_model(model_name_or_path, trust_remote_code=trust_remote_code, task=task),
        "data_configs": [
            {
                "name": FINETUNE_DATA,
                "type": "HuggingfaceContainer",
                "load_dataset_config": params,
                "pre_process_data_config": pre,
            }
        ],
        "passes": {"finetune": {"type": "QLoRA" if method == "qlora" else "LoRA", **pass_config}},
        "workflow_id": command_workflow_id("finetune", output_path),
        "engine": _engine(output_path, log_level, ["CPUExecutionProvider"], host, target),
    }


DEVICE_PROVIDERS = {"cpu": "CPUExecutionProvider", "gpu": "CUDAExecutionProvider"}

# Olive commands with no orch counterpart, and what to use instead (the CLI answers with this one line).
UNSUPPORTED_COMMANDS: dict[str, str] = {}


class _FlagParser(argparse.ArgumentParser):
    """argparse with Olive's grammar (space-separated lists), failing with one FlagError line, not a usage dump."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise FlagError(f"{self.prog}: {message}")

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        """--model-name-or-path is --model_name_or_path, as in the other commands (the CLI accepts both)."""
        if args is not None:
            args = [_underscored(a) for a in args]
        return super().parse_args(args, namespace)


def _underscored(token: str) -> str:
    if not token.startswith("--") or token == "--":
        return token
    name, eq, value = token.partition("=")
    return name.replace("-", "_").replace("__", "--", 1) + eq + value


def tune_session_params_parser() -> argparse.ArgumentParser:
    """Olive's `tune-session-params` flags (olive/cli/session_params_tuning.py), same names and list syntax."""
    p = _FlagParser(prog="tune-session-params", add_help=True)
    p.add_argument("-m", "--model_name_or_path", required=True, help="the ONNX model folder (or a command's output)")
    p.add_argument("-o", "--output_path", default="tuned-inference-settings",
                   help="folder for <accelerator>.json, the fastest settings")
    p.add_argument("--cpu_cores", type=int, help="CPU cores to tune the thread counts up to")
    p.add_argument("--io_bind", action="store_true", help="bind inputs/outputs to the device (CUDA)")
    p.add_argument("--enable_cuda_graph", action="store_true", help="try CUDA graphs (CUDA provider)")
    p.add_argument("--execution_mode_list", type=int, nargs="*", help="execution modes: 0 sequential, 1 parallel")
    p.add_argument("--opt_level_list", type=int, nargs="*", help="graph optimization levels to try: 0 1 2 99")
    p.add_argument("--trt_fp16_enable", action="store_true", help="fp16 in the TensorRT provider")
    p.add_argument("--intra_thread_num_list", type=int, nargs="*", help="intra-op thread counts to try")
    p.add_argument("--inter_thread_num_list", type=int, nargs="*", help="inter-op thread counts to try")
    p.add_argument("--extra_session_config", type=json.loads, help="JSON of session config entries to add")
    p.add_argument("--disable_force_evaluate_other_eps", action="store_true",
                   help="stop at the first provider that works instead of timing all")
    p.add_argument("--enable_profiling", action="store_true", help="onnxruntime profiling of the tuning runs")
    p.add_argument("--predict_with_kv_cache", action="store_true", help="time one token with a KV cache (decode)")
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu", help="cpu | gpu: where the model will run")
    p.add_argument("--provider", "--providers_list", dest="providers", nargs="*",
                   help="execution providers to time (default: the device's)")
    p.add_argument("--log_level", type=int, default=3, help="Olive's log level: 0 or 1 stream the passes' logs")
    return p


def tune_session_params_workflow(args: argparse.Namespace, host: str | None = None) -> dict[str, Any]:
    """The workflow Olive's tune-session-params runs: one OrtSessionParamsTuning pass over dummy inputs of the
    graph (a prompt, or one token with a KV cache under --predict_with_kv_cache)."""
    providers = args.providers or [DEVICE_PROVIDERS[args.device]]
    providers = [p if p.endswith("ExecutionProvider") else f"{p}ExecutionProvider" for p in providers]
    keys = ("cpu_cores", "io_bind", "enable_cuda_graph", "execution_mode_list", "opt_level_list", "trt_fp16_enable",
            "intra_thread_num_list", "inter_thread_num_list", "extra_session_config", "enable_profiling")  # fmt: skip
    tuning = {k: getattr(args, k) for k in keys if getattr(args, k) not in (None, False)}
    container = "TransformersTokenDummyDataContainer" if args.predict_with_kv_cache else (
        "TransformersPromptDummyDataContainer")  # fmt: skip
    return {
        "input_model": input_model(args.model_name_or_path, trust_remote_code=False, task=None),
        "data_configs": [{"name": "session_params_tuning_data", "type": container}],
        "passes": {
            "session_params_tuning": {
                "type": "OrtSessionParamsTuning", "data_config": "session_params_tuning_data",
                "providers_list": providers, "force_evaluate_other_eps": not args.disable_force_evaluate_other_eps,
                **tuning,
            }
        },
        "workflow_id": command_workflow_id("tune-session-params", args.output_path),
        "engine": _engine(args.output_path, args.log_level, providers, host, host),
    }  # fmt: skip


def accelerator_key(device: str, provider: str) -> str:
    """Olive's name for an accelerator spec, which its tune-session-params output file is named by: cpu-cpu."""
    return f"{device}-{provider.removesuffix('ExecutionProvider').lower()}"


def auto_opt_workflow(
    *,
    model_name_or_path: str,
    output_path: str,
    adapter_path: str | None = None,
    device: str = "cpu",
    provider: str | None = None,
    precision: str = "int4",
    use_model_builder: bool = False,
    use_ort_genai: bool = False,
    trust_remote_code: bool = False,
    task: str | None = None,
    log_level: int = 3,
    host: str | None = None,
    target: str | None = None,
    split_flags: dict[str, Any] | None = None,
) -> dict[str, Any]:
    flags = split_flags or {}
    for flag in ("--memory", "--cost-model"):
        if flags.get(flag) is not None:
            raise FlagError(
                f"{flag}: splitting by memory / a cost model is not supported; give the number of parts "
                "(--num-splits N)"
            )
    num_splits = flags.get("--num-splits")
    if num_splits is not None and int(num_splits) < 2:
        raise FlagError(f"--num-splits {num_splits}: give 2 or more parts (or drop the flag)")
    device = device.lower()
    if device not in DEVICE_PROVIDERS:
        raise FlagError(f"--device {device!r}: orch builds for cpu or gpu (npu needs a vendor toolchain not present)")
    provider = provider or DEVICE_PROVIDERS[device]
    if provider not in ("CPUExecutionProvider", "CUDAExecutionProvider"):
        raise FlagError(
            f"--provider {provider!r}: orch's builder path supports CPUExecutionProvider and CUDAExecutionProvider"
        )
    if precision not in ("int4", "int8", "fp16", "fp32"):
        raise FlagError(f"--precision {precision!r}: the model builder exports int4, int8, fp16 or fp32")
    passes: dict[str, Any] = {}
    # Olive's auto-opt without --use_model_builder searches conversions; orch always takes the builder path,
    # which is what --use_ort_genai asks for on these models.
    passes["builder"] = {"type": "ModelBuilder", "precision": precision}
    if adapter_path:  # as Olive: the adapter stays separate, model/adapter_weights.onnx_adapter beside the base
        passes["extract_adapters"] = {"type": "ExtractAdapters"}
    if num_splits is not None:  # as Olive's CaptureSplitInfo + SplitModel: embeddings and LM head parts of their own
        passes["split_model"] = {"type": "SplitModel", "num_splits": int(num_splits),
                                 "unique_embeds_lm_head_splits": True}  # fmt: skip
    return {
        "input_model": input_model(
            model_name_or_path, trust_remote_code=trust_remote_code, task=task, adapter_path=adapter_path
        ),
        "passes": passes,
        "workflow_id": command_workflow_id("auto-opt", output_path),
        "engine": _engine(output_path, log_level, [provider], host, target),
    }


def quantize_workflow(
    *,
    model_name_or_path: str,
    output_path: str,
    algorithm: str,
    precision: str = "int4",
    trust_remote_code: bool = False,
    log_level: int = 3,
    host: str | None = None,
    data_name: str | None = None,
    data_files: str | None = None,
    text_template: str | None = None,
    text_field: str | None = None,
) -> dict[str, Any]:
    algorithm = algorithm.lower()
    data_configs: list[dict[str, Any]] = []
    if precision != "int4":
        raise FlagError(
            f"--precision {precision!r}: orch quantizes weights to int4 (fp8 needs a GPU toolchain orch does not ship)"
        )
    model_path = Path(model_folder(model_name_or_path))
    is_onnx = model_path.suffix == ".onnx" or (model_path.is_dir() and any(model_path.glob("*.onnx")))
    if algorithm in ("awq", "gptq") and not data_name:  # as Olive: the pass's default calibration set (hub)
        pass_cfg: dict[str, Any] = {"type": "AutoAWQQuantizer" if algorithm == "awq" else "GptqQuantizer", "bits": 4}
    elif algorithm in ("awq", "gptq"):
        pre: dict[str, Any] = {"dataset_type": "corpus"}
        if text_template:
            pre["text_template"] = decode_escapes(text_template)
        else:
            pre["text_cols"] = [text_field or "text"]
        params: dict[str, Any] = {"data_name": data_name, "split": "train"}
        if data_files:
            params["data_files"] = data_files_arg(data_files)
        data_configs.append(
            {"name": "calibration", "type": "HuggingfaceContainer", "load_dataset_config": params,
             "pre_process_data_config": pre}
        )  # fmt: skip
        pass_cfg = {
            "type": "AutoAWQQuantizer" if algorithm == "awq" else "GptqQuantizer",
            "bits": 4,
            "data_config": "calibration",
        }
    elif algorithm == "rtn":
        pass_cfg = (
            {"type": "OnnxMatMul4Quantizer", "block_size": 32}
            if is_onnx
            else {"type": "ModelBuilder", "precision": "int4"}
        )
    else:
        raise FlagError(f"--algorithm {algorithm!r} is not supported; use awq, gptq or rtn")
    return {
        "input_model": input_model(model_name_or_path, trust_remote_code=trust_remote_code, task=None),
        "data_configs": data_configs,
        "passes": {"quantize": pass_cfg},
        "workflow_id": command_workflow_id("quantize", output_path),
        "engine": _engine(output_path, log_level, ["CPUExecutionProvider"], host, host),
    }


def capture_onnx_graph_workflow(
    *,
    model_name_or_path: str,
    output_path: str,
    adapter_path: str | None = None,
    use_model_builder: bool = False,
    use_dynamo_exporter: bool = False,
    precision: str = "fp32",
    torch_dtype: str | None = None,
    target_opset: int = 17,
    trust_remote_code: bool = False,
    log_level: int = 3,
    host: str | None = None,
) -> dict[str, Any]:
    """Olive's capture-onnx-graph: torch's exporter (OnnxConversion), or the model builder with --use_model_builder."""
    passes: dict[str, Any] = {}
    if use_model_builder:
        if adapter_path:
            passes["merge"] = {"type": "MergeAdapterWeights"}
        passes["builder"] = {"type": "ModelBuilder", "precision": precision}
    else:
        if precision not in ("fp32", "fp16"):
            raise FlagError(f"--precision {precision!r}: torch's exporter writes fp32 or fp16; use --use_model_builder")
        dtype = torch_dtype or ("float16" if precision == "fp16" else None)
        passes["conversion"] = {
            "type": "OnnxConversion",
            "use_dynamo_exporter": use_dynamo_exporter,
            "target_opset": target_opset,
            "merge_adapter_weights": bool(adapter_path),
            "save_metadata_for_token_generation": True,
            **({"torch_dtype": dtype} if dtype else {}),
        }
    return {
        "input_model": input_model(
            model_name_or_path, trust_remote_code=trust_remote_code, task=None, adapter_path=adapter_path
        ),
        "passes": passes,
        "workflow_id": command_workflow_id("capture-onnx-graph", output_path),
        "engine": _engine(output_path, log_level, ["CPUExecutionProvider"], host, host),
    }


def generate_adapter_workflow(
    *,
    model_name_or_path: str,
    adapter_path: str,
    output_path: str,
    adapter_format: str = "onnx_adapter",
    precision: str = "int4",
    provider: str = "CPUExecutionProvider",
    trust_remote_code: bool = False,
    log_level: int = 3,
    host: str | None = None,
) -> dict[str, Any]:
    """Olive's generate-adapter: an ONNX model whose LoRA weights are inputs + the adapter weights file. Olive
    takes an ONNX model exported with the adapter; orch builds that model itself (ModelBuilder from the base
    model and the adapter), then runs ExtractAdapters."""
    formats = {"onnx_adapter": "onnx_adapter", "numpy": "numpy"}
    if adapter_format not in formats:
        raise FlagError(f"--adapter_format {adapter_format!r}: use onnx_adapter or numpy")
    if not adapter_path:
        raise FlagError("--adapter_path is required: orch builds the ONNX model from the base model + the adapter")
    return {
        "input_model": input_model(
            model_name_or_path, trust_remote_code=trust_remote_code, task=None, adapter_path=adapter_path
        ),
        "passes": {
            "builder": {"type": "ModelBuilder", "precision": precision},
            "extract_adapters": {"type": "ExtractAdapters", "save_format": formats[adapter_format]},
        },
        "workflow_id": command_workflow_id("generate-adapter", output_path),
        "engine": _engine(output_path, log_level, [provider], host, host),
    }


def convert_adapters(
    *,
    adapter_path: str,
    output_path: str,
    adapter_format: str = "onnx_adapter",
    dtype: str = "float32",
    model_name_or_path: str | None = None,
    quantize_int4: bool = False,
) -> Path:
    """Olive's convert-adapters: a PEFT LoRA folder -> one adapter weights file for the base model that
    ModelBuilder + ExtractAdapters built (the builder's weight names). Phi-3's fused projections are split with the
    base model's config.json: --model_name_or_path, else the adapter's base_model_name_or_path."""
    from orchestrator.passes.base import PassError
    from orchestrator.passes.onnx.extract_adapters import convert_peft_adapter, save_adapter

    if quantize_int4:
        raise FlagError("--quantize_int4: orch keeps adapters float (the int4 base model's LoRA inputs are float)")
    if adapter_format not in ("onnx_adapter", "numpy"):
        raise FlagError(f"--adapter_format {adapter_format!r}: use onnx_adapter or numpy")
    if dtype not in ("float32", "float16"):
        raise FlagError(f"--dtype {dtype!r}: use float32 or float16")
    adapter = Path(adapter_path)
    base = model_name_or_path
    if base is None and (adapter / "adapter_config.json").is_file():
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    hf_config = None
    if base and (Path(base) / "config.json").is_file():
        hf_config = json.loads((Path(base) / "config.json").read_text())
    try:
        weights = convert_peft_adapter(adapter, hf_config, dtype)
    except PassError as exc:
        raise FlagError(str(exc)) from None
    out = Path(output_path)
    suffix = ".npz" if adapter_format == "numpy" else ".onnx_adapter"
    if out.suffix != suffix:
        out = out.with_name(out.name + suffix)
    return save_adapter(weights, out)
