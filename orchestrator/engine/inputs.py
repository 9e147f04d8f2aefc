"""The workflow's input model as the engine sees it: which format a model folder holds."""

from __future__ import annotations

from pathlib import Path


def model_format(path: str | Path, *, has_adapter: bool = False) -> str:
    """hf, hf_adapter (a base + an adapter), onnx_genai (a genai_config.json beside the graph) or onnx."""
    path = Path(path)
    fmt = "hf_adapter" if has_adapter else "hf"
    if path.is_dir() and (path / "genai_config.json").exists():
        fmt = "onnx_genai"
    elif path.is_dir() and any(path.glob("*.onnx")) or str(path).endswith(".onnx"):
        fmt = "onnx"
    return fmt
