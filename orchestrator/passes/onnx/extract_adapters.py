"""ExtractAdapters (Olive's name): the LoRA weights of an ONNX graph become model inputs, saved beside the model
as `adapter_weights.onnx_adapter` (onnxruntime's AdapterFormat), so one base model serves many adapters.

The input is a ModelBuilder folder built from an adapter (hf_adapter input: the builder emits a LoRA_A/LoRA_B
MatMul pair beside every adapted MatMul, kept in float even in an int4 build). Each LoRA weight initializer is
renamed as Olive names it (`/model/layers.0/attn/q_proj/lora_A/MatMul` -> `model.layers.0.attn.q_proj.lora_A.weight`),
turned into a graph input with a dynamic `lora_r` dimension, and (optional_inputs) given an empty default, so
the model runs as the base model when no adapter is active. onnxruntime-genai loads the file with og.Adapters
and binds it by name (`generator.set_active_adapter(adapters, name)`), as the Phi cookbook's app does.

`convert_peft_adapter` writes the same file straight from a PEFT folder (`orch convert-adapters`): the builder's
names, weights transposed to ONNX's [in, out], LoRA scaling folded into B, and Phi-3's fused qkv_proj /
gate_up_proj split the way the builder splits them (A shared, B by rows). tests/test_adapters.py checks both
against transformers + peft.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator

from orchestrator.core.fs import commit_dir, fresh_dir
from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import Pass, PassConfig, PassContext, PassError, PassOutput, Requirements
from orchestrator.passes.common.onnx_common import (  # noqa: F401  (load_adapter re-exported: the adapter reader)
    ADAPTER_FILE,
    NUMPY_FILE,
    SAFETENSORS_FILE,
    load_adapter,
)

FILES = {"onnx_adapter": ADAPTER_FILE, "numpy": NUMPY_FILE, "safetensors": SAFETENSORS_FILE}
# the builder's LoRA MatMul names (make_matmul_lora): /model/layers.{i}/{attn|mlp}/{proj}/lora_{A|B}/MatMul
LORA_NODE = re.compile(r"^/model/layers\.(\d+)/(\w+)/(\w+)/lora_([AB])/MatMul(_Q4|_Q8)?$")
# the projections the builder can put LoRA on, by block (Phi-3's fused ones are split into these)
BUILDER_PROJECTIONS = {"attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def weight_name(node_name: str) -> str:
    """Olive's ExtractAdapters name for a LoRA node's weight: /model/layers.0/attn/q_proj/lora_A/MatMul ->
    model.layers.0.attn.q_proj.lora_A.weight."""
    parts = node_name.lstrip("/").split("/")
    return ".".join([*parts[:-1], "weight"])


def peft_export_lora_nodes(graph: Any) -> dict[str, str]:
    """LoRA MatMuls of a torch-exported PEFT model (OnnxConversion of an unmerged adapter) -> weight names.

    TorchScript drops the lora_A / lora_B module names, so they are found by shape of the graph: beside each
    `<scope>/base_layer/MatMul`, lora_A is the other MatMul of the same scope on the same input, and lora_B the
    MatMul that consumes lora_A's output. Names as Olive gives them: model.layers.0.self_attn.qkv_proj.lora_A.weight.
    """
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    by_input: dict[str, list[Any]] = {}
    for n in matmuls:
        by_input.setdefault(n.input[0], []).append(n)
    out: dict[str, str] = {}
    for base in (n for n in matmuls if n.name.endswith("/base_layer/MatMul")):
        scope = base.name[: -len("/base_layer/MatMul")]
        a = next((n for n in by_input.get(base.input[0], []) if n is not base and n.name.startswith(scope + "/")), None)
        b = next((n for n in by_input.get(a.output[0], []) if n.name.startswith(scope + "/")), None) if a else None
        if a is None or b is None:
            continue
        module = scope[scope.index("model/layers.") :] if "model/layers." in scope else scope.lstrip("/")
        prefix = module.replace("/", ".")
        out[a.name] = f"{prefix}.lora_A.weight"
        out[b.name] = f"{prefix}.lora_B.weight"
    return out


def lora_node_names(num_layers: int) -> list[str]:
    """Every LoRA MatMul name the builder can emit: given to it as nodes_to_exclude so int4/int8 builds keep the
    adapter weights float (a swappable adapter; names the model lacks are ignored by the builder)."""
    return [
        f"/model/layers.{i}/{block}/{proj}/lora_{ab}/MatMul"
        for i in range(num_layers)
        for block, projs in BUILDER_PROJECTIONS.items()
        for proj in projs
        for ab in "AB"
    ]


def save_adapter(weights: dict[str, Any], path: Path) -> Path:
    """name -> numpy array, as onnxruntime's AdapterFormat (.onnx_adapter) or numpy .npz (Olive's two formats)."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez(path, **weights)
        return path
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(path))
        return path
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()})
    fmt.export_adapter(str(path))
    return path


def extract(
    model_dir: Path,
    out_dir: Path,
    *,
    dynamic_lora_r: bool = True,
    optional_inputs: bool = True,
    save_format: str = "onnx_adapter",
) -> dict[str, Any]:
    """model_dir's model.onnx with its LoRA weights as inputs -> out_dir (the folder's other files copied),
    plus the adapter file. Returns the weights written."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from orchestrator.passes.common.onnx_tools import onnx_model_file

    src = model_dir / "model.onnx"
    if not src.is_file():
        try:
            src = onnx_model_file(model_dir)
        except (FileNotFoundError, KeyError, ValueError):
            raise PassError(f"ExtractAdapters: {model_dir} has no ONNX model") from None
    proto = onnx.load(str(src))
    inits = {t.name: t for t in proto.graph.initializer}
    weights: dict[str, Any] = {}
    quantized = []
    names = {n.name: weight_name(n.name) for n in proto.graph.node if LORA_NODE.match(n.name)}
    names |= peft_export_lora_nodes(proto.graph)
    for node in proto.graph.node:
        if node.name not in names:
            continue
        if node.op_type != "MatMul":
            quantized.append(node.name)
            continue
        old = node.input[1]
        if old not in inits:  # already an input
            continue
        new = names[node.name]
        weights[new] = numpy_helper.to_array(inits[old])
        node.input[1] = new
    if quantized:
        raise PassError(
            f"ExtractAdapters: {len(quantized)} LoRA MatMul(s) are quantized (e.g. {quantized[0]}); orch extracts "
            "float LoRA weights: build from the adapter with orch's ModelBuilder, which keeps them float"
        )
    if not weights:
        raise PassError(
            f"ExtractAdapters: no LoRA MatMul in {src} (ModelBuilder's /model/layers.N/.../lora_A/MatMul, or a PEFT "
            "projection's base_layer beside its A/B MatMuls): build or export the model from an adapter, unmerged"
        )
    used = {i for n in proto.graph.node for i in n.input}
    keep = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    for name, arr in weights.items():
        is_a = ".lora_A." in name
        dim = 1 if is_a else 0
        shape: list[Any] = list(arr.shape)
        if dynamic_lora_r:
            shape[dim] = "lora_r"
        proto.graph.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), shape))
        if optional_inputs:  # an empty default (lora_r = 0): the base model when no adapter is active
            empty_shape = list(arr.shape)
            empty_shape[dim] = 0
            proto.graph.initializer.append(numpy_helper.from_array(np.zeros(empty_shape, arr.dtype), name))
    tmp = fresh_dir(out_dir)
    for f in model_dir.iterdir():
        if f.is_file() and f.name not in (src.name, f"{src.name}.data", "model.onnx.data", *FILES.values()):
            shutil.copy2(f, tmp / f.name)
    onnx.save(proto, str(tmp / src.name), save_as_external_data=True, location=f"{src.name}.data")
    save_adapter(weights, tmp / FILES[save_format])
    commit_dir(tmp, out_dir)
    return weights


def adapter_type(adapter_dir: Path) -> str:
    """A PEFT folder's adapter kind: lora, dora (LoRA with use_dora), loha, lokr, ... ("lora" when unreadable:
    the reader of the weights reports that)."""
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return "lora"
    kind = str(cfg.get("peft_type", "LORA")).lower()
    return "dora" if kind == "lora" and cfg.get("use_dora") else kind


def _split_rows(b: Any, sizes: list[int]) -> list[Any]:
    out, start = [], 0
    for size in sizes:
        out.append(b[start : start + size])
        start += size
    return out


def convert_peft_adapter(adapter_dir: Path, hf_config: dict[str, Any] | None = None, dtype: str = "float32") -> dict:
    """A PEFT LoRA folder -> {builder weight name: array}, the weights ExtractAdapters would write for a model
    ModelBuilder built from that adapter. `hf_config` (the base model's config.json) sizes Phi-3's fused splits."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise PassError(f"convert-adapters: {adapter_dir} has no adapter_config.json (not a PEFT adapter folder)")
    cfg = json.loads(cfg_path.read_text())
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise PassError(f"convert-adapters: peft_type {cfg.get('peft_type')!r}: only LoRA adapters are supported")
    if cfg.get("use_dora"):
        raise PassError("convert-adapters: DoRA adapters are not supported (the builder has no DoRA subgraph)")
    files = [adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin"]
    path = next((f for f in files if f.is_file()), None)
    if path is None:
        raise PassError(f"convert-adapters: {adapter_dir} has no adapter_model.safetensors")
    state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu")
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    if rank_pattern or alpha_pattern:
        raise PassError("convert-adapters: rank_pattern / alpha_pattern adapters are not supported")
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    key = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
    pairs: dict[tuple[int, str, str], dict[str, Any]] = {}
    for name, tensor in state.items():
        m = key.match(name)
        if not m:
            raise PassError(f"convert-adapters: weight {name!r} is not a LoRA weight of a decoder layer projection")
        layer, block, proj, ab = int(m[1]), "attn" if m[2] == "self_attn" else "mlp", m[3], m[4]
        pairs.setdefault((layer, block, proj), {})[ab] = tensor.float()
    hf = hf_config or {}
    heads = hf.get("num_attention_heads")
    head_dim = hf.get("head_dim") or (hf["hidden_size"] // heads if heads and hf.get("hidden_size") else None)
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    out: dict[str, Any] = {}
    for (layer, block, proj), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise PassError(f"convert-adapters: layer {layer} {proj} has lora_{''.join(ab)} only")
        a, b = ab["A"], ab["B"] * scaling  # torch [r, in] / [out, r]; the builder folds scaling into B
        if proj == "qkv_proj":
            if not heads or not head_dim:
                raise PassError(
                    "convert-adapters: a fused qkv_proj needs the base model's config.json (--model_name_or_path)"
                )
            q, kv = heads * head_dim, hf.get("num_key_value_heads", heads) * head_dim
            parts = dict(zip(("q_proj", "k_proj", "v_proj"), _split_rows(b, [q, kv, kv]), strict=True))
        elif proj == "gate_up_proj":
            half = b.shape[0] // 2
            parts = {"gate_proj": b[:half], "up_proj": b[half:]}
        else:
            parts = {proj: b}
        for name, b_part in parts.items():
            if name not in BUILDER_PROJECTIONS[block]:
                raise PassError(f"convert-adapters: LoRA on {block}.{proj} has no place in the builder's graph")
            base = f"model.layers.{layer}.{block}.{name}"
            out[f"{base}.lora_A.weight"] = a.T.contiguous().numpy().astype(np_dtype)
            out[f"{base}.lora_B.weight"] = b_part.T.contiguous().numpy().astype(np_dtype)
    if not out:
        raise PassError(f"convert-adapters: {path} holds no LoRA weights")
    return out


class ExtractAdaptersConfig(PassConfig):
    """Olive's fields. make_inputs=False (weights as external initializers bound through SessionOptions) has no
    onnxruntime-genai loader, so it is refused; only LoRA adapters are built by ModelBuilder."""

    adapter_type: Literal["lora", "dora", "loha"] = "lora"  # Olive's AdapterType; only lora is extracted here
    make_inputs: bool = True
    dynamic_lora_r: bool = True
    optional_inputs: bool = True
    save_format: Literal["onnx_adapter", "numpy", "safetensors"] = "onnx_adapter"

    @field_validator("make_inputs")
    @classmethod
    def _inputs_only(cls, v: bool) -> bool:
        if not v:
            raise ValueError(
                "make_inputs false (adapter weights as external initializers) is not supported: onnxruntime-genai "
                "binds adapters as model inputs (og.Adapters); drop make_inputs"
            )
        return v


def not_lora_problem(adapter_type: str) -> str:
    return (
        f"ExtractAdapters adapter_type {adapter_type}: a {adapter_type.upper()} adapter is not lifted out as ONNX "
        "inputs here (onnxruntime-genai's adapters are LoRA A/B pairs with an empty default); merge it into the "
        "model before export (MergeAdapterWeights) and drop ExtractAdapters"
    )


class ExtractAdaptersPass(Pass):
    """onnx_genai folder with LoRA MatMuls -> the same folder with LoRA inputs + adapter_weights.onnx_adapter."""

    type_name = "ExtractAdapters"
    Config = ExtractAdaptersConfig
    version = "1"
    libraries = ("onnx", "onnxruntime", "onnxruntime-genai")

    def requirements(self, config: PassConfig) -> Requirements:
        return Requirements(cuda=False, environment="cpu-export")

    @classmethod
    def config_problems(cls, config: PassConfig) -> list[str]:
        assert isinstance(config, ExtractAdaptersConfig)
        return [] if config.adapter_type == "lora" else [not_lora_problem(config.adapter_type)]

    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        assert isinstance(config, ExtractAdaptersConfig)
        if config.adapter_type != "lora":
            raise PassError(not_lora_problem(config.adapter_type))
        if model is None or model.format not in ("onnx_genai", "onnx"):
            got = "no model" if model is None else f"format {model.format!r}"
            raise PassError(f"ExtractAdapters needs an ONNX model built from an adapter (ModelBuilder), got {got}")
        out = ctx.out_dir / "model"
        weights = extract(
            Path(model.path), out, dynamic_lora_r=config.dynamic_lora_r, optional_inputs=config.optional_inputs,
            save_format=config.save_format,
        )  # fmt: skip
        file = out / FILES[config.save_format]
        ctx.info(f"{len(weights)} LoRA weights -> model inputs; adapter written to model/{file.name}")
        metrics = {"adapter_weights": float(len(weights)), "adapter_bytes": float(file.stat().st_size)}
        ctx.log_metrics(metrics)
        return PassOutput(model=model.model_copy(update={"path": "model"}), metrics=metrics)
