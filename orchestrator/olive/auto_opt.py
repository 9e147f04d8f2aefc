"""Olive's auto-opt -> a workflow: the model builder (or torch's exporter chain), ExtractAdapters for an
adapter, SplitModel for --num-splits; an ONNX input quantized to --precision."""

from __future__ import annotations

from typing import Any

from orchestrator.olive.flag_parsing import Given
from orchestrator.olive.model_ref import _model_of, adapter_kind, input_model, merge_first
from orchestrator.olive.plan import (
    FlagError,
    Plan,
    _engine,
    _log_level,
    _provider,
    command_workflow_id,
    common,
    note_memory,
    refuse_qdq_encoding,
    remote,
)
from orchestrator.olive.unsupported import NO_NPU

BUILDER_PRECISIONS = ("int4", "int8", "fp16", "bf16", "fp32")


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
    if flags.get("--cost-model") is not None:  # --memory only sizes such a split: noted by plan.note_memory
        raise FlagError(
            "--cost-model: splitting by a cost model is not supported; give the number of parts (--num-splits N)"
        )
    num_splits = flags.get("--num-splits")
    if num_splits is not None and int(num_splits) < 2:
        raise FlagError(f"--num-splits {num_splits}: give 2 or more parts (or drop the flag)")
    if device.lower() not in ("cpu", "gpu"):
        raise FlagError(f"--device {device!r}: {NO_NPU}")
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
    refuse_qdq_encoding(g)
    if not g["cost_model"]:  # with --cost-model, auto_opt_workflow refuses the split
        note_memory(g, plan)
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
