"""Rtn, Olive >= 0.10's PyTorch-level round-to-nearest pass: quantizes what is still full precision (after Gptq:
the LM head with `lm_head`, the token embedding with `embeds`; on a plain checkpoint every decoder Linear too)
into the same Olive checkpoint (olive_quant's layout), with per-module bits / group_size from `overrides`.

On a Gptq output the checkpoint's global bits stay Gptq's; each module Rtn quantizes at other bits than that
gets an override entry, so the builder resolves every module's bits from config.json alone. The embedding is
quantized on the LM head's grid (same rows, same groups): with tied embeddings the two are the same tensor, which
GraphSurgeries TieWordEmbeddings then shares in the ONNX model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import Pass, PassConfig, PassContext, PassError, PassOutput
from orchestrator.passes.common import olive_quant as oq


class RtnConfig(PassConfig):
    bits: int = 4
    sym: bool = False
    group_size: int = 128
    lm_head: bool = False
    embeds: bool = False
    overrides: dict[str, dict[str, int]] = Field(default_factory=dict)  # module name -> {bits, group_size}


class RtnPass(Pass):
    type_name: ClassVar[str] = "Rtn"
    Config: ClassVar[type[PassConfig]] = RtnConfig
    version: ClassVar[str] = "1"
    libraries: ClassVar[tuple[str, ...]] = ("torch", "safetensors")

    @classmethod
    def config_problems(cls, config: PassConfig) -> list[str]:
        assert isinstance(config, RtnConfig)
        out = []
        all_bits = {config.bits, *(int(o.get("bits", config.bits)) for o in config.overrides.values())}
        if not all_bits <= {4, 8}:
            out.append(f"Rtn: bits {sorted(all_bits)}: the Olive checkpoint onnxruntime-genai reads holds 4 or 8")
        bad = sorted(k for o in config.overrides.values() for k in o if k not in ("bits", "group_size"))
        if bad:
            out.append(f"Rtn: overrides keys {', '.join(bad)} are not supported (bits, group_size)")
        return out

    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        assert isinstance(config, RtnConfig)
        for msg in self.config_problems(config):
            raise PassError(msg)
        if model is None or model.format != "hf":
            raise PassError("Rtn needs an HF checkpoint (format hf: full precision or a Gptq output) as input")
        hf_dir = Path(model.path)
        cfg = oq.read_config(hf_dir)
        quant = oq.olive_quant_config(cfg)
        if model.quantized and quant is None:
            raise PassError("Rtn: the input is quantized but not in the Olive format (quant_method olive)")
        state = oq.load_state(hf_dir)
        decision = cfg.get(oq.MIXED_PRECISION_KEY) or {}
        if quant is None:
            quant = {"quant_method": "olive", "bits": config.bits, "group_size": config.group_size,
                     "sym": config.sym, "desc_act": False, "overrides": {}}  # fmt: skip
        quant = {**quant, "overrides": dict(quant.get("overrides", {}))}
        overrides = {k: dict(v) for k, v in decision.get("overrides", {}).items()}
        for k, v in config.overrides.items():
            overrides.setdefault(k, {}).update(v)
        embed = state.get("model.embed_tokens.weight")
        if "lm_head.weight" not in state and embed is not None and (config.lm_head or config.embeds):
            state["lm_head.weight"] = embed.clone()  # tied checkpoints save the shared tensor once
        targets = [n.removesuffix(".weight") for n in oq.linear_names(state)]
        targets += ["lm_head"] * config.lm_head + ["model.embed_tokens"] * config.embeds
        done: list[str] = []
        errors: dict[str, float] = {}
        for name in targets:
            w = state.get(f"{name}.weight")
            if w is None or f"{name}.qweight" in state:
                continue
            bits = int(overrides.get(name, {}).get("bits", config.bits))
            gs = oq.layer_group_size(w.shape[1], int(overrides.get(name, {}).get("group_size", config.group_size)))
            tensors, errors[name] = oq.rtn_module(w, bits, gs, config.sym)
            del state[f"{name}.weight"]
            state.update({f"{name}.{k}": t for k, t in tensors.items()})
            if bits != quant["bits"] or gs != quant["group_size"]:
                quant["overrides"][name] = {"bits": bits, "group_size": gs}
            done.append(f"{name} ({bits} bits, groups of {gs})")
        if not done:
            raise PassError("Rtn: nothing left to quantize (set lm_head / embeds, or give a full-precision model)")
        extra: dict[str, Any] = {oq.MIXED_PRECISION_KEY: decision or None}
        if config.lm_head and config.embeds and "model.embed_tokens.qweight" in state:
            extra["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
        oq.write_checkpoint(hf_dir, state, quant, ctx.out_dir / "model", extra)
        ctx.info(f"Rtn: {', '.join(done)}; largest relative error {max(errors.values()):.2e}")
        artifact = ModelArtifact(
            format="hf", path="model", task=model.task, trust_remote_code=model.trust_remote_code, quantized=True
        )
        return PassOutput(model=artifact, metrics={"rtn_quantized_modules": float(len(done))})
