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
# ExtractAdapters' adapter file beside the model, in each of Olive's save formats (onnxruntime's AdapterFormat first)
ADAPTER_FILE = "adapter_weights.onnx_adapter"
NUMPY_FILE = "adapter_weights.npz"
SAFETENSORS_FILE = "adapter_weights.safetensors"
ADAPTER_FILES = (ADAPTER_FILE, NUMPY_FILE, SAFETENSORS_FILE)


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


def load_adapter(path: Path) -> dict[str, Any]:
    """An adapter file (.onnx_adapter, .npz or .safetensors) -> name -> numpy array."""
    import numpy as np

    if path.suffix == ".npz":
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    import onnxruntime as ort

    fmt = ort.AdapterFormat.read_adapter(str(path))
    return {k: np.array(v.numpy(), copy=True) for k, v in fmt.get_parameters().items()}  # copies: fmt owns the data


def adapter_beside(model_file: Path) -> dict[str, Any] | None:
    """The LoRA weights ExtractAdapters wrote next to a model with adapter inputs, or None."""
    found = next((model_file.parent / n for n in ADAPTER_FILES if (model_file.parent / n).is_file()), None)
    return load_adapter(found) if found is not None else None


def logits_shift(src: Path, dst: Path) -> dict[str, float]:
    """How far a quantized decoder graph's logits moved from its input graph's on PARITY_IDS (max abs diff),
    and how often the greedy token still agrees: int8 moves them, so this is reported, not asserted.

    A model with LoRA adapter inputs (ExtractAdapters) is compared twice: as the base model (the inputs empty)
    and with its adapter file fed (`..._with_adapter`), which is how it is served."""
    import numpy as np

    from orchestrator.passes.common import onnx_tools

    def shift(extra: dict[str, Any] | None, suffix: str) -> dict[str, float]:
        ref = onnx_tools.ort_logits(src, PARITY_IDS, extra=extra).astype(np.float32)
        got = onnx_tools.ort_logits(dst, PARITY_IDS, extra=extra).astype(np.float32)
        return {
            f"logits_max_abs_diff_vs_input{suffix}": float(np.abs(got - ref).max()),
            f"greedy_token_agreement_vs_input{suffix}": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        }

    adapter = adapter_beside(onnx_tools.onnx_model_file(src))
    return {**shift(None, ""), **(shift(adapter, "_with_adapter") if adapter is not None else {})}


def input_weight_nodes(proto: Any) -> list[str]:
    """Nodes whose weight is a graph input (a LoRA weight that ExtractAdapters made an input, with or without an
    empty default): a weight-only quantizer must leave them alone, or the adapter input is baked into constants
    (onnxruntime-genai then rejects the adapter: "Invalid input name")."""
    inputs = {i.name for i in proto.graph.input}
    return [n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
            and n.input[1] in inputs]  # fmt: skip
