"""Inputs for Olive's dummy data containers: random token ids of fixed shapes for an ONNX graph's inputs.

Olive's TransformersPromptDummyDataContainer (prompt processing: seq_len 8, no past) and
TransformersTokenDummyDataContainer (token generation: seq_len 1 after past_seq_len 8 cached positions) feed a
decoder graph; DummyDataContainer feeds named inputs of given shapes. Shapes the graph leaves symbolic (KV heads,
head size) come from the graph when static, else from config.json beside it. Seeded: the same feeds each run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from orchestrator.passes.base import PassError

# Olive's defaults per container: (seq_len, past_seq_len)
DEFAULT_SHAPES = {
    "TransformersPromptDummyDataContainer": (8, 0),
    "TransformersTokenDummyDataContainer": (1, 8),
}
NUMPY_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(int32)": "int32",
    "tensor(bool)": "bool", "float32": "float32", "float16": "float16", "int64": "int64", "int32": "int32",
    "float": "float32", "bool": "bool",
}  # fmt: skip


class GraphInput(NamedTuple):
    """One graph input as onnxruntime reports it: name, type ("tensor(float)"), shape (ints or symbols)."""

    name: str
    type: str
    shape: Sequence[Any]


def session_inputs(session: Any) -> list[GraphInput]:
    return [GraphInput(i.name, i.type, list(i.shape)) for i in session.get_inputs()]


def dummy_inputs(
    data_config: dict[str, Any], inputs: Sequence[GraphInput], model_dir: Path | None = None, *, seed: int = 0
) -> list[dict[str, Any]]:
    """max_samples feeds (dicts of numpy arrays) for a graph with `inputs`; PassError (one line) when the
    container's inputs do not fit the graph (e.g. past_seq_len > 0 for a graph without KV cache inputs)."""
    import numpy as np

    kind = data_config.get("type")
    params = data_config.get("load_dataset_config") or {}
    name = data_config.get("name", "?")
    rng = np.random.default_rng(seed)
    samples = int(params.get("max_samples") or 32)
    if kind == "DummyDataContainer":
        return [_named_inputs(params, inputs, rng, name) for _ in range(samples)]
    if kind not in DEFAULT_SHAPES:
        raise PassError(f"data config {name!r} ({kind}) is not a dummy data container")
    seq_default, past_default = DEFAULT_SHAPES[kind]
    seq = int(params.get("seq_len") or seq_default)
    past = int(params["past_seq_len"]) if params.get("past_seq_len") is not None else past_default
    if seq + past > int(params.get("max_seq_len") or 2048):
        raise PassError(f"data config {name!r}: seq_len + past_seq_len ({seq + past}) exceeds max_seq_len")
    config = _model_config(model_dir)
    vocab = _vocab_size(inputs, config)
    key_name = str(params.get("ort_past_key_name") or "past_key_values.<id>.key")
    value_name = str(params.get("ort_past_value_name") or "past_key_values.<id>.value")
    past_names = _past_names(inputs, key_name, value_name)
    if past > 0 and not past_names:
        raise PassError(
            f"data config {name!r} ({kind}) feeds {past} cached positions, but the graph has no "
            f"{key_name.replace('<id>', 'N')} inputs: set load_dataset_config.past_seq_len 0, or export the model "
            "with its KV cache (OnnxConversion does)"
        )
    use_fp16 = params.get("use_fp16")
    feeds = []
    for _ in range(samples):
        feed: dict[str, Any] = {}
        for inp in inputs:
            dtype = NUMPY_TYPES.get(inp.type, "int64")
            if inp.name == "input_ids":
                feed[inp.name] = rng.integers(0, vocab, size=(1, seq)).astype(dtype)
            elif inp.name == "attention_mask":
                feed[inp.name] = np.ones((1, past + seq), dtype=dtype)
            elif inp.name == "position_ids":
                feed[inp.name] = np.arange(past, past + seq, dtype=dtype)[None, :]
            elif inp.name in past_names:
                if use_fp16 is not None and use_fp16 != (dtype == "float16"):
                    raise PassError(
                        f"data config {name!r}: use_fp16 {str(use_fp16).lower()} but the graph's {inp.name} is "
                        f"{inp.type}; set use_fp16 {str(dtype == 'float16').lower()} (or drop it)"
                    )
                heads, head_dim = _kv_dims(inp, config)
                feed[inp.name] = rng.standard_normal((1, heads, past, head_dim)).astype(dtype)
            else:
                raise PassError(
                    f"data config {name!r} ({kind}) does not know graph input {inp.name!r}; use DummyDataContainer "
                    "with input_names / input_shapes / input_types for this graph"
                )
        feeds.append(feed)
    return feeds


def _named_inputs(params: dict[str, Any], inputs: Sequence[GraphInput], rng: Any, name: str) -> dict[str, Any]:
    import numpy as np

    names = params.get("input_names") or []
    shapes = params.get("input_shapes") or []
    types = params.get("input_types") or ["float32"] * len(names)
    graph = {i.name for i in inputs}
    missing = sorted(graph - set(names))
    if missing or set(names) - graph:
        raise PassError(
            f"data config {name!r} (DummyDataContainer): input_names {names} must be the graph's inputs "
            f"{sorted(graph)}"
        )
    feed = {}
    for n, shape, t in zip(names, shapes, types, strict=True):
        dtype = NUMPY_TYPES.get(str(t))
        if dtype is None:
            known = sorted(set(NUMPY_TYPES.values()))
            raise PassError(f"data config {name!r}: input_types {t!r} is not one of {known}")
        if dtype.startswith("float"):
            feed[n] = rng.standard_normal(shape).astype(dtype)
        else:
            feed[n] = np.ones(shape, dtype=dtype)
    return feed


def _model_config(model_dir: Path | None) -> dict[str, Any]:
    """config.json beside the graph (an OnnxConversion folder), else the same numbers from genai_config.json."""
    import json

    if model_dir is None:
        return {}
    if (model_dir / "config.json").is_file():
        return json.loads((model_dir / "config.json").read_text())
    if (model_dir / "genai_config.json").is_file():
        model = json.loads((model_dir / "genai_config.json").read_text())["model"]
        decoder = model.get("decoder", {})
        return {"vocab_size": model.get("vocab_size"), "head_dim": decoder.get("head_size"),
                "num_key_value_heads": decoder.get("num_key_value_heads")}  # fmt: skip
    return {}


def _vocab_size(inputs: Sequence[GraphInput], config: dict[str, Any]) -> int:
    vocab = config.get("vocab_size")
    return int(vocab) if isinstance(vocab, int) and vocab > 0 else 2  # ids 0/1 exist in every vocabulary


def _past_names(inputs: Sequence[GraphInput], key_name: str, value_name: str) -> set[str]:
    import re

    patterns = [re.compile("^" + re.escape(p).replace(re.escape("<id>"), r"\d+") + "$") for p in (key_name, value_name)]
    return {i.name for i in inputs if any(p.match(i.name) for p in patterns)}


def _kv_dims(inp: GraphInput, config: dict[str, Any]) -> tuple[int, int]:
    heads, head_dim = inp.shape[1], inp.shape[3]
    if not isinstance(heads, int):
        heads = config.get("num_key_value_heads") or config.get("num_attention_heads")
    if not isinstance(head_dim, int):
        head_dim = config.get("head_dim") or (
            config["hidden_size"] // config["num_attention_heads"] if config.get("num_attention_heads") else None
        )
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        raise PassError(
            f"graph input {inp.name!r} has symbolic KV dims {list(inp.shape)} and no config.json beside the model "
            "says num_key_value_heads / head size: keep config.json next to model.onnx "
            "(OnnxConversion save_metadata_for_token_generation)"
        )
    return heads, head_dim
