"""Which pip extra of orch brings a library: a missing import becomes `pip install 'orch[onnx]'`, not a traceback.

The core install (`pip install orch`) validates configs, keeps the cache and talks to MLflow; the extras carry
the heavy stacks (pyproject.toml: train, onnx, docker, azure, ui). tests/test_packaging.py checks this table
against pyproject, so a library moved between extras cannot leave a wrong hint behind.
"""

from __future__ import annotations

# import name (top level, or a dotted prefix) -> (distribution, extra)
EXTRA_OF: dict[str, tuple[str, str]] = {
    "torch": ("torch", "train"),
    "transformers": ("transformers", "train"),
    "peft": ("peft", "train"),
    "accelerate": ("accelerate", "train"),
    "datasets": ("datasets", "train"),
    "tokenizers": ("tokenizers", "train"),
    "trl": ("trl", "train"),
    "gguf": ("gguf", "train"),
    "safetensors": ("safetensors", "train"),
    "pyarrow": ("pyarrow", "train"),
    "onnxruntime_genai": ("onnxruntime-genai", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),
    "onnxscript": ("onnxscript", "onnx"),
    "onnx_ir": ("onnx-ir", "onnx"),
    "onnx": ("onnx", "onnx"),
    "docker": ("docker", "docker"),
    "azure.ai.ml": ("azure-ai-ml", "azure"),
    "azure.identity": ("azure-identity", "azure"),
    "azure.keyvault": ("azure-keyvault-secrets", "azure"),
    "azure.storage.blob": ("azure-storage-blob", "azure"),
    "azure": ("azure-ai-ml", "azure"),
    "flask": ("mlflow", "ui"),  # the MLflow server and UI (`orch ui`): full mlflow, not the core's skinny client
}


def extra_for(module: str | None) -> tuple[str, str] | None:
    """(distribution, extra) for a module name that failed to import, by its longest known prefix; None when
    the module is no library an extra brings (then the ImportError is a bug, not a missing install)."""
    if not module:
        return None
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        found = EXTRA_OF.get(".".join(parts[:n]))
        if found is not None:
            return found
    return None


def install_hint(module: str | None) -> str | None:
    """`needs <dist>: pip install 'orch[<extra>]'` for a missing library, or None."""
    found = extra_for(module)
    if found is None:
        return None
    dist, extra = found
    return f"needs {dist}: pip install 'orch[{extra}]'"
