"""SelectiveMixedPrecision (Olive >= 0.10): decide which decoder Linear layers keep `high_bits` (8) while the rest
get `bits` (4). It quantizes nothing: the decision goes to config.json (`olive_mixed_precision`: bits, high_bits,
group_size, sym, overrides {module: {bits}}) for the Gptq / Rtn passes after it, which write it into the Olive
checkpoint's quantization_config.overrides (what onnxruntime-genai's builder reads), and to mixed_precision.json.

Algorithms (Olive's names):
- k_quant_mixed: llama.cpp's "use more bits" rule, as ORT's k_quant_mixed: the attention value projection
  (v_proj or the fused qkv_proj) and down_proj of layer i get high_bits when i < n/8, i >= 7n/8, or
  (i - n/8) % 3 == 2.
- k_quant_down: the same layers' down_proj only (Olive's k_quant_down).
- k_quant_last: only the LM head is high-bit: no decoder layer changes (Rtn's lm_head override carries it).
- kld_gradient: every decoder Linear is round-to-nearest quantized to `bits` at once; the KL divergence of the
  quantized model's next-token distribution from the fp32 one, over the calibration texts, is back-propagated to
  the quantized weights; a layer's score is |grad . (W - Q(W))|, the first-order KL saved by keeping it in full
  precision. The highest-scoring (1 - ratio) share of the layers get high_bits; `ratio` of them stay low-bit.
  It needs calibration data (`data_config`); without one, Olive's default: wikitext-2-raw-v1 train from the hub.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from orchestrator.core.fs import atomic_dir
from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import Pass, PassConfig, PassContext, PassError, PassOutput
from orchestrator.passes.common import olive_quant as oq


class SelectiveMixedPrecisionConfig(PassConfig):
    algorithm: Literal["kld_gradient", "k_quant_mixed", "k_quant_down", "k_quant_last"] = "kld_gradient"
    high_group_size: int | None = None  # Olive's: the high-bit layers' group size (None: group_size)
    high_sym: bool | None = None  # Olive's: see config_problems (the Olive checkpoint keeps one sym for all layers)
    bits: Literal[4, 8] = 4
    high_bits: Literal[4, 8] = 8
    ratio: float = Field(0.65, ge=0, le=1)  # share of the ranked layers that stay at `bits` (kld_gradient)
    sym: bool = False
    group_size: int = 128
    data_config: str | None = None
    num_calibration_samples: int = Field(32, gt=0)
    max_seq_len: int = Field(256, gt=8)


class SelectiveMixedPrecisionPass(Pass):
    type_name: ClassVar[str] = "SelectiveMixedPrecision"
    Config: ClassVar[type[PassConfig]] = SelectiveMixedPrecisionConfig
    version: ClassVar[str] = "1"
    libraries: ClassVar[tuple[str, ...]] = ("torch", "transformers")

    @classmethod
    def config_problems(cls, config: PassConfig) -> list[str]:
        assert isinstance(config, SelectiveMixedPrecisionConfig)
        out = []
        if config.high_bits <= config.bits:
            out.append(f"SelectiveMixedPrecision: high_bits ({config.high_bits}) must exceed bits ({config.bits})")
        return out

    @classmethod
    def default_data_config(cls, config: PassConfig) -> dict[str, Any] | None:
        """kld_gradient without data_config: Olive's default calibration set (wikitext-2-raw-v1 train, hub)."""
        from orchestrator.passes.common.data import WIKITEXT2_TRAIN

        assert isinstance(config, SelectiveMixedPrecisionConfig)
        return WIKITEXT2_TRAIN if config.algorithm == "kld_gradient" and config.data_config is None else None

    @classmethod
    def config_notes(cls, config: PassConfig) -> list[str]:
        assert isinstance(config, SelectiveMixedPrecisionConfig)
        if config.high_sym is not None and config.high_sym != config.sym:
            return ["SelectiveMixedPrecision: high_sym differs from sym: the Olive checkpoint keeps one sym for every "
                    "layer (overrides carry bits and group_size); drop high_sym"]  # fmt: skip
        if config.algorithm != "kld_gradient" and "ratio" in config.model_fields_set:
            return [f"SelectiveMixedPrecision: ratio is used by kld_gradient only, not by {config.algorithm}"]
        return []

    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        assert isinstance(config, SelectiveMixedPrecisionConfig)
        if model is None or model.format != "hf" or model.quantized:
            raise PassError("SelectiveMixedPrecision needs a full-precision HF checkpoint (format hf) as input")
        for msg in self.config_problems(config):
            raise PassError(msg)
        hf_dir = Path(model.path)
        state = oq.load_state(hf_dir)
        names = oq.linear_names(state)
        n_layers = 1 + max(int(n.split(".")[2]) for n in names)
        scores: dict[str, float] = {}
        if config.algorithm in ("k_quant_mixed", "k_quant_down"):
            high = k_quant_mixed(names, n_layers, down_only=config.algorithm == "k_quant_down")
        elif config.algorithm == "k_quant_last":
            high = []
        else:
            if config.data_config is None:  # the workflow reader names Olive's default; a bare Job may lack it
                raise PassError("SelectiveMixedPrecision kld_gradient needs calibration data: set data_config")
            texts = oq.calibration_texts(ctx, config.data_config, config.num_calibration_samples, self.type_name)
            scores = kld_gradient_scores(hf_dir, texts, config, model.trust_remote_code)
            ranked = sorted(scores, key=lambda n: -scores[n])
            n_high = len(ranked) - round(config.ratio * len(ranked))
            high = sorted(ranked[:n_high], key=names.index)
        high_cfg: dict[str, int] = {"bits": config.high_bits}
        if config.high_group_size:
            high_cfg["group_size"] = config.high_group_size
        overrides = {n: dict(high_cfg) for n in high}
        decision = {
            "algorithm": config.algorithm,
            "bits": config.bits,
            "high_bits": config.high_bits,
            "group_size": config.group_size,
            "sym": config.sym,
            "overrides": overrides,
        }
        dest = ctx.out_dir / "model"
        with atomic_dir(dest) as tmp:
            for f in hf_dir.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
            cfg = oq.read_config(hf_dir)
            cfg[oq.MIXED_PRECISION_KEY] = decision
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        lines = [f"{n}: {config.high_bits if n in overrides else config.bits} bits" for n in names]
        if scores:
            lines = [f"{line} (score {scores[n]:.3e})" for line, n in zip(lines, names, strict=True)]
        report = {**decision, "layers": lines}
        (ctx.out_dir / oq.MIXED_PRECISION_FILE).write_text(json.dumps(report, indent=2))
        ctx.info(f"SelectiveMixedPrecision ({config.algorithm}): {len(high)} of {len(names)} layers at "
                 f"{config.high_bits} bits: {', '.join(high) or 'none'}")  # fmt: skip
        return PassOutput(
            model=ModelArtifact(format="hf", path="model", task=model.task, trust_remote_code=model.trust_remote_code),
            metrics={"high_bit_layers": float(len(high)), "layers": float(len(names))},
        )


def k_quant_mixed(names: list[str], n_layers: int, *, down_only: bool = False) -> list[str]:
    """llama.cpp / ORT k_quant_mixed: value and down projections of the first/last eighth and every third layer
    (k_quant_down: the down projections only)."""

    def more_bits(i: int) -> bool:
        return i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2

    kinds = ("mlp.down_proj",) if down_only else ("self_attn.v_proj", "self_attn.qkv_proj", "mlp.down_proj")
    return [n for n in names if more_bits(int(n.split(".")[2])) and n.split(".", 3)[3] in kinds]


def kld_gradient_scores(
    hf_dir: Path, texts: list[str], config: SelectiveMixedPrecisionConfig, trust_remote_code: bool
) -> dict[str, float]:
    """Per decoder Linear: |dKL/dW . (W - Q(W))| with every layer quantized to config.bits (see the module doc)."""
    import torch
    import torch.nn.functional as F

    model, tok = oq.load_fp_model(hf_dir, trust_remote_code)
    batches = oq.token_batches(tok, texts, config.max_seq_len)
    with torch.no_grad():
        ref = [F.log_softmax(model(input_ids=ids).logits.float(), dim=-1) for ids in batches]
    modules = dict(model.named_modules())
    names = oq.linear_names({k: v for k, v in model.state_dict().items()})
    deltas: dict[str, Any] = {}
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        w = modules[name].weight
        gs = oq.layer_group_size(w.shape[1], config.group_size)
        scale, zero = oq.qparams(w.detach(), config.bits, gs, config.sym)
        codes = oq.quantize_codes(w.detach(), scale, zero, config.bits, gs)
        q = (codes - zero.repeat_interleave(gs, 1)) * scale.repeat_interleave(gs, 1)
        deltas[name] = w.detach() - q
        modules[name].weight = torch.nn.Parameter(q, requires_grad=True)
    for ids, lp_ref in zip(batches, ref, strict=True):
        lp = F.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
        loss = F.kl_div(lp, lp_ref, log_target=True, reduction="batchmean") / len(batches)
        loss.backward()
    return {n: float((modules[n].weight.grad * deltas[n]).sum().abs()) for n in names}
