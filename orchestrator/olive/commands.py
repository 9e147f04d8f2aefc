"""Olive's CLI commands as workflow configs, flag for flag (olive/flags.py lists every flag of Olive 0.7-0.13).

Olive builds a workflow config from its flags and runs it; orch does the same, so `orch finetune ...` and a
workflow file are one code path. Each flag is honoured, accepted with a note that says why it changes nothing
here, or refused with one line naming what to use (FlagError). Flags that Olive forwards to transformers'
TrainingArguments (any `--name value` that finetune does not know) are collected into the LoRA pass's
training_args.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.core.errors import UserError
from orchestrator.core.links import real
from orchestrator.olive import flags as F
from orchestrator.olive.flags import UNSUPPORTED_COMMANDS, Given, parse_bool, split_values  # noqa: F401

FINETUNE_DATA = "train_data"
EVAL_DATA = "eval_data"


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


# Phi-3-family checkpoints (Phi-3, Phi-3.5, Phi-4-mini: model_type "phi3") fuse these projections.
PHI3_FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def _model_type(model_name_or_path: str) -> str | None:
    cfg = Path(model_name_or_path) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else None
    except (OSError, ValueError):
        return None


def fused_target_modules(modules: list[str], model_name_or_path: str) -> list[str]:
    """Tutorials list q_proj,k_proj,v_proj,gate_proj,up_proj for Phi-3-family models, which have the fused
    qkv_proj / gate_up_proj instead: map them (what the user means) and say so in one line."""
    import sys

    model_type = _model_type(model_name_or_path)
    if model_type is None:
        cfg = _hub_config(model_name_or_path)
        try:
            model_type = json.loads(cfg.read_text()).get("model_type") if cfg is not None and cfg.is_file() else None
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


# ---- the input model -------------------------------------------------------------------------------------------


@dataclass
class ModelRef:
    path: str
    adapter_path: str | None = None
    kind: str = "hf"  # hf | onnx | remote (azureml:// or a hub id)


def resolve_model(value: str, adapter_path: str | None = None) -> ModelRef:
    """-m as Olive reads it: a hub URL -> its id; the output folder of an earlier command -> its model (orch's
    manifest.json + model/ [+ adapter/]; Olive's model_config.json); an ONNX file or folder; an HF folder."""
    m = re.match(r"https://huggingface\.co/([^/]+/[^/]+)", value)
    if m:
        return ModelRef(m.group(1), adapter_path, "remote")
    if value.startswith("azureml:"):
        return ModelRef(value, adapter_path, "remote")
    p = Path(value)
    if not p.exists():
        return ModelRef(value, adapter_path, "remote")  # a hub id (or a typo: preflight names it)
    if p.is_dir() and (p / "model_config.json").is_file():  # an Olive command's output
        try:
            cfg = json.loads((p / "model_config.json").read_text())
        except ValueError:
            cfg = {}
        inner = cfg.get("config") or {}
        if str(cfg.get("type", "")).lower() == "onnxmodel":
            return ModelRef(str(p), adapter_path, "onnx")
        adapter_path = adapter_path or inner.get("adapter_path")
        return ModelRef(str(inner.get("model_path") or p), adapter_path, _kind(Path(inner.get("model_path") or p)))
    if p.is_dir() and (p / "manifest.json").is_file() and (p / "model").is_dir():  # an orch command's output
        adapter = p / "adapter"
        if adapter_path is None and (adapter / "adapter_config.json").is_file():
            adapter_path = str(adapter)
        return ModelRef(str(p / "model"), adapter_path, _kind(p / "model"))
    return ModelRef(str(p), adapter_path, _kind(p))


def _kind(p: Path) -> str:
    if p.suffix == ".onnx" or (p.is_dir() and any(p.glob("*.onnx"))):
        return "onnx"
    return "hf"


def adapter_kind(adapter_path: str | None) -> str:
    """lora, dora, loha, lokr, ... of a local PEFT folder ("lora" when none or unreadable)."""
    if not adapter_path or not Path(adapter_path).is_dir():
        return "lora"
    from orchestrator.passes.onnx.extract_adapters import adapter_type

    return adapter_type(Path(adapter_path))


def merge_first(passes: dict[str, Any], kind: str, notes: list[str]) -> dict[str, Any]:
    """A DoRA / LoHa / LoKr adapter has no onnxruntime-genai adapter form: merge it before the export, and the
    adapter is no longer lifted out (ExtractAdapters dropped); said in one note."""
    out = {"merge": {"type": "MergeAdapterWeights"}}
    out.update({k: v for k, v in passes.items() if v.get("type") != "ExtractAdapters"})
    notes.append(
        f"the {kind.upper()} adapter is merged into the model before export (onnxruntime-genai's adapters are LoRA "
        "A/B pairs, so it cannot stay a separate adapter file)"
    )
    return out


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


def make_test_model(src: str, dest: Path, trust_remote_code: bool = False, layers: int = 2) -> Path:
    """Olive's --test: a randomly initialized copy of the model's architecture with 2 hidden layers and its
    tokenizer, saved once at dest (reused when it is there)."""
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(config, key):
            setattr(config, key, min(layers, int(getattr(config, key))))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    from orchestrator.core.fs import atomic_dir

    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code).save_pretrained(tmp)
    return dest


def command_workflow_id(command: str, output_path: str) -> str:
    """A CLI chain's workflow id, which names its MLflow run and registered model: the command and the output
    folder (`finetune -o models/ft` -> finetune-ft), so unrelated chains never share one registered model."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", real(Path(str(output_path))).name).strip("-.") or "output"
    return f"{command}-{name}"


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


def common(g: Given, plan: Plan) -> None:
    """The flags every Olive command shares: refusals first, then what they change."""
    if g["account_name"] or g["container_name"]:
        raise FlagError(
            "--account_name/--container_name: Olive's Azure Blob shared cache is not used: orch caches every pass by "
            "content in engine.cache_dir (on Azure ML in the workspace's datastore); drop the flags"
        )
    if g["model_variant"] and g["model_variant"] != "auto":
        raise FlagError(
            f"--model_variant {g['model_variant']}: diffusion models are not supported; orch exports language models"
        )
    if g["model_script"] or g["script_dir"]:
        raise FlagError(
            "--model_script: PyTorch model-loader scripts (_model_loader) are not run by orch: give a Hugging Face "
            "model folder or hub id, or an ONNX model, as -m"
        )
    if g["is_generative_model"] is not None and parse_bool("--is_generative_model", g["is_generative_model"]) is False:
        raise FlagError("--is_generative_model false: orch optimizes generative language models only")
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


def test_model(g: Given, model: ModelRef, plan: Plan, *, default_root: str | None) -> ModelRef:
    """--test [DIR]: the model replaced by its random 2-layer copy (built once at DIR)."""
    value = g["test"]
    if value in (None, "", False) or str(value).lower() == "false":
        return model
    if model.kind == "onnx":
        raise FlagError("--test: builds a 2-layer copy of a Hugging Face model; -m is an ONNX model")
    dest = Path(default_root or ".") / "test_model" if str(value).lower() == "true" else Path(value)
    if not plan.dry_run:
        make_test_model(model.path, dest, trust_remote_code=bool(g["trust_remote_code"]))
    plan.notes.append(f"--test: a random 2-layer copy of {model.path} at {dest} stands in for the model")
    return ModelRef(str(dest), model.adapter_path, "hf")


def _log_level(g: Given) -> int:
    return int(g.get("log_level", 3))


def _model_of(g: Given, plan: Plan) -> ModelRef:
    if not g["model_name_or_path"]:
        raise FlagError("-m/--model_name_or_path is required")
    model = resolve_model(g["model_name_or_path"], g["adapter_path"])
    return test_model(g, model, plan, default_root=g["output_path"])


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


# ---- finetune ---------------------------------------------------------------------------------------------------

FINETUNE_PASSES = {"lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}


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
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    trust_remote_code: bool = False,
    task: str | None = None,
    log_level: int = 3,
    training_args: dict[str, Any] | None = None,
    host: str | None = None,
    target: str | None = None,
    torch_dtype: str | None = None,
    train_subset: str | None = None,
    eval_subset: str | None = None,
    use_chat_template: bool = False,
    add_special_tokens: bool | str | None = None,
    max_samples: int | None = None,
    adapter_path: str | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """Olive's finetune (olive/cli/finetune.py): one LoRA-family pass on a HuggingfaceContainer."""
    method = method.lower()
    if method not in FINETUNE_PASSES:
        raise FlagError(f"--method {method!r} is not supported; use {', '.join(FINETUNE_PASSES)}")
    values = {
        "data_name": data_name,
        "data_files": data_files,
        "text_template": text_template,
        "text_field": text_field,
        "use_chat_template": use_chat_template,
        "max_seq_len": max_seq_len,
        "add_special_tokens": add_special_tokens,
        "max_samples": max_samples,
        "input_cols": None,
    }
    g = Given(values, {k for k, v in values.items() if v not in (None, False)})
    plan = Plan(notes=notes if notes is not None else [])
    train = data_config(g, FINETUNE_DATA, split=train_split, subset=train_subset, plan=plan, what="fine-tuning")
    train["pre_process_data_config"]["corpus_strategy"] = "join"
    pass_config: dict[str, Any] = {
        "train_data_config": FINETUNE_DATA,
        "lora_r": lora_r,
        "lora_alpha": lora_alpha,
        "lora_dropout": lora_dropout,
        "training_args": dict(training_args or {}),
    }
    if torch_dtype:
        pass_config["torch_dtype"] = torch_dtype
    modules = split_list(target_modules)
    if modules:
        pass_config["target_modules"] = fused_target_modules(modules, model_name_or_path)
    data_configs = [train]
    if eval_split and eval_subset:  # another subset: a data config of its own, as Olive builds it
        ev = json.loads(json.dumps(train))
        ev["name"] = EVAL_DATA
        ev["load_dataset_config"]["split"] = eval_split
        ev["load_dataset_config"]["subset"] = eval_subset
        data_configs.append(ev)
        pass_config["eval_data_config"] = EVAL_DATA
    elif eval_split:
        pass_config["train_split"] = train_split
        pass_config["eval_split"] = eval_split
    return {
        "input_model": input_model(
            model_name_or_path, trust_remote_code=trust_remote_code, task=task, adapter_path=adapter_path
        ),
        "data_configs": data_configs,
        "passes": {"finetune": {"type": FINETUNE_PASSES[method], **pass_config}},
        "engine": _engine(output_path, log_level, ["CPUExecutionProvider"], host, target),
    }


def build_finetune(g: Given, extra: list[str], host: str | None, target: str | None) -> Plan:
    plan = Plan()
    common(g, plan)
    if not g["output_path"]:
        raise FlagError("-o/--output_path is required")
    if not g["data_name"]:
        raise FlagError("-d/--data_name is required")
    model = _model_of(g, plan)
    if model.kind == "onnx":
        raise FlagError(f"-m {g['model_name_or_path']}: finetune trains a Hugging Face model, not an ONNX model")
    if g["batch_size"] is not None:
        plan.notes.append(
            f"--batch_size {g['batch_size']}: accepted, no effect (Olive's data loader batch size; "
            "training batches are --per_device_train_batch_size)"
        )
    if g["input_cols"]:
        plan.notes.append("--input_cols: accepted, no effect (fine-tuning reads the text columns)")
    wf = finetune_workflow(
        model_name_or_path=model.path,
        output_path=g["output_path"],
        method=g.get("method", "lora"),
        data_name=g["data_name"],
        data_files=g["data_files"],
        train_split=g.get("train_split", "train"),
        eval_split=g["eval_split"] or None,
        text_template=g["text_template"],
        text_field=g["text_field"],
        max_seq_len=int(g.get("max_seq_len", 1024)),
        target_modules=g["target_modules"],
        lora_r=int(g.get("lora_r", 64)),
        lora_alpha=float(g.get("lora_alpha", 16)),
        lora_dropout=float(g.get("lora_dropout", 0.05)),
        trust_remote_code=bool(g["trust_remote_code"]),
        task=g["task"],
        log_level=_log_level(g),
        training_args=parse_extra_args(extra),
        host=host,
        target=target,
        torch_dtype=g["torch_dtype"] if g.given("torch_dtype") else None,
        train_subset=g["train_subset"],
        eval_subset=g["eval_subset"],
        use_chat_template=bool(g["use_chat_template"]),
        add_special_tokens=g["add_special_tokens"],
        max_samples=g["max_samples"] if g.given("max_samples") else None,
        adapter_path=model.adapter_path if g["adapter_path"] else None,
        notes=plan.notes,
    )
    if g.given("torch_dtype"):
        plan.notes.append(f"--torch_dtype {g['torch_dtype']}: the dtype a GPU trains in; a CPU trains in float32")
    remote(g, wf, plan)
    plan.workflow = wf
    return plan


# ---- auto-opt / optimize ----------------------------------------------------------------------------------------

DEVICE_PROVIDERS = {"cpu": "CPUExecutionProvider", "gpu": "CUDAExecutionProvider"}
BUILDER_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "DmlExecutionProvider", "WebGpuExecutionProvider")
BUILDER_PRECISIONS = ("int4", "int8", "fp16", "bf16", "fp32")


def _provider(provider: str | None, device: str | None, flag: str = "--provider") -> str:
    device = (device or "cpu").lower()
    if device == "npu" and provider in (None, "CPUExecutionProvider"):
        raise FlagError(f"--device {device!r}: orch builds for cpu or gpu (npu needs a vendor toolchain not present)")
    provider = provider or DEVICE_PROVIDERS.get(device, "CPUExecutionProvider")
    if provider not in BUILDER_PROVIDERS:
        raise FlagError(
            f"{flag} {provider!r}: orch builds models for {', '.join(BUILDER_PROVIDERS)} (NPU, OpenVINO and "
            "TensorRT toolchains are not part of orch)"
        )
    if provider == "CPUExecutionProvider" and device == "gpu":
        provider = "CUDAExecutionProvider"  # Olive's default provider with --device gpu means CUDA
    return provider


def auto_opt_workflow(
    *,
    model_name_or_path: str,
    output_path: str,
    adapter_path: str | None = None,
    device: str = "cpu",
    provider: str | None = None,
    precision: str = "fp32",
    use_model_builder: bool = False,
    use_ort_genai: bool = False,
    use_dynamo_exporter: bool = False,
    trust_remote_code: bool = False,
    task: str | None = None,
    log_level: int = 3,
    host: str | None = None,
    target: str | None = None,
    split_flags: dict[str, Any] | None = None,
    onnx_input: bool = False,
) -> dict[str, Any]:
    """Olive's auto-opt (olive/cli/auto_opt.py): the model builder path (orch's default, and Olive's with
    --use_model_builder), or torch's exporter chain with --use_dynamo_exporter; ExtractAdapters when an adapter
    comes along; SplitModel for --num-splits. An ONNX input is quantized to --precision."""
    flags = split_flags or {}
    for flag in ("--memory", "--cost-model"):
        if flags.get(flag) is not None and flag == "--cost-model":
            raise FlagError(
                f"{flag}: splitting by memory / a cost model is not supported; give the number of parts "
                "(--num-splits N)"
            )
    num_splits = flags.get("--num-splits")
    if num_splits is not None and int(num_splits) < 2:
        raise FlagError(f"--num-splits {num_splits}: give 2 or more parts (or drop the flag)")
    if device.lower() not in ("cpu", "gpu", "npu"):
        raise FlagError(f"--device {device!r}: orch builds for cpu or gpu (npu needs a vendor toolchain not present)")
    if device.lower() == "npu":
        raise FlagError(f"--device {device!r}: orch builds for cpu or gpu (npu needs a vendor toolchain not present)")
    provider = _provider(provider, device)
    if precision in ("nf4", "fp4"):
        raise FlagError(
            f"--precision {precision}: bitsandbytes 4-bit ONNX (OnnxBnb4Quantization) is not supported; "
            "use int4 (MatMulNBits)"
        )
    if precision not in BUILDER_PRECISIONS:
        raise FlagError(f"--precision {precision!r}: the model builder exports int4, int8, fp16, bf16 or fp32")
    passes: dict[str, Any] = {}
    if onnx_input:
        if precision == "int4":
            passes["matmul4"] = {"type": "OnnxBlockWiseRtnQuantization"}
        elif precision == "int8":
            passes["dynamic_quant"] = {"type": "OnnxDynamicQuantization"}
        elif precision != "fp32":
            raise FlagError(f"--precision {precision}: an ONNX input is quantized to int4 or int8 (or kept, fp32)")
        if not passes:
            raise FlagError("-m is an ONNX model and --precision fp32 asks nothing of it: give --precision int4/int8")
    elif use_dynamo_exporter and not use_model_builder:
        # Olive's exporter chain: export fp32 (the adapter unmerged), fuse, quantize, genai metadata, adapters out
        passes["conversion"] = {
            "type": "OnnxConversion",
            "use_dynamo_exporter": True,
            "torch_dtype": "float32",
            "save_metadata_for_token_generation": True,
        }
        passes["transformer_optimizer"] = {
            "type": "OrtTransformersOptimization",
            "opt_level": 0,
            "keep_io_types": False,
            "float16": precision == "fp16" or (precision == "int4" and provider != "CPUExecutionProvider"),
        }
        if precision == "int8":
            passes["dynamic_quant"] = {"type": "OnnxDynamicQuantization"}
        elif precision == "int4":
            passes["matmul4"] = {"type": "OnnxBlockWiseRtnQuantization"}
        passes["genai_config_only"] = {
            "type": "ModelBuilder",
            "metadata_only": True,
            "precision": "fp16" if precision == "fp16" else "fp32",
        }
    else:
        passes["builder"] = {"type": "ModelBuilder", "precision": precision}
    if adapter_path:  # as Olive: the adapter stays separate, model/adapter_weights.onnx_adapter beside the base
        passes["extract_adapters"] = {"type": "ExtractAdapters"}
    if num_splits is not None:  # as Olive's CaptureSplitInfo + SplitModel: embeddings and LM head parts of their own
        passes["split_model"] = {
            "type": "SplitModel",
            "num_splits": int(num_splits),
            "unique_embeds_lm_head_splits": True,
        }
    return {
        "input_model": input_model(
            model_name_or_path, trust_remote_code=trust_remote_code, task=task, adapter_path=adapter_path
        ),
        "passes": passes,
        "workflow_id": command_workflow_id("auto-opt", output_path),
        "engine": _engine(output_path, log_level, [provider], host, target),
    }


def build_auto_opt(g: Given, host: str | None, target: str | None) -> Plan:
    plan = Plan()
    common(g, plan)
    model = _model_of(g, plan)
    if g["use_qdq_encoding"]:
        raise FlagError(
            "--use_qdq_encoding: QDQ encoding (MatMulNBitsToQDQ) is for NPUs and is not supported; "
            "drop it for MatMulNBits"
        )
    if g["memory"] and not g["cost_model"]:
        plan.notes.append(f"--memory {g['memory']}: accepted, no effect (read only to split by a cost model)")
    for name in (
        "dynamic_to_fixed_shape_dim_param",
        "dynamic_to_fixed_shape_dim_value",
        "mixed_precision_overrides_config",
    ):
        if g[name]:
            plan.notes.append(
                f"--{name.replace('_', '-')}: accepted, no effect (Olive applies it for the QNN provider only)"
            )
    if any(g[k] for k in ("data_name", "split", "subset", "input_cols")) or g.given("batch_size"):
        plan.notes.append(
            "--data_name/--split/--subset/--input_cols/--batch_size: accepted, no effect (Olive's "
            "auto-opt builds no evaluator or calibration from them)"
        )
    if g["enable_search"] or g["seed"] is not None:
        plan.notes.append(
            "--enable_search/--seed: accepted, no search: orch runs each pass once with the parameters given"
        )
    if g["use_dynamo_exporter"] and g["use_model_builder"]:
        plan.notes.append("--use_dynamo_exporter: not used: --use_model_builder exports with the model builder")
    wf = auto_opt_workflow(
        model_name_or_path=model.path,
        output_path=g["output_path"] or "auto-opt-output",
        adapter_path=model.adapter_path,
        device=g.get("device", "cpu"),
        provider=g["provider"] if g.given("provider") or g["device"] != "gpu" else None,
        precision=g.get("precision", "fp32"),
        use_model_builder=bool(g["use_model_builder"]),
        use_ort_genai=bool(g["use_ort_genai"]),
        use_dynamo_exporter=bool(g["use_dynamo_exporter"]),
        trust_remote_code=bool(g["trust_remote_code"]),
        task=g["task"],
        log_level=_log_level(g),
        host=host,
        target=target,
        split_flags={"--num-splits": g["num_splits"], "--cost-model": g["cost_model"]},
        onnx_input=model.kind == "onnx",
    )
    kind = adapter_kind(model.adapter_path)
    if kind != "lora":
        wf["passes"] = merge_first(wf["passes"], kind, plan.notes)
    remote(g, wf, plan)
    plan.workflow = wf
    return plan


WIKITEXT2 = {
    "name": "wikitext2_train",
    "type": "HuggingfaceContainer",
    "load_dataset_config": {"data_name": "Salesforce/wikitext", "subset": "wikitext-2-raw-v1", "split": "train"},
    "pre_process_data_config": {
        "strategy": "line-by-line",
        "add_special_tokens": False,
        "max_samples": 128,
        "max_seq_len": 512,
    },
}


def build_optimize(g: Given, host: str | None, target: str | None) -> Plan:
    """Olive's optimize (olive/cli/optimize.py): its pass schedule for the precision and provider asked."""
    plan = Plan()
    common(g, plan)
    model = _model_of(g, plan)
    provider = g.get("provider", "CPUExecutionProvider")
    device = g["device"]
    if g["enable_aot"] or g["qnn_env_path"]:
        raise FlagError("--enable_aot/--qnn_env_path: ahead-of-time compilation is for QNN (NPUs), not supported")
    if g["use_qdq_format"]:
        raise FlagError("--use_qdq_format: QDQ quantization is for NPUs and is not supported; drop it (MatMulNBits)")
    if (
        provider == "CPUExecutionProvider"
        and device in ("gpu", "npu")
        or (provider == "CUDAExecutionProvider" and device in ("cpu", "npu"))
    ):
        raise FlagError(f"--provider {provider} with --device {device}: an invalid combination (as in Olive)")
    provider = _provider(provider, device or ("gpu" if provider == "CUDAExecutionProvider" else "cpu"))
    precision = g.get("precision", "fp32")
    exporter = g["exporter"] or "model_builder"
    if exporter == "optimum_exporter":
        raise FlagError(
            "--exporter optimum_exporter: Optimum's exporter is not used; give model_builder (default) "
            "or dynamo_exporter / torchscript_exporter"
        )
    if precision in ("int8", "uint8", "int16", "uint16") or g["act_precision"]:
        raise FlagError(
            f"--precision {precision}{' --act_precision' if g['act_precision'] else ''}: Olive's "
            "optimize runs static (QDQ) quantization for these, which is for NPUs and not supported; use "
            "int4, fp16 or fp32"
        )
    if precision not in ("int4", "uint4", "fp16", "bf16", "fp32", "int32", "uint32"):
        raise FlagError(f"--precision {precision!r}: optimize exports int4, uint4, fp16, bf16 or fp32")
    if g["memory"] is not None:
        raise FlagError("--memory: splitting by device memory is not supported; give --num_split N")
    if g["dim_param"] or g["dim_value"]:
        plan.notes.append("--dim_param/--dim_value: accepted, no effect (Olive fixes shapes for NPU providers only)")
    passes: dict[str, Any] = {}
    data_configs: list[dict[str, Any]] = []
    hf = model.kind != "onnx"
    int4 = precision in ("int4", "uint4")
    if hf and int4:  # Olive's Gptq before export, calibrated on wikitext-2 as Olive's template says
        gptq: dict[str, Any] = {"type": "Gptq", "bits": 4, "sym": precision == "int4", "data_config": "wikitext2_train"}
        if g["block_size"] is not None:
            gptq["group_size"] = int(g["block_size"])
        passes["gptq"] = gptq
        data_configs.append(json.loads(json.dumps(WIKITEXT2)))
    if hf and g["num_split"] is not None and int(g["num_split"]) < 2:
        raise FlagError(f"--num_split {g['num_split']}: give 2 or more parts (or drop the flag)")
    if hf and exporter == "model_builder":
        mb: dict[str, Any] = {
            "type": "ModelBuilder",
            "precision": "int4" if int4 else ("fp32" if precision in ("int32", "uint32") else precision),
        }
        if int4:
            block = 32 if g["block_size"] in (None, -1) else int(g["block_size"])
            mb["int4_block_size"] = min((16, 32, 64, 128, 256), key=lambda v: abs(v - block))
            mb["int4_accuracy_level"] = 4
            mb["int4_op_types_to_quantize"] = ["MatMul", "Gather"]
            if precision == "uint4":
                mb["int4_is_symmetric"] = False
        if g["extra_mb_options"]:
            mb["extra_options"] = extra_mb_options(g["extra_mb_options"])
        passes["model_builder"] = mb
    elif hf:
        passes["onnx_conversion"] = {
            "type": "OnnxConversion",
            "use_dynamo_exporter": exporter == "dynamo_exporter",
            "save_metadata_for_token_generation": True,
        }
        passes["ort_transformers_optimization"] = {
            "type": "OrtTransformersOptimization",
            "float16": precision == "fp16",
        }
        if int4:
            passes["onnx_blockwise_rtn_quantization"] = {"type": "OnnxBlockWiseRtnQuantization"}
        passes["genai_config"] = {
            "type": "ModelBuilder",
            "metadata_only": True,
            "precision": "fp16" if precision == "fp16" else "fp32",
        }
        plan.notes.append(
            f"--exporter {exporter}: OnnxConversion -> OrtTransformersOptimization (Olive's "
            "OnnxPeepholeOptimizer's fusions are onnxruntime's transformer optimizer's here)"
        )
        if g["extra_mb_options"]:
            plan.notes.append("--extra_mb_options: accepted, no effect (the model builder is not the exporter)")
    else:  # an ONNX model: Olive quantizes int4 blockwise
        if int4:
            rtn: dict[str, Any] = {"type": "OnnxBlockWiseRtnQuantization"}
            if g["block_size"] not in (None, -1):
                rtn["block_size"] = int(g["block_size"])
            passes["onnx_blockwise_rtn_quantization"] = rtn
        elif precision == "fp16":
            passes["ort_transformers_optimization"] = {
                "type": "OrtTransformersOptimization",
                "float16": True,
                "opt_level": 0,
            }
        else:
            raise FlagError(
                f"-m is an ONNX model: optimize quantizes it with --precision int4 (or fp16); "
                f"{precision} asks nothing of it"
            )
    if g["surgeries"]:
        surgeons = [s for item in split_values(g["surgeries"]) or [] for s in item.split(",") if s]
        passes["graph_surgeries"] = {"type": "GraphSurgeries", "surgeries": [{"surgeon": s} for s in surgeons]}
    if hf and g["num_split"] is not None:
        passes["split_model"] = {
            "type": "SplitModel",
            "num_splits": int(g["num_split"]),
            "unique_embeds_lm_head_splits": True,
        }
    if model.adapter_path and hf:
        passes["extract_adapters"] = {"type": "ExtractAdapters"}
        if adapter_kind(model.adapter_path) != "lora":
            passes = merge_first(passes, adapter_kind(model.adapter_path), plan.notes)
    if provider == "WebGpuExecutionProvider":
        plan.notes.append(
            "WebGpuExecutionProvider: the model builder writes fp32 logits itself (Olive's "
            "OnnxIODataTypeConverter has nothing to change)"
        )
    wf = {
        "input_model": input_model(
            model.path, trust_remote_code=bool(g["trust_remote_code"]), task=g["task"], adapter_path=model.adapter_path
        ),
        "data_configs": data_configs,
        "passes": passes,
        "engine": _engine(g["output_path"] or "optimized-model", _log_level(g), [provider], host, target),
    }
    plan.workflow = wf
    return plan


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


# ---- quantize ---------------------------------------------------------------------------------------------------

IMPLEMENTATIONS = (
    "olive",
    "awq",
    "autogptq",
    "gptq",
    "ort",
    "matmul4",
    "inc",
    "inc_dynamic",
    "inc_static",
    "bnb",
    "bnb4",
    "nvmo",
    "quarot",
    "spinquant",
    "aimet",
    "onnx_dynamic",
    "onnx_static",
)
_NOT_RUN = {
    "nvmo": "NVIDIA ModelOpt quantization is not part of orch",
    "aimet": "AIMET quantization is not part of orch",
    "quarot": "rotation-based quantization (QuaRot) is not supported",
    "spinquant": "rotation-based quantization (SpinQuant) is not supported",
    "bnb": "bitsandbytes 4-bit ONNX quantization (OnnxBnb4Quantization) is not supported",
    "bnb4": "bitsandbytes 4-bit ONNX quantization (OnnxBnb4Quantization) is not supported",
    "inc_static": "INC static quantization is not run",
    "onnx_static": "static (QDQ) quantization is for NPUs and is not supported",
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
    implementation: str | None = None,
    adapter_path: str | None = None,
    given: Given | None = None,
    notes: list[str] | None = None,
    onnx_input: bool | None = None,
) -> dict[str, Any]:
    """Olive's quantize: the pass Olive picks for (model kind, algorithm, precision, implementation)."""
    algorithm = algorithm.lower()
    impl = (implementation or "").lower() or None
    notes = notes if notes is not None else []
    if impl is not None and impl not in IMPLEMENTATIONS:
        raise FlagError(f"--implementation {implementation!r}: one of {', '.join(IMPLEMENTATIONS)}")
    if impl in _NOT_RUN or algorithm in ("quarot", "spinquant"):
        raise FlagError(
            f"--implementation {impl or algorithm}: {_NOT_RUN.get(impl or '', _NOT_RUN['quarot'])}; use "
            "--algorithm rtn / gptq / awq (Hugging Face) or rtn / hqq (ONNX)"
        )
    if algorithm in ("kquant", "lpbq", "seqmse", "adaround"):
        raise FlagError(
            f"--algorithm {algorithm}: not supported ({'k-quant mixed' if algorithm == 'kquant' else 'AIMET'}"
            " quantization); use rtn, gptq or awq (Hugging Face), rtn or hqq (ONNX)"
        )
    if algorithm == "static":
        raise FlagError(
            "--algorithm static: static (QDQ) quantization is for NPUs and is not supported; use "
            "dynamic (int8) or rtn (int4)"
        )
    if precision in ("fp8", "fp4", "nf4", "fp16", "bf16", "fp32", "int16", "uint16", "int32", "uint32"):
        raise FlagError(
            f"--precision {precision!r}: orch quantizes weights to int4/uint4 (rtn, awq, gptq, hqq) or int8/uint8 "
            "(rtn, dynamic); fp8/nf4 need GPU toolchains orch does not ship"
        )
    bits = 8 if precision in ("int8", "uint8") else 4
    model_path = Path(model_folder(model_name_or_path))
    is_onnx = (
        onnx_input
        if onnx_input is not None
        else (model_path.suffix == ".onnx" or (model_path.is_dir() and any(model_path.glob("*.onnx"))))
    )
    g = given or Given(
        {"data_name": data_name, "data_files": data_files, "text_template": text_template, "text_field": text_field}
    )
    data_configs: list[dict[str, Any]] = []
    plan = Plan(notes=notes)

    def calibration() -> str | None:
        if not g["data_name"]:
            return None
        dc = data_config(g, "calibration", split=g["split"], subset=g["subset"], plan=plan, what="calibration")
        data_configs.append(dc)
        return "calibration"

    if algorithm in ("awq", "gptq") and not is_onnx:
        if impl in ("inc", "inc_dynamic", "ort", "matmul4"):
            raise FlagError(f"--implementation {impl}: quantizes ONNX models; -m is a Hugging Face model")
        data = calibration()
        # without --data_name, as Olive: the pass's own default calibration set (a hub data set)
        if algorithm == "awq":
            pass_cfg: dict[str, Any] = {"type": "AutoAWQQuantizer", "bits": bits}
        elif impl in ("autogptq", "gptq"):
            pass_cfg = {"type": "GptqQuantizer", "bits": bits}
        else:  # Olive >= 0.10's default implementation: its own Gptq
            pass_cfg = {"type": "Gptq", "bits": bits, "sym": precision.startswith("int")}
        if data:
            pass_cfg["data_config"] = data
        if g.given("max_seq_len"):
            pass_cfg["max_seq_len"] = int(g["max_seq_len"])
        if g.given("max_samples") and g["max_samples"]:
            pass_cfg["num_calibration_samples"] = int(g["max_samples"])
    elif algorithm in ("awq", "gptq"):
        raise FlagError(
            f"--algorithm {algorithm} on an ONNX model: calibrated ONNX GPTQ/AWQ is not run; quantize the "
            f"Hugging Face model (-m its folder) with --algorithm {algorithm}, then export it (auto-opt)"
        )
    elif algorithm == "rtn" and not is_onnx:
        if impl in ("ort", "matmul4", "inc", "inc_dynamic"):
            raise FlagError(
                f"--implementation {impl}: quantizes ONNX models; -m is a Hugging Face model (export it "
                "first: orch auto-opt --precision fp32)"
            )
        pass_cfg = {"type": "Rtn", "bits": bits, "sym": precision.startswith("int")}
    elif algorithm == "hqq" and not is_onnx:
        raise FlagError(
            "--algorithm hqq: HQQ quantizes ONNX models (OnnxHqqQuantization); export first "
            "(orch auto-opt --precision fp32) and quantize that folder"
        )
    elif algorithm == "hqq":
        if bits != 4:
            raise FlagError(f"--precision {precision}: HQQ writes int4")
        pass_cfg = {"type": "OnnxHqqQuantization"}
    elif impl in ("inc", "inc_dynamic"):
        if bits == 4:
            raise FlagError(
                "--implementation inc --precision int4: INC weight-only int4 is not run; use "
                "--algorithm rtn (MatMulNBits) or --precision int8"
            )
        pass_cfg = {"type": "IncDynamicQuantization"}
    elif algorithm == "dynamic" or impl in ("ort", "onnx_dynamic") and bits == 8:
        if (model_path / "genai_config.json").is_file():
            raise FlagError(
                "dynamic int8 quantization works on plain ONNX graphs, and -m is an onnxruntime-genai "
                "model (fused by the model builder): use --algorithm rtn --precision int8 (weight-only "
                "8-bit MatMulNBits), or auto-opt --precision int8"
            )
        pass_cfg = {"type": "OnnxDynamicQuantization", "weight_type": "QUInt8" if precision == "uint8" else "QInt8"}
    else:  # rtn, ONNX: weight-only MatMulNBits blocks (4 or 8 bits), which onnxruntime-genai runs
        pass_cfg = {"type": "OnnxBlockWiseRtnQuantization", "block_size": 32, "bits": bits}
        if precision.startswith("uint"):
            pass_cfg["is_symmetric"] = False
    if pass_cfg["type"] not in ("AutoAWQQuantizer", "GptqQuantizer", "Gptq") and g["data_name"]:
        notes.append(f"--data_name: accepted, no effect ({pass_cfg['type']} needs no calibration data)")
    return {
        "input_model": input_model(
            model_name_or_path, trust_remote_code=trust_remote_code, task=None, adapter_path=adapter_path
        ),
        "data_configs": data_configs,
        "passes": {"quantize": pass_cfg},
        "workflow_id": command_workflow_id("quantize", output_path),
        "engine": _engine(output_path, log_level, ["CPUExecutionProvider"], host, host),
    }


def build_quantize(g: Given, host: str | None) -> Plan:
    plan = Plan()
    common(g, plan)
    model = _model_of(g, plan)
    if g["use_qdq_encoding"]:
        raise FlagError(
            "--use_qdq_encoding: QDQ encoding (MatMulNBitsToQDQ) is for NPUs and is not supported; drop "
            "it for MatMulNBits"
        )
    if g["quarot_rotate"]:
        raise FlagError("--quarot_rotate: QuaRot rotation is not supported; drop it")
    if g["act_precision"]:
        plan.notes.append(
            f"--act_precision {g['act_precision']}: accepted, no effect (activations are quantized "
            "only by static quantization, which is not run)"
        )
    if g.given("batch_size"):
        plan.notes.append(
            f"--batch_size {g['batch_size']}: accepted, no effect (calibration runs one sequence at a time)"
        )
    if model.adapter_path:
        raise FlagError(
            "-a/--adapter_path: quantize the merged model (MergeAdapterWeights, or finetune's model/) "
            "or quantize the ONNX model auto-opt built with the adapter (its LoRA inputs stay float)"
        )
    precision = g["precision"] or "int4"
    wf = quantize_workflow(
        model_name_or_path=model.path,
        output_path=g["output_path"] or "quantized-model",
        algorithm=g.get("algorithm", "rtn"),
        precision=precision,
        trust_remote_code=bool(g["trust_remote_code"]),
        log_level=_log_level(g),
        host=host,
        implementation=g["implementation"],
        given=g,
        notes=plan.notes,
        onnx_input=model.kind == "onnx",
    )
    remote(g, wf, plan)
    plan.workflow = wf
    return plan


# ---- capture-onnx-graph -----------------------------------------------------------------------------------------


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
    use_ort_genai: bool = False,
    conversion_device: str = "cpu",
    builder_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Olive's capture-onnx-graph: torch's exporter (OnnxConversion; an adapter stays unmerged, as Olive exports it,
    so generate-adapter can lift it out), + genai metadata with --use_ort_genai; or the model builder."""
    passes: dict[str, Any] = {}
    providers = ["CPUExecutionProvider"]
    if use_model_builder:
        passes["builder"] = {"type": "ModelBuilder", "precision": precision, **(builder_options or {})}
        if precision in ("fp16", "bf16"):
            providers = ["CUDAExecutionProvider"]  # Olive builds fp16/bf16 for CUDA (the CPU EP has no fp16 kernels)
    else:
        if torch_dtype not in (None, "float32", "float16"):
            raise FlagError(f"--torch_dtype {torch_dtype!r}: torch's exporter here writes float32 or float16")
        passes["conversion"] = {
            "type": "OnnxConversion",
            "use_dynamo_exporter": use_dynamo_exporter,
            "target_opset": target_opset,
            "save_metadata_for_token_generation": True,
            "device": "cuda" if conversion_device == "gpu" else "cpu",
            **({"torch_dtype": torch_dtype} if torch_dtype else {}),
        }
        if use_ort_genai:
            passes["genai_config"] = {
                "type": "ModelBuilder",
                "metadata_only": True,
                "precision": "fp16" if torch_dtype == "float16" else "fp32",
            }
    return {
        "input_model": input_model(
            model_name_or_path, trust_remote_code=trust_remote_code, task=None, adapter_path=adapter_path
        ),
        "passes": passes,
        "engine": _engine(output_path, log_level, providers, host, host),
    }


def build_capture(g: Given, host: str | None) -> Plan:
    plan = Plan()
    common(g, plan)
    model = _model_of(g, plan)
    if model.kind == "onnx":
        raise FlagError(
            f"-m {g['model_name_or_path']}: already an ONNX model; capture-onnx-graph exports Hugging Face models"
        )
    if g["use_mobius_builder"]:
        raise FlagError("--use_mobius_builder: MobiusBuilder (mobius-ai) is not part of orch; use --use_model_builder")
    if g["fixed_param_dict"]:
        raise FlagError(
            "--fixed_param_dict: fixing dynamic dimensions (DynamicToFixedShape) is for NPUs and is not "
            "supported; onnxruntime-genai runs the dynamic graph"
        )
    builder: dict[str, Any] = {}
    mb_flags = (
        "int4_block_size",
        "int4_accuracy_level",
        "exclude_embeds",
        "exclude_lm_head",
        "enable_cuda_graph",
        "extra_mb_options",
    )
    if g["use_model_builder"]:
        if g["int4_block_size"] is not None:
            builder["int4_block_size"] = int(g["int4_block_size"])
        if g["int4_accuracy_level"] is not None:
            builder["int4_accuracy_level"] = int(g["int4_accuracy_level"])
        extra = extra_mb_options(g["extra_mb_options"]) if g["extra_mb_options"] else {}
        for key in ("exclude_embeds", "exclude_lm_head", "enable_cuda_graph"):
            if g[key] is not None:
                extra[key] = parse_bool(f"--{key}", g[key])
        if extra:
            builder["extra_options"] = extra
        for key in ("torch_dtype", "use_dynamo_exporter"):
            if g[key]:
                plan.notes.append(
                    f"--{key}: accepted, no effect (torch's exporter option; --use_model_builder "
                    "exports with the model builder)"
                )
    else:
        given = [f"--{k}" for k in mb_flags if g[k] is not None]
        if g.given("precision"):
            given.insert(0, "--precision")
        if given:
            plan.notes.append(
                f"{', '.join(given)}: accepted, no effect (model builder options; add "
                "--use_model_builder to export with it)"
            )
        if model.adapter_path:
            plan.notes.append(
                "the adapter is exported unmerged (its LoRA MatMuls beside each projection), as Olive "
                "does: `orch generate-adapter -m <this output>` lifts it out"
            )
    if g["use_dynamo_exporter"] and g.given("past_key_value_name"):
        plan.notes.append(
            f"--past_key_value_name {g['past_key_value_name']}: accepted (the exporter names the KV "
            "inputs past_key_values.N.key/value, as onnxruntime-genai reads them)"
        )
    wf = capture_onnx_graph_workflow(
        model_name_or_path=model.path,
        output_path=g["output_path"] or "onnx-model",
        adapter_path=model.adapter_path,
        use_model_builder=bool(g["use_model_builder"]),
        use_dynamo_exporter=bool(g["use_dynamo_exporter"]),
        precision=g.get("precision", "fp16"),
        torch_dtype=g["torch_dtype"],
        target_opset=int(g.get("target_opset", 17)),
        trust_remote_code=bool(g["trust_remote_code"]),
        log_level=_log_level(g),
        host=host,
        use_ort_genai=bool(g["use_ort_genai"]),
        conversion_device=g.get("conversion_device", "cpu"),
        builder_options=builder,
    )
    kind = adapter_kind(model.adapter_path)
    if kind != "lora" and g["use_model_builder"]:
        wf["passes"] = merge_first(wf["passes"], kind, plan.notes)
    elif kind != "lora":  # torch's exporter takes any PEFT adapter: merged, its weights are in the graph
        wf["passes"]["conversion"]["merge_adapter_weights"] = True
        plan.notes.append(
            f"the {kind.upper()} adapter is merged into the exported graph (onnxruntime-genai's "
            "adapters are LoRA A/B pairs: generate-adapter cannot lift it out)"
        )
    remote(g, wf, plan)
    plan.workflow = wf
    return plan


# ---- adapters ---------------------------------------------------------------------------------------------------

ADAPTER_FORMATS = {"onnx_adapter": "onnx_adapter", "numpy": "numpy", "safetensors": "safetensors"}


def _adapter_format(value: str, flag: str) -> str:
    if value == "pt":
        raise FlagError(f"{flag} pt: torch pickles are not written; use onnx_adapter, numpy or safetensors")
    if value not in ADAPTER_FORMATS:
        raise FlagError(f"{flag} {value!r}: use onnx_adapter, numpy or safetensors")
    return ADAPTER_FORMATS[value]


def generate_adapter_workflow(
    *,
    model_name_or_path: str,
    adapter_path: str | None,
    output_path: str,
    adapter_format: str = "onnx_adapter",
    precision: str = "int4",
    provider: str = "CPUExecutionProvider",
    trust_remote_code: bool = False,
    log_level: int = 3,
    host: str | None = None,
    onnx_input: bool = False,
) -> dict[str, Any]:
    """Olive's generate-adapter: an ONNX model with LoRA weights -> inputs + the adapter weights file
    (ExtractAdapters). A Hugging Face base with an adapter is built first (ModelBuilder from the adapter)."""
    fmt = _adapter_format(adapter_format, "--adapter_format")
    passes: dict[str, Any] = {}
    if not onnx_input:
        if not adapter_path:
            raise FlagError(
                "-m is a Hugging Face model without an adapter: give --adapter_path (orch builds the ONNX model from "
                "the base + the adapter), or -m an ONNX model exported with its adapter (capture-onnx-graph)"
            )
        passes["builder"] = {"type": "ModelBuilder", "precision": precision}
    passes["extract_adapters"] = {"type": "ExtractAdapters", "save_format": fmt}
    return {
        "input_model": input_model(
            model_name_or_path,
            trust_remote_code=trust_remote_code,
            task=None,
            adapter_path=None if onnx_input else adapter_path,
        ),
        "passes": passes,
        "engine": _engine(output_path, log_level, [provider], host, host),
    }


def build_generate_adapter(g: Given, host: str | None) -> Plan:
    plan = Plan()
    common(g, plan)
    model = resolve_model(g["model_name_or_path"], g["adapter_path"])
    adapter_type = g.get("adapter_type", "lora").lower()
    if adapter_type != "lora":
        raise FlagError(
            f"--adapter_type {adapter_type}: onnxruntime-genai takes LoRA A/B pairs as adapter inputs; a "
            f"{adapter_type.upper()} adapter has no such form: merge it into the model "
            "(MergeAdapterWeights) and export the merged model"
        )
    kind = adapter_kind(model.adapter_path)
    if model.kind != "onnx" and kind != "lora":
        raise FlagError(
            f"--adapter_path: a {kind.upper()} adapter has no onnxruntime-genai adapter form (LoRA A/B "
            "pairs); merge it and export the merged model: orch auto-opt -m BASE --adapter_path ADAPTER"
        )
    if model.kind == "onnx" and g["adapter_path"]:
        plan.notes.append("--adapter_path: not used: -m is already an ONNX model exported with its adapter")
    plan.workflow = generate_adapter_workflow(
        model_name_or_path=model.path,
        adapter_path=model.adapter_path,
        output_path=g["output_path"] or "optimized-model",
        adapter_format=g.get("adapter_format", "onnx_adapter"),
        precision=g.get("precision", "int4"),
        trust_remote_code=bool(g["trust_remote_code"]),
        log_level=_log_level(g),
        host=host,
        onnx_input=model.kind == "onnx",
    )
    remote(g, plan.workflow, plan)
    return plan


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
    fmt = _adapter_format(adapter_format, "--adapter_format")
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
    suffix = {"numpy": ".npz", "safetensors": ".safetensors"}.get(fmt, ".onnx_adapter")
    if out.suffix != suffix:
        out = out.with_name(out.name + suffix)
    return save_adapter(weights, out)


def build_convert_adapters(g: Given) -> Plan:
    plan = Plan()
    if not g["quantize_int4"] and (g.given("int4_block_size") or g.given("int4_quantization_mode")):
        plan.notes.append("--int4_block_size/--int4_quantization_mode: accepted, no effect (only with --quantize_int4)")
    out = convert_adapters(
        adapter_path=g["adapter_path"],
        output_path=g["output_path"],
        adapter_format=g.get("adapter_format", "onnx_adapter"),
        dtype=g.get("dtype", "float32"),
        model_name_or_path=g["model_name_or_path"],
        quantize_int4=bool(g["quantize_int4"]),
    )
    plan.message = f"adapter weights written to {out}"
    return plan


def build_extract_adapters(g: Given) -> Plan:
    """Olive's extract-adapters: each PEFT LoRA folder under -m -> <output_path>/<name>.<format>."""
    plan = Plan()
    common(g, plan)
    if g["test"]:
        plan.notes.append("--test: accepted, no effect (the adapters' weights are read as they are)")
    if g["cache_dir"] or g["task"]:
        plan.notes.append("--cache_dir/--task: accepted, no effect (local adapter folders are read directly)")
    root = Path(g["model_name_or_path"])
    if not root.exists():
        raise FlagError(f"-m {root}: not found (give a local PEFT adapter folder, or a folder of them)")
    found = sorted({p.parent for p in root.rglob("adapter_config.json")})
    if not found:
        raise FlagError(
            f"-m {root}: no PEFT adapter (adapter_config.json) under it; orch extracts PEFT LoRA "
            "adapters (models whose LoRA weights are built into the checkpoint are not read)"
        )
    fmt = g.get("format", "onnx_adapter")
    written = []
    for folder in found:
        name = folder.name if folder != root else root.name
        out = convert_adapters(
            adapter_path=str(folder),
            output_path=str(Path(g["output_path"] or "adapters") / name),
            adapter_format=fmt,
            dtype=g.get("dtype", "float32"),
        )
        written.append(str(out))
    plan.message = f"{len(written)} adapter(s) written: {', '.join(written)}"
    return plan


# ---- tune-session-params ----------------------------------------------------------------------------------------


def tune_session_params_workflow(args: argparse.Namespace | Given, host: str | None = None) -> dict[str, Any]:
    """The workflow Olive's tune-session-params runs: one OrtSessionParamsTuning pass over dummy inputs of the
    graph (a prompt, or one token with a KV cache under --predict_with_kv_cache)."""
    get = args.get if isinstance(args, Given) else (lambda k, d=None: getattr(args, k, d))
    device = get("device", "cpu") or "cpu"
    providers = get("providers_list") or get("providers")
    if isinstance(providers, str):
        providers = split_values(providers)
    providers = providers or [DEVICE_PROVIDERS.get(device, "CPUExecutionProvider")]
    providers = [p if p.endswith("ExecutionProvider") else f"{p}ExecutionProvider" for p in providers]

    def ints(key: str) -> list[int] | None:
        value = get(key)
        if value is None:
            return None
        items = split_values(value) if isinstance(value, str) else value
        try:
            return [int(v) for v in items]
        except ValueError:
            raise FlagError(
                f"tune-session-params: argument --{key}: invalid int value: "
                f"{next(v for v in items if not str(v).lstrip('-').isdigit())!r}"
            ) from None

    tuning: dict[str, Any] = {}
    for key in ("execution_mode_list", "opt_level_list", "intra_thread_num_list", "inter_thread_num_list"):
        if ints(key) is not None:
            tuning[key] = ints(key)
    for key in ("cpu_cores", "io_bind", "enable_cuda_graph", "trt_fp16_enable", "enable_profiling"):
        if get(key) not in (None, False):
            tuning[key] = get(key)
    if get("extra_session_config"):
        extra = get("extra_session_config")
        try:
            tuning["extra_session_config"] = json.loads(extra) if isinstance(extra, str) else extra
        except ValueError:
            raise FlagError(f'--extra_session_config {extra!r}: not JSON (give \'{{"key": "value"}}\')') from None
    container = (
        "TransformersTokenDummyDataContainer"
        if get("predict_with_kv_cache")
        else ("TransformersPromptDummyDataContainer")
    )
    return {
        "input_model": input_model(get("model_name_or_path"), trust_remote_code=False, task=None),
        "data_configs": [{"name": "session_params_tuning_data", "type": container}],
        "passes": {
            "session_params_tuning": {
                "type": "OrtSessionParamsTuning",
                "data_config": "session_params_tuning_data",
                "providers_list": providers,
                "force_evaluate_other_eps": not get("disable_force_evaluate_other_eps"),
                **tuning,
            }
        },
        "engine": _engine(
            get("output_path") or "tuned-inference-settings", int(get("log_level", 3) or 3), providers, host, host
        ),
    }


def accelerator_key(device: str, provider: str) -> str:
    """Olive's name for an accelerator spec, which its tune-session-params output file is named by: cpu-cpu."""
    return f"{device}-{provider.removesuffix('ExecutionProvider').lower()}"


def build_tune_session_params(g: Given, host: str | None) -> Plan:
    plan = Plan()
    common(g, plan)
    model = resolve_model(g["model_name_or_path"])
    if model.kind != "onnx":
        raise FlagError(f"-m {g['model_name_or_path']}: tune-session-params times an ONNX model (export it first)")
    if g["memory"]:
        plan.notes.append(f"--memory {g['memory']}: accepted, no effect (read only to split by a cost model)")
    values = dict(g.values, model_name_or_path=model.path)
    plan.workflow = tune_session_params_workflow(Given(values, g.explicit), host=host)
    remote(g, plan.workflow, plan)
    device = g.get("device", "cpu")
    output = g["output_path"] or "tuned-inference-settings"

    def write_settings(summary: Any) -> None:
        from orchestrator.core.job import atomic_write_text
        from orchestrator.passes.common.onnx_tools import SETTINGS_FILE

        if summary is None or summary.final_model is None:
            return
        settings = json.loads((Path(summary.final_model.path) / SETTINGS_FILE).read_text())
        dest = Path(output) / f"{accelerator_key(device, settings['execution_provider'][0])}.json"
        atomic_write_text(dest, json.dumps(settings, indent=4) + "\n")
        plan.message = f"Inference session parameters are saved to {dest}"

    plan.after = write_settings
    return plan


# ---- run-pass ---------------------------------------------------------------------------------------------------


def build_run_pass(g: Given, host: str | None) -> Plan:
    """Olive's run-pass: one pass of --pass-name with --pass-config on -m."""
    from orchestrator.passes.registry import PASSES, UNSUPPORTED

    plan = Plan()
    common(g, plan)
    if g["list_passes"]:
        lines = [f"{name}" for name in sorted(PASSES)]
        lines += [f"{name} (not run: {why})" for name, why in sorted(UNSUPPORTED.items())]
        plan.message = "passes orch runs:\n  " + "\n  ".join(lines)
        return plan
    if not g["pass_name"]:
        raise FlagError("--pass-name is required (or --list-passes)")
    config: dict[str, Any] = {}
    if g["pass_config"]:
        try:
            config = json.loads(g["pass_config"])
        except ValueError:
            raise FlagError(
                f'--pass-config {g["pass_config"]!r}: not JSON (e.g. \'{{"precision": "int4"}}\')'
            ) from None
        if not isinstance(config, dict):
            raise FlagError("--pass-config: give a JSON object of the pass's settings")
    model = _model_of(g, plan)
    provider = _provider(g["provider"], g["device"])
    plan.workflow = {
        "input_model": input_model(
            model.path, trust_remote_code=bool(g["trust_remote_code"]), task=g["task"], adapter_path=model.adapter_path
        ),
        "passes": {g["pass_name"]: {"type": g["pass_name"], **config}},
        "engine": _engine(g["output_path"] or "run-pass-output", _log_level(g), [provider], host, host),
    }
    return plan


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


def given_from(command: F.Command, values: dict[str, Any]) -> Given:
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
        raise FlagError(
            "--model_script: PyTorch model-loader scripts (_model_loader) are not run by orch: give a "
            "Hugging Face model folder or hub id, or an ONNX model, as -m"
        )
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
