"""MergeAdapterWeights (Olive's name): fold a PEFT adapter (LoRA, DoRA, LoHa, LoKr) into its base and save a
plain HF checkpoint.

The merge is checked, not trusted: every wrapped layer's weight is compared before and after, and an adapter that
changes nothing (an untrained LoRA has B = 0) is an error rather than a silent copy of the base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

from orchestrator.core.fs import atomic_dir
from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import Pass, PassConfig, PassContext, PassError, PassOutput, Requirements

MODEL_DIR = "model"


class MergeConfig(PassConfig):
    """Olive's MergeAdapterWeights takes no options."""


class MergeAdapterWeightsPass(Pass):
    type_name: ClassVar[str] = "MergeAdapterWeights"
    Config: ClassVar[type[PassConfig]] = MergeConfig
    version: ClassVar[str] = "1"
    libraries: ClassVar[tuple[str, ...]] = ("torch", "transformers", "peft", "safetensors")

    def requirements(self, config: PassConfig) -> Requirements:
        return Requirements(environment="cpu-train")

    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        if model is None or model.format != "hf_adapter" or not model.adapter_path:
            got = "no model" if model is None else f"a {model.format} model without an adapter"
            raise PassError(f"MergeAdapterWeights needs an hf_adapter model (a LoRA output), got {got}")
        base_path, adapter_path = Path(model.path), Path(model.adapter_path)
        base_cfg = json.loads((base_path / "config.json").read_text())
        quant = base_cfg.get("quantization_config")
        if model.quantized or quant:
            method = (quant or {}).get("quant_method", "quantized")
            raise PassError(
                f"merge needs an unquantized base model: load the fp16/fp32 base, not the {method} checkpoint "
                f"at {base_path}; point the adapter at the original base (QLoRA trains on the unquantized base)"
            )

        import torch
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # Merge in fp32 on CPU (exact, and works with no GPU), save in the base's own dtype.
        base = AutoModelForCausalLM.from_pretrained(
            base_path, dtype=torch.float32, trust_remote_code=model.trust_remote_code
        )
        save_dtype = getattr(torch, str(base_cfg.get("dtype") or base_cfg.get("torch_dtype") or "float32"))
        peft_model = PeftModel.from_pretrained(base, adapter_path)
        changed, unchanged, max_delta = 0, [], 0.0
        with torch.no_grad():
            for name, layer in peft_model.named_modules():
                if not isinstance(layer, BaseTunerLayer):
                    continue
                weight = layer.get_base_layer().weight
                before = weight.detach().clone()  # one layer at a time: no second copy of the whole model
                try:
                    layer.merge(safe_merge=True)
                except ValueError as exc:  # peft's NaN check
                    raise PassError(f"adapter {adapter_path} breaks {name}: {exc}") from None
                delta = (weight - before).abs().max().item()
                max_delta = max(max_delta, delta)
                changed, unchanged = (changed + 1, unchanged) if delta > 0 else (changed, [*unchanged, name])
        if changed == 0:
            raise PassError(
                f"adapter is a no-op: merging {adapter_path} changes no weight of the base (an untrained LoRA has "
                "lora_B = 0); train it first (LoRA pass with max_steps > 0 and a non-zero learning_rate)"
            )
        if unchanged:
            ctx.info(f"merge: {len(unchanged)} adapted layers unchanged (e.g. {unchanged[0]})")
        merged = peft_model.unload().to(save_dtype)  # layers already merged above: unload only strips the wrappers

        tokenizer_src = adapter_path if (adapter_path / "tokenizer_config.json").exists() else base_path
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_src, trust_remote_code=model.trust_remote_code)
        dest = ctx.out_dir / MODEL_DIR
        with atomic_dir(dest) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)  # config, safetensors, generation_config.json
            tokenizer.save_pretrained(tmp)
        metrics = {
            "changed_tensors": float(changed),
            "max_abs_delta": max_delta,
            "unchanged_tensors": float(len(unchanged)),
        }
        ctx.log_metrics(metrics)
        out = ModelArtifact(format="hf", path=MODEL_DIR, task=model.task, trust_remote_code=model.trust_remote_code)
        return PassOutput(model=out, metrics=metrics)
