"""orch: run the fine-tune -> merge -> int4 ONNX -> quantize -> evaluate workflow of small language models
on a laptop, in Docker and on Azure ML, from Olive-format workflow configs."""

__version__ = "0.1.0"
