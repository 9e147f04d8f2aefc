"""Olive's capture-onnx-graph -> a workflow: torch's exporter (an adapter kept unmerged) or the model builder."""

from __future__ import annotations

from typing import Any

from orchestrator.olive.flag_parsing import Given, parse_bool
from orchestrator.olive.model_ref import _model_of, adapter_kind, input_model, merge_first
from orchestrator.olive.plan import FlagError, Plan, _engine, _log_level, common, extra_mb_options, remote


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
