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
    "DoRA": "orchestrator.passes.training.lora.train:DoRAPass",
    "LoHa": "orchestrator.passes.training.lora.train:LoHaPass",
    "LoKr": "orchestrator.passes.training.lora.train:LoKrPass",
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
    "OnnxKQuantQuantization": "orchestrator.passes.quantization.onnx_kquant:OnnxKQuantQuantizationPass",
    "OnnxConversion": "orchestrator.passes.onnx.onnx_conversion:OnnxConversionPass",
    # Olive 0.7-0.9's Optimum exporter: the same decoder graph from torch.onnx (one graph, already "merged")
    "OptimumConversion": "orchestrator.passes.onnx.onnx_conversion:OnnxConversionPass",
    "OptimumMerging": "orchestrator.passes.onnx.onnx_conversion:OptimumMergingPass",
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
    "LoftQ": "LoftQ's quantization-aware LoRA initialization is not run; use LoRA (or QLoRA on CUDA)",
}
_NPU = "NPU toolchains (QNN, SNPE, Vitis AI, QAIRT) are not part of orch; build for CPU, CUDA, DirectML or WebGPU"
_OPENVINO = "the OpenVINO toolchain is not part of orch; use ModelBuilder for CPU / GPU"
_VENDOR_QUANT = (
    "vendor quantizers (AMD Quark, NVIDIA ModelOpt, Qualcomm AIMET) are not part of orch; use Gptq / Rtn / "
    "OnnxBlockWiseRtnQuantization"
)
for _name in ("QNNConversion", "QNNContextBinaryGenerator", "QNNModelLibGenerator", "QNNPreprocess", "SNPEConversion",
              "SNPEQuantization", "SNPEtoONNXConversion", "QairtEncapsulation", "QairtGenAIBuilder", "QairtMHA2SHA",
              "QairtPipelinePass", "QairtPreparation", "VitisAIAddMetaData", "VitisAIQuantization",
              "VitisGenerateModelLLM", "VitisGenerateModelSD", "VitisQDQQuantizer", "VitisQOpQuantizer",
              "RyzenGenerateModelLLM", "MixedPrecisionOverrides", "DynamicToFixedShape", "InputNCHWtoNHWC",
              "PowerOfTwoMethod"):  # fmt: skip
    UNSUPPORTED.setdefault(_name, _NPU)
for _name in ("OpenVINOConversion", "OpenVINOEncapsulation", "OpenVINOIoUpdate", "OpenVINOOptimumConversion",
              "OpenVINOQuantization", "OpenVINOQuantizationWithAccuracy", "OpenVINOWeightCompression"):  # fmt: skip
    UNSUPPORTED.setdefault(_name, _OPENVINO)
for _name in ("QuarkQuantization", "QuarkQuantizationVitisAI", "NVModelOptQuantization", "NVModelOptGraphSurgery",
              "AimetQuantization", "GptqModel", "OnnxBnb4Quantization", "OnnxQuantization", "quantize_static",
              "OnnxQuantizationPreprocess", "QuantizationAwareTraining", "KQuant", "SpinQuant",
              "AutoClip"):  # fmt: skip
    UNSUPPORTED.setdefault(_name, _VENDOR_QUANT)
UNSUPPORTED.update(
    {
        "MobiusBuilder": "MobiusBuilder (mobius-ai) is not part of orch; use ModelBuilder",
        "PyTorchTensorParallel": "tensor-parallel sharding is not supported; the models here fit one device",
        "MoEExpertsDistributor": "mixture-of-experts sharding is not supported",
        "SDLoRA": "diffusion models are not supported",
        "OrtMixedPrecision": "use ModelBuilder precision fp16 or OrtTransformersOptimization float16",
        "OnnxFloatToFloat16": "use ModelBuilder precision fp16, or OrtTransformersOptimization float16 (with "
        "force_fp32_ops for the op types to keep)",
        "OnnxIODataTypeConverter": "the model builder writes float32 logits; for an fp16 graph keep_io_types in "
        "OrtTransformersOptimization",
        "OnnxIOFloat16ToFloat32": "the model builder writes float32 logits; for an fp16 graph keep_io_types in "
        "OrtTransformersOptimization",
        "OnnxPeepholeOptimizer": "use OrtTransformersOptimization (onnxruntime's fusions) or ModelBuilder",
        "OnnxScriptFusion": "use OrtTransformersOptimization (onnxruntime's fusions) or ModelBuilder",
        "OnnxModelOptimizer": "use OrtTransformersOptimization (onnxruntime's fusions) or ModelBuilder",
        "OnnxOpVersionConversion": "OnnxConversion writes the target_opset asked",
        "OnnxDiscrepancyCheck": "orch checks every export against transformers itself (parity metrics)",
        "AppendPrePostProcessingOps": "pre/post-processing graphs (onnxruntime-extensions) are not added",
        "InsertBeamSearch": "onnxruntime-genai runs the search (genai_config.json search options)",
        "AddOliveMetadata": "the output folder's manifest.json records what ran",
        "CaptureLayerAnnotations": "layer annotations are for NPU partitioning, not supported",
    }
)
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
