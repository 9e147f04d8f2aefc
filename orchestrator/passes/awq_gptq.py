"""AWQ and GPTQ int4 weight quantization (Olive's "AutoAWQQuantizer" and "GptqQuantizer" passes).

`orch quantize --algorithm awq|gptq --precision int4` runs these. The calibration is done by llm-compressor
(vLLM project; AutoAWQ is archived and AutoGPTQ is unmaintained, GPTQModel 7.x needs torch >= 2.14): its
AWQModifier / GPTQModifier on every Linear layer but the LM head, W4A16 with groups of `group_size`.

The output is an HF checkpoint in the GPTQ layout (`qweight` int32 [in/8, out], `qzeros` int32 [groups, out/8]
holding zero-1, `scales` fp16 [groups, out], `g_idx` [in]; config.json quantization_config quant_method "gptq"),
whatever the algorithm: AWQ's smoothing scales are folded into the neighbouring layers, so what is left is plain
grouped int4 with zero points. onnxruntime-genai's model builder (orch's ModelBuilder pass) reads this layout as
a pre-quantized model and keeps its int4 values (MatMulNBits), so the ONNX model is the AWQ/GPTQ one, not a
re-quantization. Its format is "hf" with `quantized=True`: MergeAdapterWeights and LoRA refuse it.

llm-compressor 0.14 supports transformers 5.15-5.17 (orch's train/export stack pins 5.23), so this pass runs in
its own environment: `gpu-quantize` (transformers==5.17.0, llmcompressor==0.14.0.1, compressed-tensors==0.19.0).
Errors that need nothing loaded come first and name the fix: bits other than 4, an input that is not a plain HF
checkpoint (an adapter, ONNX, or already quantized), no calibration data, AWQ without a CUDA GPU (llm-compressor
0.14's AWQ needs one; GPTQ also runs on CPU), llm-compressor missing or a transformers it does not support, and
an architecture llm-compressor has no AWQ layer mapping for.

Checked here on CPU (tiny Phi-3, llm-compressor 0.14.0.1 + transformers 5.17 in a side environment): GPTQ ->
this layout -> onnxruntime-genai builder -> MatMulNBits (block = group_size) -> generation runs. Not yet measured
on a GPU, and AWQ not run at all (CPU is refused, see above).

`pack_gptq` / `write_gptq_checkpoint` need only torch: they also turn any grouped int4 (scale, zero point) result
into the layout above (the tests use them with a round-to-nearest quantizer, no llm-compressor needed).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from pydantic import AliasChoices, Field, model_validator

from orchestrator.job import ModelArtifact
from orchestrator.passes.base import Pass, PassConfig, PassContext, PassError, PassOutput, Requirements

LLMCOMPRESSOR_PIN = "llmcompressor==0.14.0.1 compressed-tensors==0.19.0 transformers==5.17.0"
LLMCOMPRESSOR_TRANSFORMERS = ("5.15.0", "5.17.0")  # llmcompressor 0.14.0.1's declared range (inclusive)
GPTQ_CHECKPOINT = "model.safetensors"


class AwqGptqConfig(PassConfig):
    """Olive's GptqQuantizer / AutoAWQQuantizer fields; those with no meaning here are accepted and ignored."""

    bits: int = Field(4, validation_alias=AliasChoices("bits", "w_bit"))
    group_size: int = Field(128, validation_alias=AliasChoices("group_size", "q_group_size"))
    sym: bool | None = None  # GPTQ's name; None: the algorithm's default (GPTQ symmetric, AWQ with zero points)
    zero_point: bool | None = None  # AWQ's name: True = asymmetric (the opposite of sym)
    damp_percent: float = Field(0.01, gt=0, lt=1)
    desc_act: bool = False  # GPTQ activation-order processing; the packed layout stays in input order
    data_config: str | None = None  # the workflow data config used for calibration
    num_calibration_samples: int = Field(128, gt=0)
    max_seq_len: int = Field(512, gt=8)
    modules_to_not_convert: list[str] = Field(default_factory=list)  # besides the LM head, which is never quantized
    # Olive fields accepted for compatibility, no effect (llm-compressor finds the layers itself)
    layers_block_name: str | None = None
    outside_layer_modules: list[str] | None = None
    inside_layer_modules: list[list[str]] | None = None
    static_groups: bool | None = None
    true_sequential: bool | None = None
    input_model_dtype: str | None = None
    version: str | None = None
    duo_scaling: bool | None = None
    export_compatible: bool | None = None

    @model_validator(mode="after")
    def _consistent(self) -> AwqGptqConfig:
        if self.sym is not None and self.zero_point is not None and self.sym == self.zero_point:
            raise ValueError("sym and zero_point contradict each other (zero_point=True means sym=False)")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError("group_size must be a positive multiple of 8, or -1 for one group per row")
        return self


class _AwqGptqPass(Pass):
    algorithm: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = AwqGptqConfig
    version: ClassVar[str] = "1"
    libraries: ClassVar[tuple[str, ...]] = ("torch", "transformers", "llmcompressor", "compressed-tensors")

    def requirements(self, config: PassConfig) -> Requirements:
        return Requirements(cuda=True, environment="gpu-quantize")

    def symmetric(self, config: AwqGptqConfig) -> bool:
        if config.sym is not None:
            return config.sym
        if config.zero_point is not None:
            return not config.zero_point
        return self.algorithm == "gptq"  # GPTQ's usual default; AWQ keeps zero points

    def check(self, config: AwqGptqConfig, model: ModelArtifact | None) -> None:
        """Refusals that need nothing loaded: one line each, with the fix."""
        if config.bits != 4:
            raise PassError(
                f"{self.type_name}: bits={config.bits} is not supported: orch's AWQ/GPTQ produce int4 (W4A16) for "
                "onnxruntime-genai; for 8-bit weights use the ONNX quantizer (OnnxBlockWiseRtnQuantization)"
            )
        if model is None or model.format != "hf":
            got = "no model" if model is None else f"a {model.format} model"
            hint = " (merge the adapter first: MergeAdapterWeights)" if model and model.format == "hf_adapter" else ""
            raise PassError(f"{self.type_name} needs an HF checkpoint (format hf) as input, got {got}{hint}")
        if model.quantized:
            raise PassError(
                f"{self.type_name}: the input model is already quantized; quantize the full-precision checkpoint"
            )
        if config.data_config is None:
            raise PassError(
                f"{self.type_name} needs calibration data: set data_config to one of the workflow's data configs "
                "(a few hundred samples of the text the model will see)"
            )
        self.check_device()

    def check_device(self) -> None:
        """GPTQ also runs on CPU (slowly); llm-compressor 0.14's AWQ pins its activation cache for a GPU."""
        import torch

        if self.algorithm == "awq" and not torch.cuda.is_available():
            raise PassError(
                "AWQ needs a CUDA GPU (llm-compressor's AWQ caches activations in pinned memory for one); run it "
                "on a GPU system, or use GPTQ (GptqQuantizer), which also runs on CPU"
            )

    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        assert isinstance(config, AwqGptqConfig)
        self.check(config, model)
        assert model is not None
        check_llmcompressor()
        texts = self.calibration_texts(config, ctx)
        return self.quantize(config, model, ctx, texts)

    def calibration_texts(self, config: AwqGptqConfig, ctx: PassContext) -> list[str]:
        from orchestrator.data import load_splits

        data_configs = ctx.job.data_configs
        if config.data_config not in data_configs:
            known = ", ".join(sorted(data_configs)) or "none"
            raise PassError(f"data config {config.data_config!r} is not in the workflow's data_configs ({known})")
        train, _ = load_splits(
            data_configs[config.data_config],
            base_dir=Path.cwd(),
            seed=0,
            data_files_override=ctx.job.data_files.get(config.data_config),
        )
        texts = [t for t in train["text"] if t][: config.num_calibration_samples]
        if not texts:
            raise PassError(f"data config {config.data_config!r} has no text to calibrate on")
        return texts

    def quantize(self, config: AwqGptqConfig, model: ModelArtifact, ctx: PassContext, texts: list[str]) -> PassOutput:
        """Calibrate with llm-compressor, write the GPTQ-layout checkpoint to ctx.out_dir/model."""
        import time

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.check_device()
        sym = self.symmetric(config)
        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        hf = AutoModelForCausalLM.from_pretrained(
            model.path,
            dtype=torch.bfloat16 if device == "cuda" else torch.float32,
            trust_remote_code=model.trust_remote_code,
        ).to(device)
        ignore = ["lm_head", *config.modules_to_not_convert]
        calib = calibration_dataset(tokenizer, texts, config.max_seq_len)
        ctx.info(
            f"{self.type_name}: {self.algorithm.upper()} int4 {'symmetric' if sym else 'with zero points'}, "
            f"groups of {config.group_size}, {len(texts)} calibration samples of <= {config.max_seq_len} tokens "
            f"on {device}"
        )
        run_llmcompressor(hf, calib, self.algorithm, config, sym, ignore)
        params = collect_quant_params(hf)
        if not params:
            raise PassError(f"{self.type_name}: llm-compressor quantized no layer (internal error)")
        dest = ctx.out_dir / "model"
        errors = write_gptq_checkpoint(hf, params, dest, group_size=config.group_size, sym=sym, tokenizer=tokenizer)
        seconds = time.perf_counter() - t0
        ctx.info(
            f"{self.type_name}: {len(params)} layers to int4 in {seconds:.0f}s; largest relative int4 error of a "
            f"layer {max(errors.values()):.1e}"
        )
        artifact = ModelArtifact(
            format="hf", path="model", task=model.task, trust_remote_code=model.trust_remote_code, quantized=True
        )
        return PassOutput(
            model=artifact,
            metrics={"quantized_layers": float(len(params)), "quantize_s": seconds, "bits": 4.0},
        )


class GptqQuantizerPass(_AwqGptqPass):
    """GPTQ (second-order, layer by layer) int4 through llm-compressor's GPTQModifier."""

    type_name: ClassVar[str] = "GptqQuantizer"
    algorithm: ClassVar[str] = "gptq"


class AutoAWQQuantizerPass(_AwqGptqPass):
    """AWQ (activation-aware scaling, then int4) through llm-compressor's AWQModifier."""

    type_name: ClassVar[str] = "AutoAWQQuantizer"
    algorithm: ClassVar[str] = "awq"


# ---------------------------------------------------------------------------------------------------------------
# llm-compressor


def check_llmcompressor() -> None:
    """llm-compressor importable, with a transformers it supports; else a PassError naming the environment."""
    import importlib.metadata as md

    from packaging.version import Version

    try:
        md.version("llmcompressor")
    except md.PackageNotFoundError:
        raise PassError(
            f"AWQ/GPTQ need llm-compressor, which is not installed here: run this pass in the gpu-quantize "
            f"environment, or pip install {LLMCOMPRESSOR_PIN}"
        ) from None
    tf = Version(md.version("transformers"))
    lo, hi = (Version(v) for v in LLMCOMPRESSOR_TRANSFORMERS)
    if not lo <= tf <= hi:
        raise PassError(
            f"llm-compressor {md.version('llmcompressor')} supports transformers {lo}-{hi}, this environment has "
            f"{tf}: run AWQ/GPTQ in the gpu-quantize environment ({LLMCOMPRESSOR_PIN})"
        )


def calibration_dataset(tokenizer: Any, texts: list[str], max_len: int) -> Any:
    from datasets import Dataset

    enc = tokenizer(texts, truncation=True, max_length=max_len, add_special_tokens=True)
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})


def quant_scheme(config: AwqGptqConfig, sym: bool, ignore: list[str], algorithm: str) -> dict[str, Any]:
    """llm-compressor modifier kwargs: int4 weights, groups of config.group_size, activations untouched."""
    weights: dict[str, Any] = {
        "num_bits": 4,
        "type": "int",
        "symmetric": sym,
        "strategy": "channel" if config.group_size == -1 else "group",
        "dynamic": False,
    }
    if config.group_size != -1:
        weights["group_size"] = config.group_size
    if algorithm == "gptq" and config.desc_act:
        weights["actorder"] = "weight"  # static activation order: the groups stay contiguous in input order
    return {
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": ignore,
    }


def run_llmcompressor(
    model: Any, calib: Any, algorithm: str, config: AwqGptqConfig, sym: bool, ignore: list[str]
) -> None:
    from llmcompressor import oneshot

    kwargs = quant_scheme(config, sym, ignore, algorithm)
    if algorithm == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        recipe = GPTQModifier(dampening_frac=config.damp_percent, **kwargs)
    else:
        from llmcompressor.modifiers.awq import AWQModifier

        recipe = AWQModifier(**kwargs)
    try:
        oneshot(
            model=model,
            dataset=calib,
            recipe=recipe,
            max_seq_length=config.max_seq_len,
            num_calibration_samples=len(calib),
        )
    except (ValueError, KeyError, NotImplementedError) as exc:
        arch = type(model).__name__
        if algorithm == "awq" and "mapping" in str(exc).lower():
            raise PassError(
                f"AWQ: llm-compressor has no layer mapping for {arch}; use GPTQ (GptqQuantizer) for this model"
            ) from exc
        raise PassError(f"{algorithm.upper()} calibration failed on {arch}: {exc}") from exc


def collect_quant_params(model: Any) -> dict[str, tuple[Any, Any, Any]]:
    """{module name: (weight, weight_scale, weight_zero_point)} of every Linear llm-compressor quantized."""
    out = {}
    for name, module in model.named_modules():
        scale = getattr(module, "weight_scale", None)
        if scale is None or not hasattr(module, "weight"):
            continue
        zp = getattr(module, "weight_zero_point", None)
        out[name] = (module.weight.detach(), scale.detach(), None if zp is None else zp.detach())
    return out


# ---------------------------------------------------------------------------------------------------------------
# the GPTQ layout (torch only)


def pack_gptq(weight: Any, scale: Any, zero_point: Any, group_size: int, sym: bool) -> tuple[dict[str, Any], float]:
    """Grouped int4 (per-output-row scale / zero point per group) -> GPTQ tensors, and the relative error between
    `weight` and its dequantized codes (GPTQ leaves weight at its quantized value: ~0; AWQ / round-to-nearest:
    the int4 rounding error, a few percent).

    weight [out, in]; scale, zero_point [out, groups] (zero_point None or 0 for symmetric).
    """
    import torch

    w = weight.float().cpu()
    out_f, in_f = w.shape
    gs = in_f if group_size == -1 else group_size
    if in_f % gs or in_f % 8 or out_f % 8:
        raise PassError(f"int4 packing needs in/out features divisible by 8 and by group_size, got {out_f}x{in_f}")
    groups = in_f // gs
    s = scale.float().cpu().reshape(out_f, -1)
    if s.shape[1] != groups:
        raise PassError(f"scale has {s.shape[1]} groups per row, expected {groups} (group_size {gs})")
    z = torch.zeros_like(s) if zero_point is None else zero_point.float().cpu().reshape(out_f, -1)
    s_full = s.repeat_interleave(gs, dim=1)
    z_full = z.repeat_interleave(gs, dim=1)
    if sym:
        q = torch.clamp(torch.round(w / s_full) + z_full, -8, 7) + 8  # signed codes -> 0..15, zero point 8
        zeros = z + 8
    else:
        q = torch.clamp(torch.round(w / s_full) + z_full, 0, 15)
        zeros = z
    deq = (q - zeros.repeat_interleave(gs, dim=1)) * s_full
    rel_err = float((deq - w).norm() / w.norm().clamp_min(1e-12))
    q = q.to(torch.int32)  # [out, in]
    zeros_i = zeros.round().to(torch.int32)  # [out, groups]

    qweight = torch.zeros((in_f // 8, out_f), dtype=torch.int32)
    qt = q.t().contiguous()  # [in, out]
    for k in range(8):
        qweight |= qt[k::8, :] << (4 * k)
    qzeros = torch.zeros((groups, out_f // 8), dtype=torch.int32)
    zt = ((zeros_i - 1) & 0xF).t().contiguous()  # [groups, out], GPTQ stores zero - 1
    for k in range(8):
        qzeros |= zt[:, k::8] << (4 * k)
    tensors = {
        "qweight": qweight,
        "qzeros": qzeros,
        "scales": s.t().contiguous().to(torch.float16),
        "g_idx": torch.arange(in_f, dtype=torch.int32) // gs,
    }
    return tensors, rel_err


def write_gptq_checkpoint(
    model: Any,
    params: dict[str, tuple[Any, Any, Any]],
    dest: Path,
    *,
    group_size: int,
    sym: bool,
    tokenizer: Any = None,
) -> dict[str, float]:
    """Save `model` with each quantized Linear as qweight/qzeros/scales/g_idx; returns the pack error per layer."""
    import torch
    from safetensors.torch import save_file

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    errors: dict[str, float] = {}
    for name, (weight, scale, zp) in params.items():
        tensors, err = pack_gptq(weight, scale, zp, group_size, sym)
        errors[name] = err
        for suffix in ("weight", "weight_scale", "weight_zero_point", "weight_g_idx"):
            state.pop(f"{name}.{suffix}", None)
        for key, value in tensors.items():
            state[f"{name}.{key}"] = value
    # the unquantized rest (embeddings, norms, LM head) in fp16, as GPTQ checkpoints ship it
    state = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        save_file(state, str(tmp / GPTQ_CHECKPOINT), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        cfg["torch_dtype"] = cfg["dtype"] = "float16"
        cfg["quantization_config"] = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group_size,
            "desc_act": False,  # g_idx is in input order whatever the calibration order was
            "sym": sym,
            "checkpoint_format": "gptq",
        }
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return errors


def unpack_gptq(tensors: dict[str, Any]) -> Any:
    """qweight / qzeros / scales / g_idx (GPTQ layout, 4-bit) -> the dequantized weight [out, in], fp32."""
    import torch

    qweight, qzeros, scales, g_idx = (tensors[k] for k in ("qweight", "qzeros", "scales", "g_idx"))
    shifts = [4 * k for k in range(8)]
    q = torch.stack([(qweight >> s) & 0xF for s in shifts], dim=1).reshape(-1, qweight.shape[1])  # [in, out]
    z = torch.stack([(qzeros >> s) & 0xF for s in shifts], dim=2).reshape(qzeros.shape[0], -1) + 1  # [groups, out]
    g = g_idx.long()
    return ((q.float() - z[g].float()) * scales[g].float()).t().contiguous()


def load_dequantized(hf_dir: Path | str) -> Any:
    """The checkpoint written by write_gptq_checkpoint as a plain fp32 transformers model whose Linear weights are
    its dequantized int4 values: a parity reference for the ONNX export (transformers itself would need a GPTQ
    kernel package to load the checkpoint)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dir = Path(hf_dir)
    cfg = AutoConfig.from_pretrained(hf_dir)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = load_file(str(hf_dir / GPTQ_CHECKPOINT))
    for name in sorted(k.removesuffix(".qweight") for k in state if k.endswith(".qweight")):
        parts = {key: state.pop(f"{name}.{key}") for key in ("qweight", "qzeros", "scales", "g_idx")}
        state[f"{name}.weight"] = unpack_gptq(parts)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval()
