"""Olive's finetune -> a workflow of one LoRA-family pass on a HuggingfaceContainer.

Flags that Olive forwards to transformers' TrainingArguments (any `--name value` that finetune does not know) are
collected into the pass's training_args; Phi-3-family target modules are mapped to their fused projections.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.olive.flag_parsing import Given
from orchestrator.olive.model_ref import _model_of, input_model
from orchestrator.olive.plan import (
    FlagError,
    Plan,
    _engine,
    _log_level,
    common,
    data_config,
    parse_extra_args,
    remote,
    split_list,
)

FINETUNE_DATA = "train_data"
EVAL_DATA = "eval_data"


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
