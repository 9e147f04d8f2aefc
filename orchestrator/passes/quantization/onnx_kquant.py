"""OnnxKQuantQuantization (Olive's name): weight-only int4/int8 MatMulNBits by k-quant (llama.cpp's scheme).

onnxruntime's MatMulNBitsQuantizer with its k-quant config: each block's scale and minimum are searched against
the weights (no calibration data), and `customized_weight_config` gives chosen nodes other bits or block sizes
(e.g. the LM head at 8 bits). Folder handling, LoRA inputs kept float and the generation check are the RTN pass's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from orchestrator.passes.base import PassConfig, PassContext, PassError
from orchestrator.passes.quantization.quantize import MatMulNBitsQuantizePass


class KQuantConfig(PassConfig):
    """Olive's OnnxKQuantQuantization fields."""

    bits: Literal[4, 8] = 4
    block_size: Literal[16, 32, 64, 128, 256] = 32
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = None  # None: 4 (int8 compute) on CPU
    customized_weight_config: dict[str, dict[str, Any]] | None = None  # node name -> {bits, group_size}
    nodes_to_exclude: list[str] | None = None
    check_generation: bool = True
    check_prompt: str = "the quick brown fox jumps over the lazy dog. I feel happy, sad, afraid and surprised."


class OnnxKQuantQuantizationPass(MatMulNBitsQuantizePass):
    type_name = "OnnxKQuantQuantization"
    Config = KQuantConfig
    version = "1"

    @staticmethod
    def _quantize(config: PassConfig, src: Path, dst: Path, ctx: PassContext) -> None:  # type: ignore[override]
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import KQuantWeightOnlyQuantConfig, MatMulNBitsQuantizer

        assert isinstance(config, KQuantConfig)
        proto = onnx.load(str(src), load_external_data=True)
        algo = KQuantWeightOnlyQuantConfig(customized_weight_config=config.customized_weight_config or {})
        quant = MatMulNBitsQuantizer(
            proto,
            bits=config.bits,
            block_size=config.block_size,
            is_symmetric=False,
            accuracy_level=4 if config.accuracy_level is None else config.accuracy_level,
            nodes_to_exclude=config.nodes_to_exclude,
            algo_config=algo,
        )
        try:
            quant.process()
        except ValueError as exc:  # a weight whose input width the k-quant blocks do not divide
            raise PassError(
                f"OnnxKQuantQuantization: onnxruntime's k-quant cannot quantize this model ({exc}); its blocks need "
                "the MatMul input widths divisible by 128: exclude those nodes (nodes_to_exclude) or use "
                "OnnxBlockWiseRtnQuantization"
            ) from None
        data = dst.parent / f"{dst.name}.data"
        data.unlink(missing_ok=True)
        quant.model.save_model_to_file(str(dst), use_external_data_format=True)
        data.chmod(0o644)
        ctx.info(f"k-quant int{config.bits} (block {config.block_size}): wrote {dst.name} + {data.name}")
