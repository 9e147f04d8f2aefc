"""Olive's quantize -> a workflow of the one pass Olive picks for the model kind, algorithm, precision and
implementation; the implementations orch does not run are refused in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.olive.flag_parsing import Given
from orchestrator.olive.model_ref import _model_of, input_model, model_folder
from orchestrator.olive.plan import (
    FlagError,
    Plan,
    _engine,
    _log_level,
    command_workflow_id,
    common,
    data_config,
    refuse_qdq_encoding,
    remote,
)

IMPLEMENTATIONS = (
    "olive",
    "awq",
    "autogptq",
    "gptq",
    "ort",
    "matmul4",
    "inc",
    "inc_dynamic",
    "inc_static",
    "bnb",
    "bnb4",
    "nvmo",
    "quarot",
    "spinquant",
    "aimet",
    "onnx_dynamic",
    "onnx_static",
)
_NOT_RUN = {
    "nvmo": "NVIDIA ModelOpt quantization is not part of orch",
    "aimet": "AIMET quantization is not part of orch",
    "quarot": "rotation-based quantization (QuaRot) is not supported",
    "spinquant": "rotation-based quantization (SpinQuant) is not supported",
    "bnb": "bitsandbytes 4-bit ONNX quantization (OnnxBnb4Quantization) is not supported",
    "bnb4": "bitsandbytes 4-bit ONNX quantization (OnnxBnb4Quantization) is not supported",
    "inc_static": "INC static quantization is not run",
    "onnx_static": "static (QDQ) quantization is for NPUs and is not supported",
}


def quantize_workflow(
    *,
    model_name_or_path: str,
    output_path: str,
    algorithm: str,
    precision: str = "int4",
    trust_remote_code: bool = False,
    log_level: int = 3,
    host: str | None = None,
    data_name: str | None = None,
    data_files: str | None = None,
    text_template: str | None = None,
    text_field: str | None = None,
    implementation: str | None = None,
    adapter_path: str | None = None,
    given: Given | None = None,
    notes: list[str] | None = None,
    onnx_input: bool | None = None,
) -> dict[str, Any]:
    """Olive's quantize: the pass Olive picks for (model kind, algorithm, precision, implementation)."""
    algorithm = algorithm.lower()
    impl = (implementation or "").lower() or None
    notes = notes if notes is not None else []
    if impl is not None and impl not in IMPLEMENTATIONS:
        raise FlagError(f"--implementation {implementation!r}: one of {', '.join(IMPLEMENTATIONS)}")
    if impl in _NOT_RUN or algorithm in ("quarot", "spinquant"):
        raise FlagError(
            f"--implementation {impl or algorithm}: {_NOT_RUN.get(impl or '', _NOT_RUN['quarot'])}; use "
            "--algorithm rtn / gptq / awq (Hugging Face) or rtn / hqq (ONNX)"
        )
    if algorithm in ("kquant", "lpbq", "seqmse", "adaround"):
        raise FlagError(
            f"--algorithm {algorithm}: not supported ({'k-quant mixed' if algorithm == 'kquant' else 'AIMET'}"
            " quantization); use rtn, gptq or awq (Hugging Face), rtn or hqq (ONNX)"
        )
    if algorithm == "static":
        raise FlagError(
            "--algorithm static: static (QDQ) quantization is for NPUs and is not supported; use "
            "dynamic (int8) or rtn (int4)"
        )
    if precision in ("fp8", "fp4", "nf4", "fp16", "bf16", "fp32", "int16", "uint16", "int32", "uint32"):
        raise FlagError(
            f"--precision {precision!r}: orch quantizes weights to int4/uint4 (rtn, awq, gptq, hqq) or int8/uint8 "
            "(rtn, dynamic); fp8/nf4 need GPU toolchains orch does not ship"
        )
    bits = 8 if precision in ("int8", "uint8") else 4
    model_path = Path(model_folder(model_name_or_path))
    is_onnx = (
        onnx_input
        if onnx_input is not None
        else (model_path.suffix == ".onnx" or (model_path.is_dir() and any(model_path.glob("*.onnx"))))
    )
    g = given or Given(
        {"data_name": data_name, "data_files": data_files, "text_template": text_template, "text_field": text_field}
    )
    data_configs: list[dict[str, Any]] = []
    plan = Plan(notes=notes)

    def calibration() -> str | None:
        if not g["data_name"]:
            return None
        dc = data_config(g, "calibration", split=g["split"], subset=g["subset"], plan=plan, what="calibration")
        data_configs.append(dc)
        return "calibration"

    if algorithm in ("awq", "gptq") and not is_onnx:
        if impl in ("inc", "inc_dynamic", "ort", "matmul4"):
            raise FlagError(f"--implementation {impl}: quantizes ONNX models; -m is a Hugging Face model")
        data = calibration()
        # without --data_name, as Olive: the pass's own default calibration set (a hub data set)
        if algorithm == "awq":
            pass_cfg: dict[str, Any] = {"type": "AutoAWQQuantizer", "bits": bits}
        elif impl in ("autogptq", "gptq"):
            pass_cfg = {"type": "GptqQuantizer", "bits": bits}
        else:  # Olive >= 0.10's default implementation: its own Gptq
            pass_cfg = {"type": "Gptq", "bits": bits, "sym": precision.startswith("int")}
        if data:
            pass_cfg["data_config"] = data
        if g.given("max_seq_len"):
            pass_cfg["max_seq_len"] = int(g["max_seq_len"])
        if g.given("max_samples") and g["max_samples"]:
            pass_cfg["num_calibration_samples"] = int(g["max_samples"])
    elif algorithm in ("awq", "gptq"):
        raise FlagError(
            f"--algorithm {algorithm} on an ONNX model: calibrated ONNX GPTQ/AWQ is not run; quantize the "
            f"Hugging Face model (-m its folder) with --algorithm {algorithm}, then export it (auto-opt)"
        )
    elif algorithm == "rtn" and not is_onnx:
        if impl in ("ort", "matmul4", "inc", "inc_dynamic"):
            raise FlagError(
                f"--implementation {impl}: quantizes ONNX models; -m is a Hugging Face model (export it "
                "first: orch auto-opt --precision fp32)"
            )
        pass_cfg = {"type": "Rtn", "bits": bits, "sym": precision.startswith("int")}
    elif algorithm == "hqq" and not is_onnx:
        raise FlagError(
            "--algorithm hqq: HQQ quantizes ONNX models (OnnxHqqQuantization); export first "
            "(orch auto-opt --precision fp32) and quantize that folder"
        )
    elif algorithm == "hqq":
        if bits != 4:
            raise FlagError(f"--precision {precision}: HQQ writes int4")
        pass_cfg = {"type": "OnnxHqqQuantization"}
    elif impl in ("inc", "inc_dynamic"):
        if bits == 4:
            raise FlagError(
                "--implementation inc --precision int4: INC weight-only int4 is not run; use "
                "--algorithm rtn (MatMulNBits) or --precision int8"
            )
        pass_cfg = {"type": "IncDynamicQuantization"}
    elif algorithm == "dynamic" or impl in ("ort", "onnx_dynamic") and bits == 8:
        if (model_path / "genai_config.json").is_file():
            raise FlagError(
                "dynamic int8 quantization works on plain ONNX graphs, and -m is an onnxruntime-genai "
                "model (fused by the model builder): use --algorithm rtn --precision int8 (weight-only "
                "8-bit MatMulNBits), or auto-opt --precision int8"
            )
        pass_cfg = {"type": "OnnxDynamicQuantization", "weight_type": "QUInt8" if precision == "uint8" else "QInt8"}
    else:  # rtn, ONNX: weight-only MatMulNBits blocks (4 or 8 bits), which onnxruntime-genai runs
        pass_cfg = {"type": "OnnxBlockWiseRtnQuantization", "block_size": 32, "bits": bits}
        if precision.startswith("uint"):
            pass_cfg["is_symmetric"] = False
    if pass_cfg["type"] not in ("AutoAWQQuantizer", "GptqQuantizer", "Gptq") and g["data_name"]:
        notes.append(f"--data_name: accepted, no effect ({pass_cfg['type']} needs no calibration data)")
    return {
        "input_model": input_model(
            model_name_or_path, trust_remote_code=trust_remote_code, task=None, adapter_path=adapter_path
        ),
        "data_configs": data_configs,
        "passes": {"quantize": pass_cfg},
        "workflow_id": command_workflow_id("quantize", output_path),
        "engine": _engine(output_path, log_level, ["CPUExecutionProvider"], host, host),
    }


def build_quantize(g: Given, host: str | None) -> Plan:
    plan = Plan()
    common(g, plan)
    model = _model_of(g, plan)
    refuse_qdq_encoding(g)
    if g["quarot_rotate"]:
        raise FlagError("--quarot_rotate: QuaRot rotation is not supported; drop it")
    if g["act_precision"]:
        plan.notes.append(
            f"--act_precision {g['act_precision']}: accepted, no effect (activations are quantized "
            "only by static quantization, which is not run)"
        )
    if g.given("batch_size"):
        plan.notes.append(
            f"--batch_size {g['batch_size']}: accepted, no effect (calibration runs one sequence at a time)"
        )
    if model.adapter_path:
        raise FlagError(
            "-a/--adapter_path: quantize the merged model (MergeAdapterWeights, or finetune's model/) "
            "or quantize the ONNX model auto-opt built with the adapter (its LoRA inputs stay float)"
        )
    precision = g["precision"] or "int4"
    wf = quantize_workflow(
        model_name_or_path=model.path,
        output_path=g["output_path"] or "quantized-model",
        algorithm=g.get("algorithm", "rtn"),
        precision=precision,
        trust_remote_code=bool(g["trust_remote_code"]),
        log_level=_log_level(g),
        host=host,
        implementation=g["implementation"],
        given=g,
        notes=plan.notes,
        onnx_input=model.kind == "onnx",
    )
    remote(g, wf, plan)
    plan.workflow = wf
    return plan
