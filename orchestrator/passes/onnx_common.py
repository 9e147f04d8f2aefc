"""What the plain-ONNX passes (OnnxConversion, OrtTransformersOptimization, OnnxDynamicQuantization) share:
one model.onnx (+ one model.onnx.data) per folder, and the side files that travel with it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import PassError

DATA_NAME = "model.onnx.data"


def save_one_data_file(proto: Any, dst: Path, *, external: bool = True) -> None:
    """Write proto to dst with all weights in dst.parent/model.onnx.data (or inline); no stray data files."""
    import onnx

    for stale in dst.parent.glob("*.data"):
        stale.unlink()
    if external:
        onnx.save_model(proto, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=DATA_NAME)
        (dst.parent / DATA_NAME).chmod(0o644)
    else:
        onnx.save_model(proto, str(dst))


def resave(dst: Path, *, external: bool = True) -> None:
    """An exporter's output (inline or one file per tensor) -> the one-data-file layout."""
    import onnx

    proto = onnx.load(str(dst), load_external_data=True)
    for extra in dst.parent.iterdir():
        if extra != dst and extra.suffix != ".json" and extra.is_file():
            extra.unlink()
    save_one_data_file(proto, dst, external=external)


def onnx_input(model: ModelArtifact | None, pass_name: str) -> Path:
    """The .onnx file of an 'onnx' input (a plain ONNX folder); one line when the input is something else."""
    from orchestrator.passes import onnx_tools

    if model is None or model.format != "onnx":
        got = "no model" if model is None else f"format {model.format!r}"
        hint = (
            "an onnxruntime-genai folder is already optimized (fused by ModelBuilder)"
            if model is not None and model.format == "onnx_genai"
            else "add an OnnxConversion pass before it"
        )
        raise PassError(f"{pass_name} works on plain ONNX models (format 'onnx'), got {got}: {hint}")
    return onnx_tools.onnx_model_file(model.path)


def copy_side_files(src_dir: Path, dst_dir: Path) -> None:
    """Tokenizer / config files next to the input model travel to the output."""
    for item in src_dir.iterdir():
        if item.is_file() and item.suffix != ".onnx" and not item.name.endswith(".data"):
            shutil.copy2(item, dst_dir / item.name)
