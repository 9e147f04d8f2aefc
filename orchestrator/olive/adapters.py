"""Olive's adapter commands: generate-adapter (a workflow that lifts LoRA weights out of an ONNX model),
convert-adapters and extract-adapters (PEFT folders -> adapter weight files, written here without a workflow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.olive.flag_parsing import Given
from orchestrator.olive.model_ref import adapter_kind, input_model, resolve_model
from orchestrator.olive.plan import FlagError, Plan, _engine, _log_level, common, remote

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
