"""What the plain-ONNX passes (OnnxConversion, OrtTransformersOptimization, OnnxDynamicQuantization) share:
one model.onnx (+ one model.onnx.data) per folder, and the side files that travel with it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import PassError

DATA_NAME = "model.onnx.data"
PARITY_IDS = [5, 9, 33, 12, 7, 100, 4, 8, 21, 17, 3, 44]  # the prompt an int8 graph is compared on


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
    from orchestrator.passes.common import onnx_tools

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


def logits_shift(src: Path, dst: Path) -> dict[str, float]:
    """How far a quantized decoder graph's logits moved from its input graph's on PARITY_IDS (max abs diff),
    and how often the greedy token still agrees: int8 moves them, so this is reported, not asserted."""
    import numpy as np

    from orchestrator.passes.common import onnx_tools

    ref = onnx_tools.ort_logits(src, PARITY_IDS).astype(np.float32)
    got = onnx_tools.ort_logits(dst, PARITY_IDS).astype(np.float32)
    return {
        "logits_max_abs_diff_vs_input": float(np.abs(got - ref).max()),
        "greedy_token_agreement_vs_input": float((got.argmax(-1) == ref.argmax(-1)).mean()),
    }


def input_weight_nodes(proto: Any) -> list[str]:
    """Nodes whose weight is a graph input (a LoRA weight that ExtractAdapters made an input, with or without an
    empty default): a weight-only quantizer must leave them alone, or the adapter input is baked into constants
    (onnxruntime-genai then rejects the adapter: "Invalid input name")."""
    inputs = {i.name for i in proto.graph.input}
    return [n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
            and n.input[1] in inputs]  # fmt: skip
