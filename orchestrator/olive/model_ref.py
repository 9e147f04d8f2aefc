"""-m / -a as Olive's commands read them: a hub id, an earlier command's output folder, an ONNX model or a
Hugging Face folder -> the workflow's input_model; --test's random 2-layer copy; an adapter's kind.

Every command that takes a model shares these; kept apart from plan.py so the model-reading rules are one place.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.olive.flag_parsing import Given
from orchestrator.olive.plan import FlagError, Plan


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


def _model_of(g: Given, plan: Plan) -> ModelRef:
    if not g["model_name_or_path"]:
        raise FlagError("-m/--model_name_or_path is required")
    model = resolve_model(g["model_name_or_path"], g["adapter_path"])
    return test_model(g, model, plan, default_root=g["output_path"])
