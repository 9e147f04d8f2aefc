"""OnnxConversion (Olive's name): HF causal LM -> ONNX with torch's own exporter (TorchScript, or dynamo).

The graph takes input_ids + attention_mask (dynamic batch and sequence) and returns the full-sequence logits
(no KV cache: for KV-cached generation use ModelBuilder, which also fuses attention). Measured on the tiny
Phi-3: both exporters reproduce transformers to 3.6e-7; TorchScript exports in 0.3 s, dynamo in 6.6 s, so
Olive's default (use_dynamo_exporter false) stays the default. fp32 exports must match the transformers logits
(max |diff| < parity_tolerance) or the pass fails.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from orchestrator.job import ModelArtifact
from orchestrator.passes.base import Pass, PassConfig, PassContext, PassError, PassOutput, Requirements
from orchestrator.passes.onnx_common import resave

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
    merge_adapter_weights: bool = False  # an hf_adapter input: merge it in memory first (else refused)
    save_as_external_data: bool = True  # weights in model.onnx.data (one file: all_tensors_to_one_file)
    all_tensors_to_one_file: Literal[True] = True
    save_metadata_for_token_generation: bool = False
    device: Literal["cpu", "cuda"] = "cpu"  # where Olive traces; the graph is the same, orch traces on CPU
    parity_tolerance: float = 1e-4


def load_hf(model: ModelArtifact, merge: bool, dtype: str | None) -> object:
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype or "float32")
    hf = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch_dtype, trust_remote_code=model.trust_remote_code)
    if model.format == "hf_adapter":
        from peft import PeftModel

        hf = PeftModel.from_pretrained(hf, model.adapter_path).merge_and_unload()
    hf.config.use_cache = False  # a prefill graph: no KV cache inputs or outputs
    return hf.eval()


class OnnxConversionPass(Pass):
    type_name = "OnnxConversion"
    Config = OnnxConversionConfig
    version = "1"
    libraries = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript")

    def requirements(self, config: PassConfig) -> Requirements:
        return Requirements(cuda=False, environment="cpu-export")

    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        assert isinstance(config, OnnxConversionConfig)
        import numpy as np
        import torch

        from orchestrator import onnx_tools

        if model is None or model.format not in ("hf", "hf_adapter"):
            raise PassError(f"OnnxConversion exports HF checkpoints, got {model.format if model else 'no model'!r}")
        if model.format == "hf_adapter" and not config.merge_adapter_weights:
            raise PassError(
                "OnnxConversion got a LoRA adapter: set merge_adapter_weights: true (or add MergeAdapterWeights)"
            )
        hf = load_hf(model, config.merge_adapter_weights, config.torch_dtype)
        if config.device == "cuda":
            ctx.info("device cuda: traced on CPU instead (the exported graph does not depend on the device)")

        class Logits(torch.nn.Module):
            def __init__(self, inner: torch.nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

        wrapped = Logits(hf).eval()
        ids = torch.tensor([PARITY_IDS[:8]])
        mask = torch.ones_like(ids)
        tmp = ctx.out_dir / f".{OUTPUT_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        dst = tmp / "model.onnx"
        names = {"input_names": ["input_ids", "attention_mask"], "output_names": ["logits"]}
        ctx.info(f"exporting with torch.onnx ({'dynamo' if config.use_dynamo_exporter else 'TorchScript'})")
        with torch.no_grad():
            if config.use_dynamo_exporter:
                batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
                shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
                torch.onnx.export(wrapped, (ids, mask), str(dst), dynamo=True, dynamic_shapes=shapes,
                                  opset_version=config.target_opset, external_data=True, **names)  # fmt: skip
            else:
                axes = {n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask", "logits")}
                torch.onnx.export(wrapped, (ids, mask), str(dst), dynamo=False, dynamic_axes=axes,
                                  opset_version=config.target_opset, **names)  # fmt: skip
        resave(dst, external=config.save_as_external_data)
        if config.save_metadata_for_token_generation:
            for name in METADATA:
                if (Path(model.path) / name).is_file():
                    shutil.copy2(Path(model.path) / name, tmp / name)
        # parity vs transformers on a longer sequence than the one traced (the axes must really be dynamic)
        with torch.no_grad():
            ref = wrapped(torch.tensor([PARITY_IDS]), torch.ones(1, len(PARITY_IDS), dtype=torch.long)).float().numpy()
        got = onnx_tools.ort_logits(dst, PARITY_IDS).astype(np.float32)
        diff = float(np.abs(got - ref[0]).max())  # ort_logits: (seq, vocab) of the one sequence
        metrics = {"parity_max_abs_diff": diff, "model_size_bytes": float(onnx_tools.model_size_bytes(dst))}
        ctx.info(f"ONNX vs transformers logits: max |diff| {diff:.3g}")
        if (config.torch_dtype or "float32") == "float32" and not diff < config.parity_tolerance:
            raise PassError(f"OnnxConversion: exported logits differ from transformers by {diff:.3g}")
        final = ctx.out_dir / OUTPUT_DIR
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        ctx.log_metrics(metrics)
        return PassOutput(model=ModelArtifact(format="onnx", path=OUTPUT_DIR, task=model.task), metrics=metrics)
