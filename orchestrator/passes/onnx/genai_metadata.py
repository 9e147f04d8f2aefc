"""ModelBuilder metadata_only (Olive's name): make an exported ONNX decoder graph an onnxruntime-genai model.

The graph (OnnxConversion, maybe OrtTransformersOptimization / a quantizer after it) is kept as it is;
onnxruntime-genai's builder writes genai_config.json and the tokenizer files from the config.json and tokenizer
saved beside it (its `config_only` mode), and the decoder's input/output names are then taken from the graph
itself, so the config always describes the graph it sits next to. The result must generate, and its logits
through onnxruntime-genai must equal the graph's own (plain onnxruntime) or the pass fails: that proves the KV
cache is fed the way the graph expects.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.core.fs import atomic_write_text, commit_dir, fresh_dir
from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import PassContext, PassError, PassOutput

OUTPUT_DIR = "model"
PARITY_IDS = [5, 9, 33, 12, 7, 100, 4, 8, 21, 17, 3, 44]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def graph_io(model_file: Path) -> tuple[dict[str, str], dict[str, str], str]:
    """genai_config's decoder inputs/outputs for this graph, and the KV dtype ("float"/"float16")."""
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    ins = [i for i in graph.input if i.name not in inits]
    names = {i.name for i in ins}
    outs = {o.name for o in graph.output}
    if "input_ids" not in names or "logits" not in outs:
        raise PassError(
            f"ModelBuilder metadata_only: {model_file.name} is not a decoder graph with input_ids -> logits "
            f"(inputs {sorted(names)[:6]}); export it with OnnxConversion"
        )
    if "past_key_values.0.key" not in names or "present.0.key" not in outs:
        raise PassError(
            "ModelBuilder metadata_only: the graph has no KV cache (past_key_values.N.key inputs / present.N.key "
            "outputs); onnxruntime-genai generates with a cache: export with orch's OnnxConversion (it adds one)"
        )
    inputs = {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key",
              "past_value_names": "past_key_values.%d.value"}  # fmt: skip
    for optional in ("attention_mask", "position_ids"):
        if optional in names:
            inputs[optional] = optional
    outputs = {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    kv = next(i for i in ins if i.name == "past_key_values.0.key")
    dtype = "float16" if kv.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else "float"
    return inputs, outputs, dtype


def write_genai_metadata(
    model: ModelArtifact,
    execution_provider: str,
    precision: str,
    ctx: PassContext,
    build_config: Callable[[Path, Path, dict[str, str]], None],
) -> PassOutput:
    """onnx folder in -> onnx_genai folder out: the same graph + genai_config.json + tokenizer files."""
    from orchestrator.passes.common import onnx_tools

    if model.format != "onnx":
        raise PassError(
            f"ModelBuilder metadata_only takes an ONNX graph (format 'onnx', from OnnxConversion), got "
            f"{model.format!r}; without metadata_only ModelBuilder builds from the HF checkpoint"
        )
    src = onnx_tools.onnx_model_file(model.path)
    src_dir = src.parent
    missing = [f for f in ("config.json",) if not (src_dir / f).is_file()]
    if missing or not any((src_dir / f).is_file() for f in TOKENIZER_FILES):
        raise PassError(
            "ModelBuilder metadata_only needs the model's config.json and tokenizer beside model.onnx: set "
            "save_metadata_for_token_generation: true in the OnnxConversion pass"
        )
    inputs, outputs, kv_dtype = graph_io(src)
    if (precision == "fp16") != (kv_dtype == "float16"):
        ctx.info(f"metadata_only: precision {precision} given; the graph's own types are kept (KV cache {kv_dtype})")
    tmp = fresh_dir(ctx.out_dir / OUTPUT_DIR)
    ctx.info(f"writing genai_config.json for {src.name} (config_only build for {execution_provider})")
    try:
        build_config(src_dir, tmp, {"config_only": "true", "hf_token": "false"})
    except PassError:
        raise
    except Exception as exc:  # the builder's own errors about the config are the user's to fix
        shutil.rmtree(tmp, ignore_errors=True)
        raise PassError(f"ModelBuilder metadata_only: onnxruntime-genai's builder failed: {exc}") from exc
    finally:
        shutil.rmtree(ctx.out_dir / ".builder_cache", ignore_errors=True)
    genai_path = tmp / "genai_config.json"
    genai = json.loads(genai_path.read_text())
    decoder = genai["model"]["decoder"]
    decoder.update(filename=src.name, inputs=inputs, outputs=outputs)
    genai["search"]["past_present_share_buffer"] = False  # the graph concatenates its cache
    atomic_write_text(genai_path, json.dumps(genai, indent=4))
    for item in src_dir.iterdir():  # the graph, its weights, and side files the builder did not write
        if item.is_file() and not (tmp / item.name).exists():
            shutil.copy2(item, tmp / item.name)
    metrics = check_metadata(tmp, src, execution_provider, ctx)
    final = ctx.out_dir / OUTPUT_DIR
    commit_dir(tmp, final)
    ctx.log_metrics(metrics)
    out = ModelArtifact(format="onnx_genai", path=OUTPUT_DIR, task=model.task, quantized=model.quantized)
    return PassOutput(model=out, metrics=metrics)


def check_metadata(model_dir: Path, graph: Path, execution_provider: str, ctx: PassContext) -> dict[str, Any]:
    """onnxruntime-genai's logits == the graph's own (plain onnxruntime) on a prompt, and greedy decoding through
    genai's KV cache == the full-sequence argmax; with an extracted adapter, both with it active and without."""
    from orchestrator.passes.onnx.extract_adapters import ADAPTER_FILE, load_adapter

    if execution_provider != "cpu":
        ctx.info(f"checks skipped: genai_config targets {execution_provider} and they run on CPU only")
        return {}
    metrics = _check_one(model_dir, graph, ctx, adapter=None)
    if (model_dir / ADAPTER_FILE).is_file():
        adapter = load_adapter(model_dir / ADAPTER_FILE)
        with_adapter = _check_one(model_dir, graph, ctx, adapter=adapter)
        metrics |= {f"adapter_{k}": v for k, v in with_adapter.items()}
    return metrics


def _check_one(model_dir: Path, graph: Path, ctx: PassContext, adapter: dict[str, Any] | None) -> dict[str, Any]:
    import numpy as np

    from orchestrator.passes.common import onnx_tools

    label = "with the adapter" if adapter is not None else "base"
    og_model = onnx_tools.GenaiModel(model_dir, "cpu", use_adapter=adapter is not None)
    got = np.asarray(og_model.logits(PARITY_IDS), dtype=np.float32)
    ref = onnx_tools.ort_logits(graph, PARITY_IDS, extra=adapter).astype(np.float32)
    diff = float(np.abs(got - ref).max())
    ctx.info(f"onnxruntime-genai vs the graph's own logits ({label}): max |diff| {diff:.3g}")
    if not diff < 1e-3:
        raise PassError(
            f"ModelBuilder metadata_only: onnxruntime-genai's logits ({label}) differ from the graph's by {diff:.3g}; "
            "the genai_config.json does not describe this graph"
        )
    prompt = PARITY_IDS[:4]
    new = og_model.generate_ids(prompt, 8)
    if not new:
        raise PassError("ModelBuilder metadata_only: the model loads but generates no tokens")
    full = onnx_tools.ort_logits(graph, prompt + new, extra=adapter)
    expected = [int(t) for t in np.argmax(full[len(prompt) - 1 : -1], axis=-1)]
    agree = sum(a == b for a, b in zip(expected, new, strict=True)) / len(new)
    ctx.info(f"og generated {len(new)} tokens ({label}); cached decoding == full-sequence argmax on {agree:.0%}")
    if agree < 1.0:
        raise PassError(
            f"ModelBuilder metadata_only: cached decoding through onnxruntime-genai ({label}) disagrees with the "
            f"graph's full-sequence logits ({agree:.0%} of tokens); the KV cache is not fed as the graph expects"
        )
    return {"genai_vs_graph_max_abs_diff": diff, "check_generated_tokens": float(len(new)),
            "cached_decode_agreement": agree}  # fmt: skip
