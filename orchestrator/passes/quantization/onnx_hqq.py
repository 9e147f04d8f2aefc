"""OnnxHqqQuantization (Olive's name): weight-only int4 MatMulNBits by Half-Quadratic Quantization.

onnxruntime's own MatMulNBitsQuantizer with its HQQ config (no calibration data: HQQ optimizes each block's
scale and zero point against the weights alone). Folder handling and checks are the RTN pass's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from orchestrator.passes.base import PassConfig, PassContext
from orchestrator.passes.quantization.quantize import MatMulNBitsQuantizePass


class HqqConfig(PassConfig):
    """Olive's OnnxHqqQuantization fields."""

    block_size: Literal[16, 32, 64, 128, 256] = 128
    axis: Literal[0, 1] = 1
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = None  # MatMulNBits compute type; None: 4 (int8) on CPU
    nodes_to_exclude: list[str] | None = None
    nodes_to_include: list[str] | None = None
    check_generation: bool = True
    check_prompt: str = "the quick brown fox jumps over the lazy dog. I feel happy, sad, afraid and surprised."
    bits: Literal[4] = 4


class OnnxHqqQuantizationPass(MatMulNBitsQuantizePass):
    type_name = "OnnxHqqQuantization"
    Config = HqqConfig
    version = "1"

    @staticmethod
    def _quantize(config: PassConfig, src: Path, dst: Path, ctx: PassContext) -> None:  # type: ignore[override]
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

        assert isinstance(config, HqqConfig)
        proto = onnx.load(str(src), load_external_data=True)
        algo = HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=config.bits, axis=config.axis)
        quant = MatMulNBitsQuantizer(
            proto,
            block_size=config.block_size,
            is_symmetric=False,
            nodes_to_exclude=config.nodes_to_exclude,
            nodes_to_include=config.nodes_to_include,
            algo_config=algo,
        )
        quant.process()
        level = 4 if config.accuracy_level is None else config.accuracy_level
        for node in quant.model.model.graph.node:  # HQQ's quantizer writes no accuracy_level: set it as RTN's does
            if node.op_type == "MatMulNBits":
                attrs = [a for a in node.attribute if a.name != "accuracy_level"]
                del node.attribute[:]
                node.attribute.extend([*attrs, onnx.helper.make_attribute("accuracy_level", level)])
        data = dst.parent / f"{dst.name}.data"
        data.unlink(missing_ok=True)
        quant.model.save_model_to_file(str(dst), use_external_data_format=True)
        data.chmod(0o644)
        ctx.info(f"HQQ int4 (block {config.block_size}): wrote {dst.name} + {data.name}")
