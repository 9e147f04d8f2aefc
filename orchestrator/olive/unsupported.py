"""What orch does not take from Olive, said once: the Olive commands it does not run (UNSUPPORTED_COMMANDS, each
answered with one line by the CLI) and the sentences a refused feature gets wherever it is met, as a flag
(olive.plan, olive.commands) or as a workflow key (the *_keys modules), so the two readings never drift apart.
"""

from __future__ import annotations

NO_SHARED_CACHE = (
    "Olive's Azure Blob shared cache is not used: orch caches every pass by content in engine.cache_dir (on Azure ML "
    "in the workspace's datastore)"
)
NO_MODEL_SCRIPTS = "PyTorch model-loader scripts (_model_loader) are not run by orch"
GENERATIVE_ONLY = "orch optimizes generative language models only"
# the same words as passes/registry.py's refusal of NPU passes (that layer cannot import this one)
NO_NPU = "NPU toolchains (QNN, SNPE, Vitis AI, QAIRT) are not part of orch; build for CPU, CUDA, DirectML or WebGPU"

# Olive commands orch does not run, and what to use instead (the CLI answers with this one line).
UNSUPPORTED_COMMANDS: dict[str, str] = {
    "benchmark": "lm-evaluation-harness benchmarks are not run by orch; add an evaluator with perplexity / "
    "accuracy / latency / throughput metrics to a workflow (`orch run --config`)",
    "shared-cache": f"{NO_SHARED_CACHE}; see `orch cache ls`, `orch cache clean`",
    "generate-cost-model": "cost-model splitting is not supported; split by layer count (auto-opt --num-splits N)",
    "configure-qualcomm-sdk": NO_NPU,
    "manage-aml-compute": "create Azure ML compute with orch's infra/ templates or `az ml compute create`; "
    "orch submits to an existing cluster (systems.<name>.aml_compute)",
    "diffusion-lora": "diffusion models are not supported: orch fine-tunes language models (`orch finetune`)",
    "model-package": "Olive's model packaging for Foundry Local / AITK is not supported; the output folder's "
    "model/ is an onnxruntime-genai model (packaging_config Zipfile zips it)",
    "init": "the interactive wizard is not provided; start from `orch finetune`, `orch optimize` or a workflow "
    "file (`orch run --config`)",
}
