"""Gptq, Olive >= 0.10's PyTorch GPTQ pass: writes the Olive quantized checkpoint (olive_quant's layout) with
per-layer bits from SelectiveMixedPrecision's decision, which onnxruntime-genai's builder reads.

Why not llm-compressor (orch's GptqQuantizer): it lives in a separate environment (gpu-quantize: transformers
5.17, llm-compressor's supported range; orch's export stack pins 5.23, so it is not in the CPU export venv), it
needs a compressed-tensors -> Olive conversion on top, and per-layer bit widths need one scheme group per layer.
The GPTQ update itself is short (Frantar et al.: damped Hessian of each Linear's inputs, its upper Cholesky
inverse, column-by-column rounding with the error spread over the columns not yet quantized), so it is done here
in torch, on CPU, in the export environment, and checked: every layer's output error on the calibration inputs
must not exceed round-to-nearest's (else that layer keeps the RTN codes, said in the log).

The Hessians are collected from the full-precision model in one pass (not layer-by-layer on the quantized
prefix): simpler, and the difference is small for the 4/8-bit mixes this flow makes. The LM head and the
embeddings are left in full precision for Rtn (Olive's flow: gptq then rtn with lm_head / embeds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import Pass, PassConfig, PassContext, PassError, PassOutput
from orchestrator.passes.common import olive_quant as oq


class OliveGptqConfig(PassConfig):
    bits: int = 4
    sym: bool = False
    group_size: int = 128
    damp_percent: float = Field(0.01, gt=0, lt=1)
    data_config: str | None = None
    num_calibration_samples: int = Field(32, gt=0)
    max_seq_len: int = Field(256, gt=8)
    overrides: dict[str, dict[str, int]] = Field(default_factory=dict)  # module -> {bits, group_size}
    lm_head: bool = False  # Olive's: the LM head is quantized too (GPTQ on its inputs, like the decoder layers)
    desc_act: bool | None = None  # Olive's act-order; see config_notes


class OliveGptqPass(Pass):
    """GPTQ to the Olive checkpoint (4/8 bits per layer) on CPU."""

    type_name: ClassVar[str] = "Gptq"
    Config: ClassVar[type[PassConfig]] = OliveGptqConfig
    version: ClassVar[str] = "1"
    libraries: ClassVar[tuple[str, ...]] = ("torch", "transformers")

    @classmethod
    def config_notes(cls, config: PassConfig) -> list[str]:
        assert isinstance(config, OliveGptqConfig)
        if config.desc_act:
            return ["desc_act: accepted, columns are quantized in input order (the Olive checkpoint's packed layout "
                    "has no act-order permutation); GPTQ's error compensation still runs"]  # fmt: skip
        return []

    @classmethod
    def config_problems(cls, config: PassConfig) -> list[str]:
        assert isinstance(config, OliveGptqConfig)
        out = []
        if config.bits not in (4, 8):
            out.append(f"Gptq: bits={config.bits}: the Olive checkpoint onnxruntime-genai reads holds 4 or 8 bits")
        bad = sorted(k for o in config.overrides.values() for k in o if k not in ("bits", "group_size"))
        if bad:
            out.append(f"Gptq: overrides keys {', '.join(bad)} are not supported (bits, group_size)")
        return out

    @classmethod
    def default_data_config(cls, config: PassConfig) -> dict[str, Any] | None:
        """Without data_config, Olive's default calibration set (wikitext-2-raw-v1 train, from the hub)."""
        from orchestrator.passes.common.data import WIKITEXT2_TRAIN

        assert isinstance(config, OliveGptqConfig)
        return WIKITEXT2_TRAIN if config.data_config is None else None

    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        assert isinstance(config, OliveGptqConfig)
        for msg in self.config_problems(config):
            raise PassError(msg)
        if config.data_config is None:  # the workflow reader names Olive's default; a bare Job may lack it
            raise PassError("Gptq needs calibration data: set data_config to one of the workflow's data configs")
        if model is None or model.format != "hf" or model.quantized:
            raise PassError("Gptq needs a full-precision HF checkpoint (format hf) as input")
        import time

        t0 = time.perf_counter()
        hf_dir = Path(model.path)
        cfg = oq.read_config(hf_dir)
        decision = cfg.get(oq.MIXED_PRECISION_KEY) or {}
        overrides = {k: dict(v) for k, v in decision.get("overrides", {}).items()}
        for k, v in config.overrides.items():
            overrides.setdefault(k, {}).update(v)
        assert config.data_config is not None
        texts = oq.calibration_texts(ctx, config.data_config, config.num_calibration_samples, self.type_name)
        fp, tok = oq.load_fp_model(hf_dir, model.trust_remote_code)
        modules = dict(fp.named_modules())
        names = oq.linear_names(fp.state_dict()) + (["lm_head"] * config.lm_head)
        hessians = collect_hessians(fp, [modules[n] for n in names], oq.token_batches(tok, texts, config.max_seq_len))
        state = {k: v.detach().clone() for k, v in fp.state_dict().items()}
        if config.lm_head and "lm_head.weight" not in state:  # tied: the head's own copy is quantized
            state["lm_head.weight"] = fp.get_output_embeddings().weight.detach().clone()
        quant: dict[str, Any] = {
            "quant_method": "olive",
            "bits": config.bits,
            "group_size": config.group_size,
            "sym": config.sym,
            "desc_act": False,
            "overrides": {},
        }
        kept_rtn, regrouped = [], []
        for i, name in enumerate(names):
            w = state.pop(f"{name}.weight").float()
            bits = int(overrides.get(name, {}).get("bits", config.bits))
            gs = oq.layer_group_size(w.shape[1], int(overrides.get(name, {}).get("group_size", config.group_size)))
            codes, scale, zero = gptq_quantize(w, hessians[name], bits, gs, config.sym, config.damp_percent)
            rs, rz = oq.qparams(w, bits, gs, config.sym)
            rcodes = oq.quantize_codes(w, rs, rz, bits, gs)
            if output_error(w, codes, scale, zero, gs, hessians[name]) > output_error(w, rcodes, rs, rz, gs,
                                                                                      hessians[name]):  # fmt: skip
                codes, scale, zero = rcodes, rs, rz
                kept_rtn.append(name)
            for key, t in oq.pack_olive(codes, scale, zero, bits).items():
                state[f"{name}.{key}"] = t
            if bits != config.bits or gs != config.group_size:
                quant["overrides"][name] = {"bits": bits, "group_size": gs}
                if gs != config.group_size:
                    regrouped.append(f"{name} ({gs})")
            ctx.progress(i + 1, len(names), "gptq")
        oq.write_checkpoint(hf_dir, state, quant, ctx.out_dir / "model", {oq.MIXED_PRECISION_KEY: decision or None})
        high = sum(1 for n in names if quant["overrides"].get(n, {}).get("bits", config.bits) != config.bits)
        ctx.info(f"Gptq: {len(names)} layers to the Olive format ({high} at other than {config.bits} bits) in "
                 f"{time.perf_counter() - t0:.0f}s on {len(texts)} calibration texts")  # fmt: skip
        if regrouped:
            ctx.info(f"Gptq: group_size {config.group_size} does not divide these layers' inputs; block size "
                     f"used: {', '.join(regrouped)}")  # fmt: skip
        if kept_rtn:
            ctx.info(f"Gptq: round-to-nearest kept where GPTQ's output error was larger: {', '.join(kept_rtn)}")
        artifact = ModelArtifact(
            format="hf", path="model", task=model.task, trust_remote_code=model.trust_remote_code, quantized=True
        )
        return PassOutput(model=artifact, metrics={"quantized_layers": float(len(names)), "high_bit_layers": high})


def collect_hessians(model: Any, linears: list[Any], batches: list[Any]) -> dict[str, Any]:
    """H = 2/n * sum x x^T of each Linear's inputs over the calibration tokens (forward hooks, fp model)."""
    import torch

    names = {id(m): n for n, m in model.named_modules()}
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}

    def hook(mod: Any, args: tuple[Any, ...], _out: Any) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        n = names[id(mod)]
        sums[n] = sums.get(n, 0) + x.t() @ x
        counts[n] = counts.get(n, 0) + x.shape[0]

    handles = [m.register_forward_hook(hook) for m in linears]
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return {n: 2 * sums[n] / counts[n] for n in sums}


def gptq_quantize(w: Any, hessian: Any, bits: int, gs: int, sym: bool, damp: float) -> tuple[Any, Any, Any]:
    """GPTQ of one weight [out, in] with groups of gs: (codes [out, in], scale, zero [out, groups])."""
    import torch

    w = w.clone().float()
    out_f, in_f = w.shape
    h = hessian.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(in_f, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    codes = torch.zeros_like(w)
    scales, zeros = [], []
    qmax = 2**bits - 1
    for g0 in range(0, in_f, gs):
        g1 = g0 + gs
        s, z = oq.qparams(w[:, g0:g1], bits, gs, sym)
        scales.append(s)
        zeros.append(z)
        w1 = w[:, g0:g1].clone()
        err = torch.zeros_like(w1)
        h1 = hinv[g0:g1, g0:g1]
        for i in range(gs):
            col = w1[:, i]
            q = torch.clamp(torch.round(col / s[:, 0] + z[:, 0]), 0, qmax)
            codes[:, g0 + i] = q
            e = (col - (q - z[:, 0]) * s[:, 0]) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, g1:] -= err @ hinv[g0:g1, g1:]
    return codes, torch.cat(scales, dim=1), torch.cat(zeros, dim=1)


def output_error(w: Any, codes: Any, scale: Any, zero: Any, gs: int, hessian: Any) -> float:
    """tr(D H D^T) for D = W - deq(codes): the layer's squared output error on the calibration inputs."""
    d = w - (codes - zero.repeat_interleave(gs, 1)) * scale.repeat_interleave(gs, 1)
    return float(((d @ hessian.float()) * d).sum())
