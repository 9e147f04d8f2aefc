"""OnnxConversion (Olive's name): HF causal LM -> ONNX with torch's own exporter (TorchScript, or dynamo).

The graph is Olive's decoder export with KV cache: inputs input_ids, attention_mask (past + new positions),
position_ids and past_key_values.<layer>.key/value (batch, kv_heads, past, head_dim; empty for a prompt);
outputs logits and present.<layer>.key/value. So one graph serves prompt processing and token generation
(Olive's dummy-data latency metrics, ModelBuilder metadata_only). Measured on the tiny Phi-3: both exporters
reproduce transformers to 3.6e-7; TorchScript exports in 0.3 s, dynamo in 6.6 s, so Olive's default
(use_dynamo_exporter false) stays the default. fp32 exports must match the transformers logits of a prompt and
of one cached decode step (max |diff| < parity_tolerance) or the pass fails.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from orchestrator.core.fs import commit_dir, fresh_dir
from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import Pass, PassConfig, PassContext, PassError, PassOutput, Requirements
from orchestrator.passes.common.onnx_common import resave

OUTPUT_DIR = "model"
PARITY_IDS = [5, 9, 33, 12, 7, 100, 4, 8, 21, 17, 3, 44]
# files a later pass (or a person) needs to tokenize for this graph: Olive's save_metadata_for_token_generation
METADATA = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")  # fmt: skip


class OnnxConversionConfig(PassConfig):
    """Olive's OnnxConversion fields that mean something for an HF causal LM on this exporter."""

    target_opset: int = 17
    use_dynamo_exporter: bool = False
    torch_dtype: Literal["float32", "float16"] | None = None
    merge_adapter_weights: bool = False  # an hf_adapter input: merge it in memory first (else LoRA MatMuls stay)
    save_as_external_data: bool = True  # weights in model.onnx.data (one file: all_tensors_to_one_file)
    all_tensors_to_one_file: Literal[True] = True
    save_metadata_for_token_generation: bool = False
    device: Literal["cpu", "cuda"] = "cpu"  # where Olive traces; the graph is the same, orch traces on CPU
    parity_tolerance: float = 1e-4


SDPA_MIN_OPSET = 14  # torch exports scaled_dot_product_attention from opset 14 on


def load_hf(model: ModelArtifact, merge: bool, dtype: str | None, opset: int = 17) -> object:
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype or "float32")
    # below opset 14 the attention is exported as its plain ops (eager: the same function), as transformers did
    # when Olive's older examples (target_opset 13) were written
    extra = {"attn_implementation": "eager"} if opset < SDPA_MIN_OPSET else {}
    hf = AutoModelForCausalLM.from_pretrained(
        model.path, dtype=torch_dtype, trust_remote_code=model.trust_remote_code, **extra
    )
    if model.format == "hf_adapter":
        from peft import PeftModel

        hf = PeftModel.from_pretrained(hf, model.adapter_path)
        # merged: one plain graph; unmerged (Olive's default): the LoRA A/B MatMuls stay beside each adapted
        # projection, so ExtractAdapters can lift them out as a swappable adapter
        hf = hf.merge_and_unload() if merge else hf
    return hf.eval()


def kv_layout(config: Any) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def kv_decoder(inner: Any) -> Any:
    """Wrap an HF causal LM for export; the class is made here so that importing this module needs no torch."""
    import torch

    class KVDecoder(torch.nn.Module):
        """HF causal LM with its KV cache as flat tensors: (ids, mask, positions, past...) -> (logits, present...)."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any) -> tuple[Any, ...]:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.inner.config)
            for i in range(len(past) // 2):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.inner(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True,
            )  # fmt: skip
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return KVDecoder(inner)


def kv_parity(hf: Any, onnx_path: Path, ids: list[int]) -> tuple[float, float]:
    """max |logits diff| vs transformers: of a prompt (all but the last id, empty cache) and of one cached
    decode step (the last id after the prompt's present tensors), so both uses of the graph are checked."""
    import numpy as np
    import onnxruntime as ort
    import torch

    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float().numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    kv_inputs = [i for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    layers, kv_heads, head_dim = kv_layout(hf.config)
    float_type = np.float16 if kv_inputs and kv_inputs[0].type == "tensor(float16)" else np.float32
    n = len(ids) - 1
    feed = {"input_ids": np.asarray([ids[:n]], np.int64), "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None]}  # fmt: skip
    for i in kv_inputs:
        feed[i.name] = np.zeros((1, kv_heads, 0, head_dim), float_type)
    out = sess.run(None, feed)
    prompt_diff = float(np.abs(out[0][0].astype(np.float32) - ref[:n]).max())
    feed = {"input_ids": np.asarray([[ids[n]]], np.int64), "attention_mask": np.ones((1, n + 1), np.int64),
            "position_ids": np.asarray([[n]], np.int64)}  # fmt: skip
    for i, value in zip(kv_inputs, out[1:], strict=True):
        feed[i.name] = value
    step = sess.run(None, feed)
    return prompt_diff, float(np.abs(step[0][0, 0].astype(np.float32) - ref[n]).max())


class OnnxConversionPass(Pass):
    type_name = "OnnxConversion"
    Config = OnnxConversionConfig
    version = "1"
    libraries = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript")

    def requirements(self, config: PassConfig) -> Requirements:
        return Requirements(cuda=False, environment="cpu-export")

    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        assert isinstance(config, OnnxConversionConfig)
        import torch

        from orchestrator.passes.common import onnx_tools
        from orchestrator.passes.onnx import quantized_export

        if model is None or model.format not in ("hf", "hf_adapter"):
            raise PassError(f"OnnxConversion exports HF checkpoints, got {model.format if model else 'no model'!r}")
        if model.format == "hf_adapter" and model.quantized:
            ctx.info("QLoRA adapter: exported over the base model's full-precision weights (as Olive does)")
        if model.format == "hf_adapter":
            how = "merged into the weights" if config.merge_adapter_weights else "kept unmerged (A/B MatMuls)"
            ctx.info(f"LoRA adapter {how}")
        linears = None
        if model.format == "hf" and quantized_export.quant_method(model.path) is not None:
            # an AWQ/GPTQ/Olive int4 checkpoint: exported from its dequantized weights, then each quantized
            # Linear becomes a MatMulNBits holding the checkpoint's own codes (Olive exports its QuantLinear so)
            hf = quantized_export.load_dequantized(model.path)
            hf = hf.half() if config.torch_dtype == "float16" else hf
            linears = quantized_export.quant_linears(model.path)
        else:
            hf = load_hf(model, config.merge_adapter_weights, config.torch_dtype, config.target_opset)
            if config.target_opset < SDPA_MIN_OPSET:
                ctx.info(f"target_opset {config.target_opset}: attention exported as plain ops (eager attention)")
        if config.device == "cuda":
            ctx.info("device cuda: traced on CPU instead (the exported graph does not depend on the device)")

        wrapped = kv_decoder(hf).eval()
        layers, kv_heads, head_dim = kv_layout(hf.config)
        dtype = next(hf.parameters()).dtype
        ids = torch.tensor([PARITY_IDS[:4]])
        traced_past = 3  # traced with a non-empty cache; the axes are dynamic, empty past works too (checked)
        mask = torch.ones(1, traced_past + ids.shape[1], dtype=torch.long)
        pos = torch.arange(traced_past, traced_past + ids.shape[1])[None]
        past = [torch.zeros(1, kv_heads, traced_past, head_dim, dtype=dtype) for _ in range(2 * layers)]
        tmp = fresh_dir(ctx.out_dir / OUTPUT_DIR)
        dst = tmp / "model.onnx"
        past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        input_names = ["input_ids", "attention_mask", "position_ids", *past_names]
        names = {"input_names": input_names, "output_names": ["logits", *present_names]}
        ctx.info(f"exporting with torch.onnx ({'dynamo' if config.use_dynamo_exporter else 'TorchScript'}), KV cache")
        with torch.no_grad():
            if config.use_dynamo_exporter:
                auto = torch.export.Dim.AUTO
                kv = tuple([{0: auto, 2: auto}] * len(past))  # *past is one tuple argument to torch.export
                shapes = [{0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}, kv]
                torch.onnx.export(wrapped, (ids, mask, pos, *past), str(dst), dynamo=True, dynamic_shapes=shapes,
                                  opset_version=config.target_opset, external_data=True, **names)  # fmt: skip
            else:
                axes = {
                    "input_ids": {0: "batch_size", 1: "sequence_length"},
                    "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
                    "position_ids": {0: "batch_size", 1: "sequence_length"},
                    "logits": {0: "batch_size", 1: "sequence_length"},
                    **{n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names},
                    **{n: {0: "batch_size", 2: "total_sequence_length"} for n in present_names},
                }
                torch.onnx.export(wrapped, (ids, mask, pos, *past), str(dst), dynamo=False, dynamic_axes=axes,
                                  opset_version=config.target_opset, **names)  # fmt: skip
        resave(dst, external=config.save_as_external_data)
        if linears is not None:
            replaced, left = quantized_export.to_matmulnbits(dst, hf, linears)
            if not replaced:
                raise PassError("OnnxConversion: no quantized Linear of the checkpoint was found in the exported graph")
            ctx.info(f"{replaced} quantized Linear(s) exported as MatMulNBits with the checkpoint's codes, scales and "
                     "zero points" + (f"; kept float: {', '.join(left)}" if left else ""))  # fmt: skip
            if not config.save_as_external_data:
                resave(dst, external=False)
        if config.save_metadata_for_token_generation:
            for name in METADATA:
                if (Path(model.path) / name).is_file():
                    shutil.copy2(Path(model.path) / name, tmp / name)
        prompt_diff, step_diff = kv_parity(hf, dst, PARITY_IDS)
        diff = max(prompt_diff, step_diff)
        metrics = {"parity_max_abs_diff": diff, "model_size_bytes": float(onnx_tools.model_size_bytes(dst))}
        ctx.info(f"ONNX vs transformers logits: max |diff| {prompt_diff:.3g} (prompt), {step_diff:.3g} (cached step)")
        if (config.torch_dtype or "float32") == "float32" and not diff < config.parity_tolerance:
            raise PassError(f"OnnxConversion: exported logits differ from transformers by {diff:.3g}")
        final = ctx.out_dir / OUTPUT_DIR
        commit_dir(tmp, final)
        ctx.log_metrics(metrics)
        return PassOutput(model=ModelArtifact(format="onnx", path=OUTPUT_DIR, task=model.task), metrics=metrics)


class OptimumMergingConfig(PassConfig):
    """Olive's OptimumMerging: its keys are the external-data ones, noted by the reader."""


class OptimumMergingPass(Pass):
    """Olive's OptimumMerging joins Optimum's decoder and decoder-with-past graphs into one. orch's export
    (OnnxConversion, which OptimumConversion maps to) is already that one graph: the model passes through,
    linked into the pass's output folder."""

    type_name = "OptimumMerging"
    Config = OptimumMergingConfig
    version = "1"
    libraries = ("onnx",)

    def requirements(self, config: PassConfig) -> Requirements:
        return Requirements(cuda=False, environment="cpu-export")

    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        import os

        if model is None or model.format != "onnx":
            got = model.format if model else "no model"
            raise PassError(f"OptimumMerging merges an exported decoder (format 'onnx'), got {got!r}")
        src = Path(model.path)
        tmp = fresh_dir(ctx.out_dir / OUTPUT_DIR)
        for f in (src.iterdir() if src.is_dir() else [src]):
            if f.is_file():
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        commit_dir(tmp, ctx.out_dir / OUTPUT_DIR)
        ctx.info("the exported decoder is already one graph for the prompt and the cached steps: nothing to merge")
        return PassOutput(model=ModelArtifact(format="onnx", path=OUTPUT_DIR, task=model.task), metrics={})
