"""One pass entry's Olive keys that orch's pass config does not declare: ONNX external-data options, keys a pass
renamed or moved (into onnxruntime's extra_options), keys that change nothing here, refusals; and the per-pass run
keys (RunPassConfig's evaluator / host / clean_run_cache / output_name). The reader calls these per pass, with the
fields the pass's Config declares; unknown keys stay for the pass's own check.
"""

from __future__ import annotations

from typing import Any

# Olive's external-data options (get_external_data_config) on every ONNX pass
EXTERNAL_DATA = (
    "save_as_external_data",
    "all_tensors_to_one_file",
    "external_data_name",
    "size_threshold",
    "convert_attribute",
)
_ONE_FILE = "orch writes an ONNX model's weights to one <model>.onnx.data beside it"
# Keys of Olive's passes that orch's pass configs do not declare: (note | rename | refuse, text / new name)
PASS_KEYS: dict[str, dict[str, tuple[str, str]]] = {
    "OnnxConversion": {
        "past_key_value_name": (
            "note",
            "the exporter names the KV cache inputs past_key_values.N.key/value, as onnxruntime-genai reads them",
        ),
        "parallel_jobs": ("note", "one export job (the decoder is one graph)"),
        "optimize": ("note", "graph optimization is its own pass here (OrtTransformersOptimization / ModelBuilder)"),
        "dynamic": ("note", "the decoder is exported with dynamic batch and sequence axes"),
    },
    "OptimumConversion": {
        "components": (
            "note",
            "one decoder graph serves the prompt and the cached steps (what OptimumMerging makes of Optimum's two)",
        ),
        "extra_args": ("note", "Optimum's exporter arguments; orch exports with torch.onnx"),
        "device": ("note", "exported on the CPU; the graph does not depend on the device"),
    },
    "SplitModel": {
        "split_assignments": (
            "refuse",
            "explicit layer assignments are not read; give num_splits (the "
            "layers are cut into equal groups) or a CaptureSplitInfo pass",
        )
    },
    "GraphSurgeries": {"remove_duplicate_initializers": ("note", "the surgeries here create no duplicates")},
    "SelectiveMixedPrecision": {
        "kld_memory_mode": ("note", "orch computes the KLD gradients on CPU in one mode"),
    },
    "OrtSessionParamsTuning": {
        "execution_providers_list": ("rename", "providers_list"),
        "provider_options_list": ("note", "each provider is tried with its default options"),
        "device": ("note", "the device follows the providers listed"),
    },
    "OrtPerfTuning": {"execution_providers_list": ("rename", "providers_list")},
    "QLoRA": {
        "save_quant_config": (
            "note",
            "the adapter is saved beside the unquantized base (orch's QLoRA output "
            "points at it); no 4-bit quantization config is written",
        )
    },
    "OnnxDynamicQuantization": {
        "quant_mode": ("note", "dynamic quantization (the pass's only mode)"),
        "quant_preprocess": (
            "note",
            "onnxruntime's shape-inference preprocessing is not needed for dynamic MatMul quantization",
        ),
    },
}
# onnxruntime quantizer extra options Olive lets a config give at the top level of the pass
ORT_EXTRA_OPTIONS = (
    "ActivationSymmetric",
    "WeightSymmetric",
    "EnableSubgraph",
    "ForceQuantizeNoInputCheck",
    "MatMulConstBOnly",
    "AddQDQPairToWeight",
    "OpTypesToExcludeOutputQuantization",
    "DedicatedQDQPair",
    "QDQOpTypePerChannelSupportToAxis",
    "CalibTensorRangeSymmetric",
    "CalibMovingAverage",
    "CalibMovingAverageConstant",
    "SmoothQuant",
    "SmoothQuantAlpha",
    "SmoothQuantFolding",
)


def pass_keys(type_name: str, cfg: dict[str, Any], where: tuple[Any, ...], fields: set[str], reader: Any) -> None:
    """Olive's keys a pass config may carry that orch's pass does not declare, in place: noted and dropped,
    renamed, moved into extra_options, or refused with what to use. Unknown keys stay for the pass's own check."""
    prefix = ".".join(str(p) for p in where)
    dropped = [k for k in EXTERNAL_DATA if k in cfg and k not in fields]
    if dropped:
        for k in dropped:
            cfg.pop(k)
        reader.notes.append(f"{prefix}: {', '.join(dropped)}: accepted, no effect ({_ONE_FILE})")
    if type_name == "OnnxDynamicQuantization":
        moved = {k: cfg.pop(k) for k in ORT_EXTRA_OPTIONS if k in cfg}
        if moved:
            extra = cfg.setdefault("extra_options", {})
            if isinstance(extra, dict):
                extra.update(moved)
                reader.notes.append(f"{prefix}: {', '.join(moved)} passed to onnxruntime's quantizer (extra_options)")
        precision = cfg.pop("precision", None) if "precision" not in fields else None
        if precision is not None:
            if precision not in ("int8", "uint8"):
                reader.problem([*where, "precision"], f"{precision!r}: dynamic quantization writes int8 or uint8")
            else:
                cfg.setdefault("weight_type", "QUInt8" if precision == "uint8" else "QInt8")
    if type_name == "OptimumConversion":
        reader.notes.append(f"{prefix}: OptimumConversion exported by torch.onnx as OnnxConversion does (the same "
                            "decoder graph with its KV cache, checked against transformers)")  # fmt: skip
        fp16 = cfg.pop("fp16", None) if "fp16" not in fields else None
        if fp16:
            cfg.setdefault("torch_dtype", "float16")
            reader.notes.append(f"{prefix}.fp16: read as torch_dtype float16")
    for key, (action, text) in PASS_KEYS.get(type_name, {}).items():
        if key not in cfg or key in fields:
            continue
        if action == "rename":
            value = cfg.pop(key)
            if text in cfg and cfg[text] != value:
                reader.problem([*where, key], f"also given as {text}; keep one")
            cfg.setdefault(text, value)
            reader.notes.append(f"{prefix}.{key}: read as {text} (its later name)")
        elif action == "note":
            cfg.pop(key)
            reader.notes.append(f"{prefix}.{key}: accepted, no effect ({text})")
        else:
            reader.problem([*where, key], text)
            cfg.pop(key)


def pass_run_keys(entry: dict[str, Any], where: tuple[Any, ...], raw: dict[str, Any], reader: Any) -> None:
    """Olive's per-pass `evaluator` / `host` (RunPassConfig): orch runs every pass on the engine's host and
    evaluates the final model with the engine's evaluator."""
    prefix = ".".join(str(p) for p in where)
    if entry.get("evaluator") is not None:
        reader.notes.append(
            f"{prefix}.evaluator: accepted, not run per pass (orch evaluates the final model with engine.evaluator)"
        )
    host = entry.get("host")
    if host is not None:
        engine = raw.get("engine") if isinstance(raw.get("engine"), dict) else {}
        if host != engine.get("host", "local"):
            reader.problem(
                [*where, "host"],
                f"{host!r}: per-pass hosts are not supported; orch runs every pass on "
                "engine.host (set it there, or split the workflow)",
            )
    for key in ("clean_run_cache", "output_name"):
        if entry.get(key) is not None:
            reader.notes.append(
                f"{prefix}.{key}: accepted, no effect (each pass's output is cached by content; "
                "the final model is output_dir/model)"
            )
