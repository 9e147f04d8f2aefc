"""orch: run the fine-tune -> merge -> int4 ONNX -> quantize -> evaluate workflow of small language models
on a laptop, in Docker and on Azure ML, from Olive-format workflow configs."""

import logging

__version__ = "0.1.0"

# bitsandbytes >= 0.49 warns at import, on CPUs with AVX512-BF16, that its optional CPU 4-bit GEMM (the `kernels`
# package from the Hub) is missing; peft imports bitsandbytes wherever it is installed, so every LoRA run on such a
# machine printed it. orch never uses that kernel (QLoRA runs on CUDA only), so the line says nothing to its users.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
