"""Olive's optimize -> a workflow: Olive's pass schedule for the precision, provider and exporter asked."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.olive.flag_parsing import Given, split_values
from orchestrator.olive.model_ref import _model_of, adapter_kind, input_model, merge_first
from orchestrator.olive.plan import FlagError, Plan, _engine, _log_level, _provider, common, extra_mb_options

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
