"""Pass type name -> lazy import path. Olive's type names are the keys, so Olive workflow files run as-is.

An explicit table (not __init_subclass__ registration) so that a pass is found before its module is imported,
and `orch --help` / config validation never import torch or onnxruntime.
"""

from __future__ import annotations

import difflib
import importlib

from orchestrator.passes.base import Pass

PASSES: dict[str, str] = {
    "LoRA": "orchestrator.passes.lora:LoRAPass",
    "QLoRA": "orchestrator.passes.lora:QLoRAPass",
    "MergeAdapterWeights": "orchestrator.passes.merge:MergeAdapterWeightsPass",
    "ModelBuilder": "orchestrator.passes.model_builder:ModelBuilderPass",
    "OnnxMatMul4Quantizer": "orchestrator.passes.quantize:MatMulNBitsQuantizePass",
    "OnnxBlockWiseRtnQuantization": "orchestrator.passes.quantize:MatMulNBitsQuantizePass",
    "Evaluate": "orchestrator.passes.evaluate:EvaluatePass",
    "GptqQuantizer": "orchestrator.passes.awq_gptq:GptqQuantizerPass",
    "AutoAWQQuantizer": "orchestrator.passes.awq_gptq:AutoAWQQuantizerPass",
}


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
