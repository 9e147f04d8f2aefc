"""What every Olive command's builder shares: the Plan it returns, the FlagError it raises, the parsers of flag
values, and the flags every command takes (common, remote, the engine section, the provider, the data set).

The command modules (finetune, auto_opt, optimize, quantize, capture, adapters, tune_session_params, run_pass)
import these; this module imports none of them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.core.errors import UserError
from orchestrator.core.links import real
from orchestrator.olive.flag_parsing import Given, parse_bool, split_values
from orchestrator.olive.unsupported import GENERATIVE_ONLY, NO_MODEL_SCRIPTS, NO_NPU, NO_SHARED_CACHE


class FlagError(UserError):
    """A flag orch cannot honour here: one line naming the flag and the fix."""


@dataclass
class Plan:
    """What a command line asks for: a workflow to run (or none: `message` says what was done), the notes the
    user reads first, and what to do with the run's result."""

    workflow: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    after: Callable[[Any], None] | None = None  # given the run summary (tune-session-params writes its file)
    message: str | None = None
    save_config: bool = False
    dry_run: bool = False
    output_path: str | None = None


# ---- small parsers --------------------------------------------------------------------------------------------


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
    return re.sub(r"\\([ntr\\\"'])", lambda m: _ESCAPES[m.group(1)], text)


def split_list(value: str | None) -> list[str] | None:
    """Olive takes --target_modules "q_proj","k_proj" (the shell leaves q_proj,k_proj) or space separated."""
    if not value:
        return None
    return [v.strip().strip('"').strip("'") for v in value.replace(" ", ",").split(",") if v.strip()]


def data_files_arg(value: str) -> str | list[str]:
    """Olive's --data_files takes one path or a comma-separated list."""
    parts = [v.strip() for v in value.split(",") if v.strip()]
    return parts[0] if len(parts) == 1 else parts


def extra_mb_options(value: str) -> dict[str, Any]:
    """--extra_mb_options 'int4_is_symmetric=true,int4_op_types_to_quantize=MatMul/Gather' -> builder options."""
    out: dict[str, Any] = {}
    for item in value.split(","):
        if not item.strip():
            continue
        key, eq, val = item.partition("=")
        if not eq or not key.strip():
            raise FlagError(f"--extra_mb_options {item!r}: give KEY=VALUE pairs separated by commas")
        out[key.strip()] = _coerce(val.strip())
    return out


# ---- what every command shares ------------------------------------------------------------------------------------


def _engine(
    output_path: str | None, log_level: int, providers: list[str], host: str | None, target: str | None
) -> dict:
    return {
        "output_dir": output_path,
        "cache_dir": ".orch/cache",
        "log_severity_level": log_level,
        "execution_providers": providers,
        "host": host or "local",
        "target": target or host or "local",
    }


# --model_script on an Olive command and on `run` (commands.run_overrides)
MODEL_SCRIPT_REFUSAL = (
    f"--model_script: {NO_MODEL_SCRIPTS}: give a Hugging Face model folder or hub id, or an ONNX model, as -m"
)


def note_memory(g: Given, plan: Plan) -> None:
    """--memory (auto-opt, tune-session-params) only sizes a cost-model split, which orch does not make."""
    if g["memory"]:
        plan.notes.append(f"--memory {g['memory']}: accepted, no effect (read only to split by a cost model)")


def refuse_qdq_encoding(g: Given) -> None:
    """--use_qdq_encoding (auto-opt, quantize): Olive's MatMulNBitsToQDQ for NPUs, which orch does not build."""
    if g["use_qdq_encoding"]:
        raise FlagError(
            "--use_qdq_encoding: QDQ encoding (MatMulNBitsToQDQ) is for NPUs and is not supported; "
            "drop it for MatMulNBits"
        )


def common(g: Given, plan: Plan) -> None:
    """The flags every Olive command shares: refusals first, then what they change."""
    if g["account_name"] or g["container_name"]:
        raise FlagError(f"--account_name/--container_name: {NO_SHARED_CACHE}; drop the flags")
    if g["model_variant"] and g["model_variant"] != "auto":
        raise FlagError(
            f"--model_variant {g['model_variant']}: diffusion models are not supported; orch exports language models"
        )
    if g["model_script"] or g["script_dir"]:
        raise FlagError(MODEL_SCRIPT_REFUSAL)
    if g["is_generative_model"] is not None and parse_bool("--is_generative_model", g["is_generative_model"]) is False:
        raise FlagError(f"--is_generative_model false: {GENERATIVE_ONLY}")
    plan.save_config = bool(g["save_config_file"])
    plan.dry_run = bool(g["dry_run"])
    plan.output_path = g["output_path"]


def remote(g: Given, wf: dict[str, Any], plan: Plan) -> None:
    """Olive 0.7-0.8's --resource_group/--workspace_name/--aml_compute: the passes run on that Azure ML cluster
    (Olive ran the whole workflow as one job; `orch submit` does that with a workflow file)."""
    given = {k: g[k] for k in ("resource_group", "workspace_name", "aml_compute", "keyvault_name") if g[k]}
    if not given:
        return
    missing = [f"--{k}" for k in ("resource_group", "workspace_name", "aml_compute") if not g[k]]
    if missing:
        raise FlagError(
            f"{', '.join(missing)}: a remote run needs --resource_group, --workspace_name and --aml_compute together"
        )
    wf["azureml_client"] = {k: v for k, v in given.items() if k != "aml_compute"}
    system: dict[str, Any] = {
        "type": "AzureML",
        "aml_compute": g["aml_compute"],
        "accelerators": [{"device": "gpu", "execution_providers": ["CUDAExecutionProvider"]}],
    }
    if g["keyvault_name"]:
        system["hf_token"] = True
    wf.setdefault("systems", {})["aml_system"] = system
    wf["engine"]["host"] = wf["engine"]["target"] = "aml_system"
    plan.notes.append(
        f"--aml_compute {g['aml_compute']}: each pass runs as an Azure ML job on that cluster (subscription from "
        "AZURE_SUBSCRIPTION_ID or `orch config`)"
    )


def _log_level(g: Given) -> int:
    return int(g.get("log_level", 3))


def command_workflow_id(command: str, output_path: str) -> str:
    """A CLI chain's workflow id, which names its MLflow run and registered model: the command and the output
    folder (`finetune -o models/ft` -> finetune-ft), so unrelated chains never share one registered model."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", real(Path(str(output_path))).name).strip("-.") or "output"
    return f"{command}-{name}"


DEVICE_PROVIDERS = {"cpu": "CPUExecutionProvider", "gpu": "CUDAExecutionProvider"}
BUILDER_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "DmlExecutionProvider", "WebGpuExecutionProvider")


def _provider(provider: str | None, device: str | None, flag: str = "--provider") -> str:
    device = (device or "cpu").lower()
    if device == "npu" and provider in (None, "CPUExecutionProvider"):
        raise FlagError(f"--device {device!r}: {NO_NPU}")
    provider = provider or DEVICE_PROVIDERS.get(device, "CPUExecutionProvider")
    if provider not in BUILDER_PROVIDERS:
        raise FlagError(
            f"{flag} {provider!r}: orch builds models for {', '.join(BUILDER_PROVIDERS)} (NPU, OpenVINO and "
            "TensorRT toolchains are not part of orch)"
        )
    if provider == "CPUExecutionProvider" and device == "gpu":
        provider = "CUDAExecutionProvider"  # Olive's default provider with --device gpu means CUDA
    return provider


# ---- data flags -------------------------------------------------------------------------------------------------


def data_config(
    g: Given,
    name: str,
    *,
    split: str | None,
    subset: str | None,
    max_seq_len_key: str = "max_seq_len",
    default_text: bool = True,
    plan: Plan,
    what: str,
) -> dict[str, Any]:
    """A HuggingfaceContainer from Olive's dataset flags (olive/cli/base.py update_dataset_options)."""
    load: dict[str, Any] = {"data_name": g["data_name"], "split": split or "train"}
    if subset:
        load["subset"] = subset
    if g["data_files"]:
        load["data_files"] = data_files_arg(g["data_files"])
    pre: dict[str, Any] = {"dataset_type": "corpus"}
    given_text = [f for f in ("text_template", "text_field", "use_chat_template") if g[f]]
    if len(given_text) > 1:
        raise FlagError(f"--{' / --'.join(given_text)}: give one of --text_template, --text_field, --use_chat_template")
    if g["text_template"]:
        pre["text_template"] = decode_escapes(g["text_template"])
    elif g["use_chat_template"]:
        pre["chat_template"] = True
    elif g["text_field"]:
        pre["text_cols"] = [g["text_field"]]
    elif default_text:
        pre["text_cols"] = ["text"]  # Olive's default column
    if g[max_seq_len_key] is not None:
        pre["max_seq_len"] = int(g[max_seq_len_key])
    if g["add_special_tokens"] is not None:
        pre["add_special_tokens"] = parse_bool("--add_special_tokens", g["add_special_tokens"])
    if g.given("max_samples") and g["max_samples"] is not None:
        pre["max_samples"] = int(g["max_samples"])
    if g["input_cols"]:
        plan.notes.append(
            f"--input_cols {' '.join(split_values(g['input_cols']) or [])}: accepted, no effect "
            f"({what} reads the text columns: --text_field / --text_template)"
        )
    return {"name": name, "type": "HuggingfaceContainer", "load_dataset_config": load, "pre_process_data_config": pre}
