"""IncDynamicQuantization (Olive's name): Intel Neural Compressor's post-training dynamic int8 quantization of
a plain ONNX model (MatMulInteger / DynamicQuantizeLinear; weights int8, activations quantized at run time).

Why its own environment (cpu-inc): neural-compressor 2.6's ONNX adaptor needs numpy<2 and onnx<1.17, which
orch's export environment cannot hold; LocalSystem builds that environment as a venv of its own, Docker and
Azure ML as an image. What is not run: INC's accuracy-aware tuning (Olive's `metric` with a goal) and the gpu
backends; both are refused in one line, never ignored. The logits move (int8), so the pass reports how far
from the input graph they are and how often the greedy token agrees, as OnnxDynamicQuantization does.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, model_validator

from orchestrator.core.fs import commit_dir, fresh_dir
from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import Pass, PassConfig, PassContext, PassError, PassOutput, Requirements
from orchestrator.passes.common.onnx_common import copy_side_files, logits_shift, onnx_input

OUTPUT_DIR = "model"
INT8_OPS = ("MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul", "ConvInteger")
INC_PIN = "neural-compressor==2.6 (environments/cpu-inc.conda.yaml)"


class IncDynamicConfig(PassConfig):
    """Olive's IncDynamicQuantization fields (olive/passes/onnx/inc_quantization.py)."""

    approach: Literal["dynamic"] = "dynamic"
    device: Literal["cpu"] = "cpu"
    backend: Literal["default"] = "default"
    domain: Literal["auto", "cv", "object_detection", "nlp", "recommendation_system"] = "auto"
    workspace: str | None = None
    recipes: dict[str, Any] = Field(default_factory=dict)
    reduce_range: bool = False
    quant_level: Literal["auto", 0, 1] = "auto"
    excluded_precisions: list[str] = Field(default_factory=list)
    tuning_criterion: dict[str, Any] = Field(default_factory=dict)
    metric: dict[str, Any] | None = None
    op_type_dict: dict[str, Any] | None = None
    save_as_external_data: bool = False
    all_tensors_to_one_file: bool = True
    external_data_name: str | None = None
    size_threshold: int = 1024
    convert_attribute: bool = False

    @model_validator(mode="after")
    def _only_what_runs(self) -> IncDynamicConfig:
        if self.metric:
            raise ValueError(
                "metric: INC's accuracy-aware tuning is not run by orch; drop it and put the metric in an evaluator"
            )
        if self.tuning_criterion:
            raise ValueError(
                "tuning_criterion: applies to INC's accuracy-aware tuning (a metric with a goal), which orch does "
                "not run; drop it"
            )
        if self.op_type_dict:
            raise ValueError("op_type_dict: Olive passes it to INC for weight_only only (dynamic ignores it); drop it")
        return self


class IncDynamicQuantizationPass(Pass):
    type_name = "IncDynamicQuantization"
    Config = IncDynamicConfig
    version = "1"
    libraries = ("neural-compressor", "onnxruntime", "onnx", "numpy")

    def requirements(self, config: PassConfig) -> Requirements:
        return Requirements(cuda=False, environment="cpu-inc")

    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        assert isinstance(config, IncDynamicConfig)
        src = onnx_input(model, self.type_name)
        assert model is not None
        try:
            from neural_compressor import quantization, set_workspace
            from neural_compressor.config import PostTrainingQuantConfig
        except ImportError as exc:
            raise PassError(
                f"IncDynamicQuantization needs Intel Neural Compressor, which this interpreter cannot import ({exc}): "
                f"run it on a LocalSystem without python_environment_path (orch builds the cpu-inc venv), or "
                f"install {INC_PIN}"
            ) from None
        import onnx

        from orchestrator.passes.common import onnx_tools

        os.environ.setdefault("LOGLEVEL", "WARNING" if ctx.job.log_level >= 2 else "INFO")
        set_workspace(config.workspace or str(ctx.out_dir / "nc_workspace"))
        ptq = PostTrainingQuantConfig(
            approach="dynamic",
            device=config.device,
            backend=config.backend,
            domain=config.domain,
            recipes=config.recipes,
            reduce_range=config.reduce_range,
            quant_level=config.quant_level,
            excluded_precisions=config.excluded_precisions,
        )
        ctx.progress(0, 1, "INC dynamic int8")
        q_model = quantization.fit(str(src), ptq)
        if q_model is None:
            raise PassError("IncDynamicQuantization: neural-compressor returned no quantized model (see the job log)")
        tmp = fresh_dir(ctx.out_dir / OUTPUT_DIR)
        data_name = config.external_data_name or "model.onnx.data"
        onnx.save_model(
            q_model.model,
            str(tmp / "model.onnx"),
            save_as_external_data=config.save_as_external_data,
            all_tensors_to_one_file=config.all_tensors_to_one_file,
            location=data_name if config.all_tensors_to_one_file else None,
            size_threshold=config.size_threshold,
            convert_attribute=config.convert_attribute,
        )
        copy_side_files(src.parent, tmp)
        int8_ops = sum(n.op_type in INT8_OPS for n in q_model.model.graph.node)
        if not int8_ops:
            raise PassError("IncDynamicQuantization: INC quantized no operator of this graph (no MatMul found?)")
        metrics = {
            "int8_nodes": float(int8_ops),
            "size_before_bytes": float(onnx_tools.model_size_bytes(src)),
            "size_after_bytes": float(onnx_tools.model_size_bytes(tmp / "model.onnx")),
        }
        if any(i.name == "input_ids" for i in q_model.model.graph.input):  # a decoder: how far the logits moved
            metrics.update(logits_shift(src, tmp / "model.onnx"))
        else:
            ctx.info("not a decoder graph (no input_ids): logits parity not measured")
        ctx.progress(1, 1, "INC dynamic int8")
        ctx.info(f"INC dynamic int8: {metrics}")
        final = ctx.out_dir / OUTPUT_DIR
        commit_dir(tmp, final)
        ctx.log_metrics(metrics)
        return PassOutput(
            model=ModelArtifact(format="onnx", path=OUTPUT_DIR, task=model.task, quantized=True), metrics=metrics
        )
