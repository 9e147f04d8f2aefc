"""OrtTransformersOptimization (Olive's name): onnxruntime's own transformers optimizer on a plain ONNX model.

`onnxruntime.transformers.optimizer.optimize_model` fuses what it recognizes for `model_type` (Olive configs
pass "gpt2" for decoder LMs; 0 heads / hidden size = detect from the graph), optionally converts to fp16. The
result must reproduce the input graph's logits on CPU (fp32: max |diff| < parity_tolerance) or the pass fails.
"""

from __future__ import annotations

from typing import Any

from orchestrator.core.fs import commit_dir, fresh_dir
from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import Pass, PassConfig, PassContext, PassError, PassOutput, Requirements
from orchestrator.passes.common.onnx_common import copy_side_files, onnx_input, save_one_data_file

OUTPUT_DIR = "model"
PARITY_IDS = [5, 9, 33, 12, 7, 100, 4, 8, 21, 17, 3, 44]


class OrtOptimizeConfig(PassConfig):
    """Olive's OrtTransformersOptimization fields."""

    model_type: str = "gpt2"
    num_heads: int = 0
    hidden_size: int = 0
    opt_level: int | None = None
    only_onnxruntime: bool = False
    use_gpu: bool = False
    float16: bool = False
    keep_io_types: bool = True
    optimization_options: dict[str, Any] | None = None
    use_gqa: bool = False
    num_key_value_heads: int = 0  # Olive's; the GQA rewrite reads the KV heads from the model's config.json
    force_fp32_ops: list[str] | None = None  # float16: op types kept in float32 (onnxruntime's op_block_list)
    force_fp32_nodes: list[str] | None = None  # float16: nodes kept in float32 (node_block_list)
    force_fp16_inputs: dict[str, list[int]] | None = None  # float16: op type -> input indices forced to float16
    input_int32: bool = False  # Olive's BERT option; refused for decoders (config_problems)
    save_as_external_data: bool = True
    all_tensors_to_one_file: bool = True
    parity_tolerance: float = 1e-3


class OrtTransformersOptimizationPass(Pass):
    type_name = "OrtTransformersOptimization"
    Config = OrtOptimizeConfig
    version = "1"
    libraries = ("onnxruntime", "onnx")

    def requirements(self, config: PassConfig) -> Requirements:
        return Requirements(cuda=False, environment="cpu-export")

    @classmethod
    def config_problems(cls, config: PassConfig) -> list[str]:
        assert isinstance(config, OrtOptimizeConfig)
        if config.input_int32:
            return ["OrtTransformersOptimization input_int32: the decoder's token ids stay int64 (what "
                    "onnxruntime-genai feeds); drop input_int32"]  # fmt: skip
        return []

    @classmethod
    def config_notes(cls, config: PassConfig) -> list[str]:
        assert isinstance(config, OrtOptimizeConfig)
        if config.num_key_value_heads:
            return ["num_key_value_heads: accepted (use_gqa reads the KV heads from the model's config.json)"]
        return []

    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        assert isinstance(config, OrtOptimizeConfig)
        import numpy as np
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        from orchestrator.passes.common import onnx_tools

        src = onnx_input(model, self.type_name)
        options = FusionOptions(config.model_type)
        for key, value in (config.optimization_options or {}).items():
            if not hasattr(options, key):
                raise PassError(f"OrtTransformersOptimization: unknown optimization_options key {key!r}")
            setattr(options, key, value)
        try:
            opt = optimize_model(
                str(src),
                model_type=config.model_type,
                num_heads=config.num_heads,
                hidden_size=config.hidden_size,
                opt_level=config.opt_level,
                optimization_options=options,
                use_gpu=config.use_gpu,
                only_onnxruntime=config.only_onnxruntime,
            )
        except (ValueError, KeyError, AssertionError) as exc:
            raise PassError(f"OrtTransformersOptimization (model_type {config.model_type!r}): {exc}") from None
        if config.float16:
            opt.convert_float_to_float16(
                keep_io_types=config.keep_io_types, op_block_list=config.force_fp32_ops,
                node_block_list=config.force_fp32_nodes, force_fp16_inputs=config.force_fp16_inputs,
            )  # fmt: skip
        gqa = replace_attention_with_gqa(opt, src, ctx) if config.use_gqa else None
        tmp = fresh_dir(ctx.out_dir / OUTPUT_DIR)
        domains = {o.domain for o in opt.model.opset_import}
        if "com.microsoft" not in domains and any(n.domain == "com.microsoft" for n in opt.model.graph.node):
            import onnx

            opt.model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))  # fused contrib ops
        save_one_data_file(opt.model, tmp / "model.onnx", external=config.save_as_external_data)
        copy_side_files(src.parent, tmp)
        fused = {k: float(v) for k, v in (opt.get_fused_operator_statistics() or {}).items() if v}
        ctx.info(f"fused operators: {fused or 'none'}")
        ref = onnx_tools.ort_logits(src, PARITY_IDS).astype(np.float32)
        got = onnx_tools.ort_logits(tmp / "model.onnx", PARITY_IDS).astype(np.float32)
        diff = float(np.abs(got - ref).max())
        ctx.info(f"optimized vs input logits: max |diff| {diff:.3g}")
        if not config.float16 and not diff < config.parity_tolerance:
            raise PassError(f"OrtTransformersOptimization: optimized logits differ from the input's by {diff:.3g}")
        final = ctx.out_dir / OUTPUT_DIR
        commit_dir(tmp, final)
        metrics = {"parity_max_abs_diff_vs_input": diff, **{f"fused_{k}": v for k, v in fused.items()}}
        if gqa is not None:
            metrics["gqa_nodes"] = float(gqa)
        ctx.log_metrics(metrics)
        return PassOutput(model=ModelArtifact(format="onnx", path=OUTPUT_DIR, task=model.task), metrics=metrics)


def replace_attention_with_gqa(opt: Any, src: Any, ctx: PassContext) -> int:
    """Olive's use_gqa: onnxruntime's replace_mha_with_gqa on the fused MultiHeadAttention nodes (KV heads from
    config.json beside the model). Returns how many nodes became GroupQueryAttention; 0 (said in the log) when
    the fusions for model_type found no attention to fuse in this graph."""
    import json

    from onnxruntime.transformers.convert_generation import replace_mha_with_gqa

    mha = [n for n in opt.model.graph.node if n.op_type == "MultiHeadAttention"]
    if not mha:
        ctx.info(
            "use_gqa: no MultiHeadAttention node to replace (the fusions found no attention in this graph); "
            "the graph keeps its attention as exported"
        )
        return 0
    config_file = src.parent / "config.json"
    if not config_file.is_file():
        raise PassError(
            "OrtTransformersOptimization use_gqa needs the model's config.json beside model.onnx (its KV heads): "
            "set save_metadata_for_token_generation in OnnxConversion"
        )
    cfg = json.loads(config_file.read_text())
    kv_heads = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
    replace_mha_with_gqa(opt, "attention_mask", kv_num_heads=kv_heads)
    opt.prune_graph()
    opt.update_graph()
    count = sum(n.op_type == "GroupQueryAttention" for n in opt.model.graph.node)
    ctx.info(f"use_gqa: {len(mha)} MultiHeadAttention -> {count} GroupQueryAttention (kv heads {kv_heads})")
    return count
