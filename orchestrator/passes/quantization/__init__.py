"""Quantizers: int4 MatMulNBits (`quantize`, `onnx_hqq`), int8 dynamic (`onnx_dynamic_quant`, `inc_quantize`),
AWQ/GPTQ by llm-compressor (`awq_gptq`) and Olive >= 0.10's PyTorch-level Gptq / Rtn / mixed precision
(`olive_gptq`, `rtn`, `mixed_precision`)."""
