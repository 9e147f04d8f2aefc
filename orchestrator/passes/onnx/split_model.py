"""SplitModel (Olive's name, with CaptureSplitInfo's num_splits): an onnxruntime-genai model in N pipeline parts.

The decoder graph built by ModelBuilder is cut between decoder layers (optionally also after the embeddings and
before the LM head: unique_embeds_lm_head_splits), each part extracted with onnx's own Extractor and saved as
model_split_<i>.onnx with its weights; genai_config.json becomes a "decoder-pipeline" whose stages pass the
residual stream on by name, each stage owning the KV cache of its layers. A user splits to fit a model into
several smaller sessions / devices. Checked: the parts run one after another in plain onnxruntime reproduce the
whole graph's logits, and on CPU onnxruntime-genai generates the same tokens from the pipeline as from the whole.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from orchestrator.core.fs import atomic_write_text, commit_dir, fresh_dir
from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import Pass, PassConfig, PassContext, PassError, PassOutput, Requirements

OUTPUT_DIR = "model"
PARITY_IDS = [5, 9, 33, 12, 7, 100, 4, 8]
KV_LAYER = re.compile(r"^(?:past_key_values|present)\.(\d+)\.")


class SplitModelConfig(PassConfig):
    """num_splits layer groups (Olive's CaptureSplitInfo.num_splits); embeddings / LM head as parts of their own."""

    num_splits: int = Field(2, ge=2)
    unique_embeds_lm_head_splits: bool = False
    parity_tolerance: float = 1e-4

    @field_validator("num_splits", mode="before")
    @classmethod
    def _int(cls, v: Any) -> Any:
        return int(v) if isinstance(v, str) and v.isdigit() else v


def layer_count(graph: Any) -> int:
    return 1 + max(int(m.group(1)) for i in graph.input if (m := KV_LAYER.match(i.name)))


def cut_points(graph: Any, layers: int, num_splits: int, unique_ends: bool) -> list[tuple[str, list[str]]]:
    """(name, tensors crossing the cut) at each boundary, in order: the layer starts that split `layers` into
    num_splits even groups, plus the embeddings' output and the LM head's input when unique_ends."""
    nodes = {n.name: n for n in graph.node}
    if num_splits > layers:
        raise PassError(f"SplitModel: num_splits {num_splits} > the model's {layers} decoder layers; use <= {layers}")
    cuts: list[tuple[str, list[str]]] = []
    first = nodes.get("/model/layers.0/input_layernorm/LayerNorm")
    final = next((n for n in graph.node if n.name.endswith("final_norm_layernorm/SkipLayerNorm")), None)
    if first is None or final is None:
        raise PassError(
            "SplitModel: the graph is not one of onnxruntime-genai's ModelBuilder decoders (no "
            "/model/layers.0/input_layernorm node); split a ModelBuilder output"
        )
    if unique_ends:
        cuts.append(("embeddings", [first.input[0]]))
    bounds = [round(i * layers / num_splits) for i in range(1, num_splits)]
    for k in bounds:
        start = nodes.get(f"/model/layers.{k}/input_layernorm/SkipLayerNorm")
        if start is None:
            raise PassError(f"SplitModel: layer {k}'s input_layernorm is not a SkipLayerNorm; cannot cut there")
        cuts.append((f"layers_{k}", list(start.input[:2])))
    if unique_ends:
        cuts.append(("lm_head", [final.output[0]]))
    return cuts


def split_graph(src: Path, dst: Path, config: SplitModelConfig) -> list[dict[str, Any]]:
    """Write the parts into dst; returns each stage's {name, filename, inputs, outputs}."""
    import onnx
    from onnx.utils import Extractor

    model = onnx.load(str(src))
    graph = model.graph
    layers = layer_count(graph)
    cuts = cut_points(graph, layers, config.num_splits, config.unique_embeds_lm_head_splits)
    graph_inputs = [i.name for i in graph.input]
    graph_outputs = [o.name for o in graph.output]
    extractor = Extractor(model)
    # layer range owned by each part: from its cut's layer (embeddings / lm_head parts own none)
    starts = [0] + [int(n.split("_")[1]) if n.startswith("layers_") else (0 if n == "embeddings" else layers)
                    for n, _ in cuts]  # fmt: skip
    ends = starts[1:] + [layers]
    stages = []
    for i in range(len(cuts) + 1):
        lo, hi = starts[i], ends[i]

        def owned(name: str, lo: int = lo, hi: int = hi) -> bool:
            m = KV_LAYER.match(name)
            return m is None or lo <= int(m.group(1)) < hi

        inputs = [n for n in graph_inputs if owned(n) and (i == 0 or n != "input_ids")]
        inputs += cuts[i - 1][1] if i > 0 else []
        outputs = [n for n in graph_outputs if n != "logits" and owned(n) and KV_LAYER.match(n)]
        outputs = outputs + cuts[i][1] if i < len(cuts) else ["logits", *outputs]
        part = extractor.extract_model(inputs, outputs)
        used = {t for n in part.graph.node for t in n.input} | set(outputs)
        kept = [x for x in part.graph.input if x.name in used]
        del part.graph.input[:]
        part.graph.input.extend(kept)
        filename = f"model_split_{i}.onnx"
        onnx.save_model(part, str(dst / filename), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{filename}.data")  # fmt: skip
        inputs = [x.name for x in kept]
        stages.append({"name": f"split_{i}", "filename": filename, "inputs": inputs, "outputs": outputs})
    return stages


def pipeline_logits_diff(whole: Path, parts: Path, stages: list[dict[str, Any]], ids: list[int]) -> float | None:
    """max |logits diff| of the parts run in sequence vs the whole graph (plain onnxruntime on CPU, empty past);
    None when CPU onnxruntime cannot run this graph (e.g. an fp16 build for CUDA)."""
    import numpy as np
    import onnxruntime as ort

    from orchestrator.passes.common import onnx_tools

    try:
        ref = onnx_tools.ort_logits(whole, ids)
    except Exception:  # noqa: BLE001 - kernels this build lacks on CPU: the check cannot run here
        return None
    first = ort.InferenceSession(str(whole), providers=["CPUExecutionProvider"])
    feeds = _empty_feeds(first, ids, whole.parent)
    values: dict[str, Any] = dict(feeds)
    for stage in stages:
        sess = ort.InferenceSession(str(parts / stage["filename"]), providers=["CPUExecutionProvider"])
        out = sess.run(stage["outputs"], {n: values[n] for n in stage["inputs"]})
        values.update(zip(stage["outputs"], out, strict=True))
    got = np.asarray(values["logits"], dtype=np.float32)[0]
    return float(np.abs(got - ref.astype(np.float32)).max())


def _empty_feeds(sess: Any, ids: list[int], model_dir: Path) -> dict[str, Any]:
    import numpy as np

    from orchestrator.passes.common.dummy_data import dummy_inputs, session_inputs

    prompt = {"name": "parity", "type": "TransformersPromptDummyDataContainer",
              "load_dataset_config": {"seq_len": len(ids), "past_seq_len": 0, "max_samples": 1}}  # fmt: skip
    feed = dummy_inputs(prompt, session_inputs(sess), model_dir)[0]
    feed["input_ids"] = np.asarray([ids], dtype=feed["input_ids"].dtype)
    return feed


class SplitModelPass(Pass):
    """onnx_genai folder -> the same model as a decoder pipeline of num_splits (+2) ONNX parts."""

    type_name = "SplitModel"
    Config = SplitModelConfig
    version = "1"
    libraries = ("onnx", "onnxruntime", "onnxruntime-genai")

    def requirements(self, config: PassConfig) -> Requirements:
        return Requirements(cuda=False, environment="cpu-export")

    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        assert isinstance(config, SplitModelConfig)
        from orchestrator.passes.common import onnx_tools

        if model is None or model.format != "onnx_genai":
            got = "no model" if model is None else f"format {model.format!r}"
            raise PassError(f"SplitModel splits an onnxruntime-genai model (ModelBuilder output), got {got}")
        src_dir = Path(model.path)
        genai = json.loads((src_dir / "genai_config.json").read_text())
        decoder = genai["model"]["decoder"]
        if "pipeline" in decoder:
            raise PassError("SplitModel: the model is already a pipeline; split the ModelBuilder output once")
        src = src_dir / decoder["filename"]
        tmp = fresh_dir(ctx.out_dir / OUTPUT_DIR)
        ctx.info(f"splitting {src.name} into {config.num_splits} layer groups" +
                 (" + embeddings + LM head" if config.unique_embeds_lm_head_splits else ""))  # fmt: skip
        stages = split_graph(src, tmp, config)
        for stage in stages:
            ctx.info(f"{stage['filename']}: {len(stage['inputs'])} inputs -> {len(stage['outputs'])} outputs")
        for item in src_dir.iterdir():  # tokenizer, configs: everything but the whole graph and its weights
            if item.is_file() and item.name != src.name and not item.name.startswith(src.name + "."):
                shutil.copy2(item, tmp / item.name)
        decoder.pop("filename")
        decoder["pipeline"] = [{
            s["name"]: {"filename": s["filename"], "inputs": s["inputs"], "outputs": s["outputs"],
                        "run_on_prompt": True, "run_on_token_gen": True}
            for s in stages
        }]  # fmt: skip
        genai["model"]["type"] = "decoder-pipeline"
        atomic_write_text(tmp / "genai_config.json", json.dumps(genai, indent=4))
        metrics: dict[str, float] = {"num_parts": float(len(stages))}
        diff = pipeline_logits_diff(src, tmp, stages, PARITY_IDS)
        if diff is None:
            ctx.info("parts vs whole: not checked (CPU onnxruntime cannot run this build)")
        else:
            ctx.info(f"parts run in sequence vs the whole graph: max |logits diff| {diff:.3g}")
            metrics["parts_vs_whole_max_abs_diff"] = diff
            if not diff < config.parity_tolerance:
                raise PassError(f"SplitModel: the parts' logits differ from the whole graph's by {diff:.3g}")
        providers = [next(iter(p)) for p in decoder.get("session_options", {}).get("provider_options", [])]
        if not providers or providers == ["cpu"]:
            whole = onnx_tools.GenaiModel(src_dir).generate_ids(PARITY_IDS, 8)
            split = onnx_tools.GenaiModel(tmp).generate_ids(PARITY_IDS, 8)
            ctx.info(f"onnxruntime-genai pipeline generated {split} (whole model: {whole})")
            if split != whole:
                raise PassError("SplitModel: the pipeline generates other tokens than the whole model")
            metrics["pipeline_generated_tokens"] = float(len(split))
        else:
            ctx.info(f"onnxruntime-genai check skipped: the model targets {', '.join(providers)}")
        final = ctx.out_dir / OUTPUT_DIR
        commit_dir(tmp, final)
        ctx.log_metrics(metrics)
        out = ModelArtifact(format="onnx_genai", path=OUTPUT_DIR, task=model.task, quantized=model.quantized)
        return PassOutput(model=out, metrics=metrics)
