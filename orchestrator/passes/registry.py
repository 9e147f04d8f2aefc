"""Pass type name -> lazy import path. Olive's type names are the keys, so Olive workflow files run as-is.

An explicit table (not __init_subclass__ registration) so that a pass is found before its module is imported,
and `orch --help` / config validation never import torch or onnxruntime.
"""

from __future__ import annotations

import difflib
import importlib

from orchestrator.passes.base import Pass

PASSES: dict[str, str] = {
    "LoRA": "orchestrator.passes.training.lora.train:LoRAPass",
    "QLoRA": "orchestrator.passes.training.lora.train:QLoRAPass",
    "MergeAdapterWeights": "orchestrator.passes.training.merge:MergeAdapterWeightsPass",
    "ModelBuilder": "orchestrator.passes.onnx.model_builder:ModelBuilderPass",
    "OnnxMatMul4Quantizer": "orchestrator.passes.quantization.quantize:MatMulNBitsQuantizePass",
    "OnnxBlockWiseRtnQuantization": "orchestrator.passes.quantization.quantize:MatMulNBitsQuantizePass",
    "Evaluate": "orchestrator.passes.evaluation.evaluate:EvaluatePass",
    "GptqQuantizer": "orchestrator.passes.quantization.awq_gptq:GptqQuantizerPass",
    "AutoAWQQuantizer": "orchestrator.passes.quantization.awq_gptq:AutoAWQQuantizerPass",
    # Olive >= 0.10's Gptq writes the Olive quantized checkpoint (per-layer bits); GptqQuantizer stays llm-compressor
    "Gptq": "orchestrator.passes.quantization.olive_gptq:OliveGptqPass",
    "SelectiveMixedPrecision": "orchestrator.passes.quantization.mixed_precision:SelectiveMixedPrecisionPass",
    "Rtn": "orchestrator.passes.quantization.rtn:RtnPass",
    "GraphSurgeries": "orchestrator.passes.onnx.graph_surgeries:GraphSurgeriesPass",
    "OnnxHqqQuantization": "orchestrator.passes.quantization.onnx_hqq:OnnxHqqQuantizationPass",
    "OnnxConversion": "orchestrator.passes.onnx.onnx_conversion:OnnxConversionPass",
    "OrtTransformersOptimization": "orchestrator.passes.onnx.ort_optimize:OrtTransformersOptimizationPass",
    "OnnxDynamicQuantization": "orchestrator.passes.quantization.onnx_dynamic_quant:OnnxDynamicQuantizationPass",
    "ExtractAdapters": "orchestrator.passes.onnx.extract_adapters:ExtractAdaptersPass",
    "SplitModel": "orchestrator.passes.onnx.split_model:SplitModelPass",  # CaptureSplitInfo's num_splits read into it
    "IncDynamicQuantization": "orchestrator.passes.quantization.inc_quantize:IncDynamicQuantizationPass",  # cpu-inc
    "OrtSessionParamsTuning": "orchestrator.passes.evaluation.session_tuning:OrtSessionParamsTuningPass",
    # its name before Olive 0.8
    "OrtPerfTuning": "orchestrator.passes.evaluation.session_tuning:OrtSessionParamsTuningPass",
}

_BUILDER = "ModelBuilder (it exports, fuses and quantizes in one pass)"
# Olive passes orch does not run, and what to use instead: the config reader names them in one line each.
UNSUPPORTED: dict[str, str] = {
    "OptimumConversion": f"use {_BUILDER}",
    "OnnxStaticQuantization": "static QDQ quantization is for NPUs; use OnnxMatMul4Quantizer or ModelBuilder int4",
    "IncStaticQuantization": "INC static quantization (calibrated QOperator/QDQ) is not run; use "
    "IncDynamicQuantization or OnnxMatMul4Quantizer",
    "QuaRot": "rotation-based quantization is not supported; use GptqQuantizer (CUDA) or ModelBuilder int4",
    "SparseGPT": "pruning is not supported",
    "SliceGPT": "pruning is not supported",
    "TorchTRTConversion": "TensorRT is not supported; use ModelBuilder",
    "MatMulNBitsToQDQ": "QDQ conversion is for NPUs and is not supported",
    "StaticLLM": "static-shape NPU models are not supported",
    "EPContextBinaryGenerator": "NPU context binaries are not supported",
    "ComposeOnnxModels": "composing split ONNX models is not supported; SplitModel writes an onnxruntime-genai "
    "pipeline of its parts",
    "LoftQ": "use LoRA or QLoRA",
    "DoRA": "use LoRA",
    "LoHa": "use LoRA",
    "LoKr": "use LoRA",
}
UNSUPPORTED["Quarot"] = UNSUPPORTED["QuaRot"]


def unsupported_hint(type_name: str) -> str | None:
    """'OnnxConversion is not supported here: use ...' for a known Olive pass orch does not run, else None."""
    canon = {k.lower(): k for k in UNSUPPORTED}.get(type_name.lower())
    return None if canon is None else f"Olive pass {canon} is not supported by orch: {UNSUPPORTED[canon]}"


def pass_types() -> list[str]:
    return sorted(PASSES)


def load_pass(type_name: str) -> type[Pass]:
    """Import and return the pass class for `type_name`; a clear error naming the nearest known type."""
    try:
        target = PASSES[type_name]
    except KeyError:
        close = difflib.get_close_matches(type_name, PASSES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown pass type {type_name!r}.{hint} Known: {', '.join(pass_types())}") from None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
