"""OnnxDynamicQuantization (Olive's name): onnxruntime.quantization.quantize_dynamic on a plain ONNX model.

int8 weights, activations quantized at run time (no calibration data). The logits move (it is int8), so the
pass reports how far from the input graph they are and how often the greedy token agrees, and fails only if
the quantized graph does not run.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from orchestrator.core.fs import commit_dir, fresh_dir
from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import Pass, PassConfig, PassContext, PassOutput, Requirements
from orchestrator.passes.common.onnx_common import copy_side_files, input_weight_nodes, logits_shift, onnx_input, resave

OUTPUT_DIR = "model"


class DynamicQuantConfig(PassConfig):
    """Olive's OnnxDynamicQuantization fields."""

    weight_type: Literal["QInt8", "QUInt8"] = "QInt8"
    per_channel: bool = False
    reduce_range: bool = False
    op_types_to_quantize: list[str] | None = None
    nodes_to_exclude: list[str] | None = None
    nodes_to_quantize: list[str] | None = None
    quant_format: Literal["QOperator"] = "QOperator"
    extra_options: dict[str, Any] = Field(default_factory=dict)  # onnxruntime quantize_dynamic's extra_options
    save_as_external_data: bool = True
    all_tensors_to_one_file: bool = True


class OnnxDynamicQuantizationPass(Pass):
    type_name = "OnnxDynamicQuantization"
    Config = DynamicQuantConfig
    version = "1"
    libraries = ("onnxruntime", "onnx")

    def requirements(self, config: PassConfig) -> Requirements:
        return Requirements(cuda=False, environment="cpu-export")

    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        assert isinstance(config, DynamicQuantConfig)
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from orchestrator.passes.common import onnx_tools

        src = onnx_input(model, self.type_name)
        kept = input_weight_nodes(onnx.load(str(src), load_external_data=False))
        if kept:
            ctx.info(f"{len(kept)} MatMuls take their weight from a graph input (LoRA adapter inputs): kept float")
        tmp = fresh_dir(ctx.out_dir / OUTPUT_DIR)
        quantize_dynamic(
            str(src),
            str(tmp / "model.onnx"),
            weight_type=getattr(QuantType, config.weight_type),
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            op_types_to_quantize=config.op_types_to_quantize,
            nodes_to_exclude=[*(config.nodes_to_exclude or []), *kept],
            nodes_to_quantize=config.nodes_to_quantize,
            use_external_data_format=True,
            # fused contrib ops (OrtTransformersOptimization) have no shape-inference types: their outputs are fp32
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, **config.extra_options},
        )
        resave(tmp / "model.onnx", external=config.save_as_external_data)
        copy_side_files(src.parent, tmp)
        metrics = {
            **logits_shift(src, tmp / "model.onnx"),
            "size_before_bytes": float(onnx_tools.model_size_bytes(src)),
            "size_after_bytes": float(onnx_tools.model_size_bytes(tmp / "model.onnx")),
        }
        ctx.info(f"int8 dynamic: {metrics}")
        final = ctx.out_dir / OUTPUT_DIR
        commit_dir(tmp, final)
        ctx.log_metrics(metrics)
        return PassOutput(
            model=ModelArtifact(format="onnx", path=OUTPUT_DIR, task=model.task, quantized=True), metrics=metrics
        )
