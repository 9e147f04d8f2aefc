"""AWQ and GPTQ int4 weight quantization (Olive's "AutoAWQQuantizer" and "GptqQuantizer" passes).

`orch quantize --algorithm awq|gptq --precision int4` runs these. The calibration is done by llm-compressor
(vLLM project; AutoAWQ is archived and AutoGPTQ is unmaintained, GPTQModel 7.x needs torch >= 2.14): its
AWQModifier / GPTQModifier on every Linear layer but the LM head, W4A16 with groups of `group_size`.

The output is an HF checkpoint in the GPTQ layout (`qweight` int32 [in/8, out], `qzeros` int32 [groups, out/8]
holding zero-1, `scales` fp16 [groups, out], `g_idx` [in]; config.json quantization_config quant_method "gptq"),
whatever the algorithm: AWQ's smoothing scales are folded into the neighbouring layers (llm-compressor divides the
norm / previous Linear by them and multiplies the quantized Linear's input columns in place), so what is left is
plain grouped int4 with zero points. onnxruntime-genai's model builder (orch's ModelBuilder pass) reads this layout
as a pre-quantized model and keeps its int4 values (MatMulNBits), so the ONNX model is the AWQ/GPTQ one, not a
re-quantization. Its format is "hf" with `quantized=True`: MergeAdapterWeights and LoRA refuse it.

Zero points: llm-compressor (compressed-tensors) keeps int4 codes signed, q in [-8, 7], with an int8 zero point z
in [-8, 7] (0 when symmetric); the GPTQ layout holds q + 8 in 0..15 with zero point z + 8 (collect_quant_params
converts). Before the conversion, AWQ's zero points went in as if unsigned: half of every group's codes clipped to 0
and negative zero points wrapped, a checkpoint far from the model (bench/gpu_quantize.py's first H100 run: int4 vs
fp logits rel. L2 1.42 against 0.41 for round-to-nearest). Since then the packed codes are checked against
llm-compressor's own quantized weights (compressed-tensors' fake_quantize) before anything is written.

llm-compressor 0.14 supports transformers 5.15-5.17 (orch's train/export stack pins 5.23), so this pass runs in
its own environment: `gpu-quantize` (transformers==5.17.0, llmcompressor==0.14.0.1, compressed-tensors==0.19.0).
Errors that need nothing loaded come first and name the fix: bits other than 4, an input that is not a plain HF
checkpoint (an adapter, ONNX, or already quantized), no calibration data, AWQ without a CUDA GPU on a model
larger than AWQ_CPU_MAX_BYTES (unless ORCH_AWQ_CPU=1: llm-compressor 0.14's AWQ runs on CPU once the pinning of its
activation cache is skipped, but its grid search is slow there; GPTQ also runs on CPU; CPU jobs get the
cpu-quantize environment), llm-compressor missing or a transformers it does not support,
and an architecture llm-compressor has no AWQ layer mapping for.

Checked on CPU (tiny Phi-3, llm-compressor 0.14.0.1 + transformers 5.17 in a side environment): GPTQ and AWQ ->
this layout -> onnxruntime-genai builder -> MatMulNBits (block = group_size) -> generation runs, the ONNX logits
match the dequantized checkpoint, and AWQ's int4 error is that of round-to-nearest with zero points or better. On
an H100: GPTQ (bench/RESULTS.md); AWQ's first run there had the zero-point bug above.

The layout itself (packing, writing, reading back: `pack_gptq`, `write_gptq_checkpoint`, `unpack_gptq`,
`load_dequantized`) is passes/common/gptq_layout.py: the ONNX exporters read what this pass writes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from pydantic import AliasChoices, Field, model_validator

from orchestrator.core.job import ModelArtifact
from orchestrator.passes.base import Pass, PassConfig, PassContext, PassError, PassOutput, Requirements
from orchestrator.passes.common.gptq_layout import write_gptq_checkpoint

LLMCOMPRESSOR_PIN = "llmcompressor==0.14.0.1 compressed-tensors==0.19.0 transformers==5.17.0"
LLMCOMPRESSOR_TRANSFORMERS = ("5.15.0", "5.17.0")  # llmcompressor 0.14.0.1's declared range (inclusive)
# packed int4 read back vs llm-compressor's own dequantized weight (both from the same weight and qparams, in fp32):
# left is the fp16 storage of the scales, ~2e-4. A convention error (zero points, clipping, layout) gives O(1).
AWQ_CPU_ENV = "ORCH_AWQ_CPU"  # "1": run AWQ without a GPU whatever the model's size (slow)
AWQ_CPU_MAX_BYTES = 64 * 2**20  # AWQ on CPU without asking: models up to ~16 M fp32 parameters (a few minutes)


def weights_bytes(model_path: str) -> int | None:
    """Bytes of a checkpoint's weight files (*.safetensors / *.bin), None when the folder has none."""
    files = [p for pat in ("*.safetensors", "*.bin") for p in Path(model_path).glob(pat)]
    return sum(p.stat().st_size for p in files) if files else None


class AwqGptqConfig(PassConfig):
    """Olive's GptqQuantizer / AutoAWQQuantizer fields; those with no meaning here are accepted with a note."""

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
        # llm-compressor's own environment; the engine takes its CPU sibling (cpu-quantize) for a CPU job
        return Requirements(cuda=False, environment="gpu-quantize")

    def symmetric(self, config: AwqGptqConfig) -> bool:
        if config.sym is not None:
            return config.sym
        if config.zero_point is not None:
            return not config.zero_point
        return self.algorithm == "gptq"  # GPTQ's usual default; AWQ keeps zero points

    @classmethod
    def config_notes(cls, config: PassConfig) -> list[str]:
        """Olive fields accepted for compatibility that change nothing here: said when the config is read."""
        inert = ("layers_block_name", "outside_layer_modules", "inside_layer_modules", "static_groups",
                 "true_sequential", "input_model_dtype", "version", "duo_scaling", "export_compatible")  # fmt: skip
        given = sorted(k for k in config.model_fields_set if k in inert)
        if not given:
            return []
        return [
            f"{', '.join(given)}: accepted, no effect (llm-compressor finds the layers and writes the GPTQ layout "
            "itself)"
        ]

    @classmethod
    def config_problems(cls, config: PassConfig) -> list[str]:
        """What the workflow reader refuses when the config is read (the same lines check() raises later)."""
        assert isinstance(config, AwqGptqConfig)
        out = []
        if config.bits != 4:
            out.append(f"{cls.type_name}: bits={config.bits} is not supported: orch's AWQ/GPTQ produce int4 (W4A16)")
        return out

    @classmethod
    def default_data_config(cls, config: PassConfig) -> dict[str, Any] | None:
        """Without data_config, Olive's default calibration set, from the hub (the reader adds it): AutoAWQ's
        pileval for AWQ, Olive's wikitext-2 train for GPTQ."""
        from orchestrator.passes.common.data import PILE_VAL, WIKITEXT2_TRAIN

        assert isinstance(config, AwqGptqConfig)
        if config.data_config is not None:
            return None
        return PILE_VAL if cls.algorithm == "awq" else WIKITEXT2_TRAIN

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
        if config.data_config is None:  # the workflow reader names Olive's default; a bare Job may lack it
            raise PassError(
                f"{self.type_name} needs calibration data: set data_config to one of the workflow's data configs "
                "(a few hundred samples of the text the model will see)"
            )
        self.check_device(model.path)

    def check_device(self, model_path: str | None = None) -> None:
        """GPTQ runs on CPU (slowly). AWQ on CPU runs for small models (weights up to AWQ_CPU_MAX_BYTES: minutes)
        and, for larger ones, only when asked (AWQ_CPU_ENV=1): llm-compressor's AWQ is correct there
        (run_llmcompressor skips the pinning of its activation cache, which needs a GPU), but its grid search is
        many forward passes per layer: measured 3.5 min for 8 of SmolLM2-135M's 30 layers on 2 cores."""
        import os

        import torch

        if self.algorithm != "awq" or torch.cuda.is_available() or os.environ.get(AWQ_CPU_ENV) == "1":
            return
        size = weights_bytes(model_path) if model_path else None
        if size is not None and size <= AWQ_CPU_MAX_BYTES:
            return
        what = f"this model's {size / 2**20:.0f} MB of weights" if size else "a model of unknown size"
        raise PassError(
            f"AWQ needs a CUDA GPU for {what}: on CPU llm-compressor's AWQ grid search takes about 10 minutes per "
            f"100 M parameters on 2 cores (set {AWQ_CPU_ENV}=1 to run it anyway); run it on a GPU system, or use "
            "GPTQ (GptqQuantizer), which is faster on CPU"
        )

    def run(self, config: PassConfig, model: ModelArtifact | None, ctx: PassContext) -> PassOutput:
        assert isinstance(config, AwqGptqConfig)
        self.check(config, model)
        assert model is not None
        check_llmcompressor()
        texts = self.calibration_texts(config, ctx)
        return self.quantize(config, model, ctx, texts)

    def calibration_texts(self, config: AwqGptqConfig, ctx: PassContext) -> list[str]:
        from orchestrator.passes.common.data import load_splits

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

        self.check_device(model.path)
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
        diffs: dict[str, float] = {}
        errors = write_gptq_checkpoint(
            hf,
            params,
            dest,
            group_size=config.group_size,
            sym=sym,
            tokenizer=tokenizer,
            reference=llmcompressor_reference(hf),
            reference_diffs=diffs,
        )
        seconds = time.perf_counter() - t0
        ctx.info(
            f"{self.type_name}: {len(params)} layers to int4 in {seconds:.0f}s; largest relative int4 error of a "
            f"layer {max(errors.values()):.1e} (vs the {'smoothed ' if self.algorithm == 'awq' else ''}weight), "
            f"packed vs llm-compressor's own int4 weights {max(diffs.values()):.1e}"
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
        with unpinned_activation_cache():
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


@contextlib.contextmanager
def unpinned_activation_cache() -> Iterator[None]:
    """Without a CUDA GPU: llm-compressor 0.14's AWQ pins its cached activations (IntermediatesCache.pin_memory,
    for faster host-to-GPU copies) and torch refuses to pin without an accelerator ("Cannot access accelerator
    device"). Pinning changes no value, so on CPU it is skipped for the duration; with a GPU nothing changes."""
    import torch

    if torch.cuda.is_available():
        yield
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original  # type: ignore[method-assign]


def collect_quant_params(model: Any) -> dict[str, tuple[Any, Any, Any]]:
    """{module name: (weight, scale, zero point)} of every Linear llm-compressor quantized, in pack_gptq's terms.

    After oneshot each such Linear holds `weight` (GPTQ: already on the int4 grid; AWQ: the smoothed full-precision
    weight: the smoothing scales are folded into it and into the layer before, a norm or a Linear, and
    QuantizationModifier only computes the qparams), `weight_scale` [out, groups] and `weight_zero_point` [out,
    groups] int8, and `quantization_scheme.weights` (compressed-tensors' QuantizationArgs). compressed-tensors keeps
    int4 codes signed, symmetric or not: q = clamp(round(w / s + z), -8, 7), w ~ (q - z) * s, z in [-8, 7] (0 when
    symmetric). pack_gptq takes the unsigned codes a GPTQ checkpoint holds, q + 8, whose zero point is z + 8: the
    zero point is converted here (unsigned_zero_point); None for a symmetric scheme.
    """
    out = {}
    for name, module in model.named_modules():
        scale = getattr(module, "weight_scale", None)
        if scale is None or not hasattr(module, "weight"):
            continue
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None:
            raise PassError(
                f"{name} has a weight_scale but no quantization_scheme.weights: not the module state llm-compressor "
                "0.14 leaves (internal error)"
            )
        zp = getattr(module, "weight_zero_point", None)
        out[name] = (module.weight.detach(), scale.detach(), unsigned_zero_point(zp, args, name))
    return out


def unsigned_zero_point(zero_point: Any, args: Any, name: str = "weight") -> Any:
    """compressed-tensors' weight zero point (signed int4 range: codes q in [-8, 7], w ~ (q - z) * s) -> the zero
    point of the same codes shifted to 0..15 (z + 8), as pack_gptq and GPTQ checkpoints take it; None if symmetric.

    `args`: the layer's QuantizationArgs (num_bits, type, symmetric, read by name: no compressed-tensors import)."""
    kind = str(getattr(args.type, "value", args.type)).lower()
    if kind != "int" or args.num_bits != 4:
        raise PassError(f"{name}: quantized as {kind}{args.num_bits}, the GPTQ layout holds int4 (internal error)")
    if args.symmetric:
        if zero_point is not None and bool(zero_point.ne(0).any()):
            raise PassError(f"{name}: symmetric scheme with non-zero zero points (internal error)")
        return None
    if zero_point is None:
        raise PassError(f"{name}: asymmetric scheme without zero points (internal error)")
    q_min = -(2 ** (args.num_bits - 1))  # compressed-tensors' calculate_range for type int
    return zero_point.detach().float() - q_min


def llmcompressor_reference(model: Any) -> Any:
    """name -> that Linear's weight as llm-compressor itself quantizes it: compressed-tensors' fake_quantize with the
    layer's own scale, zero point and args, in fp32 (as pack_gptq computes: in bf16 a few codes on rounding ties
    would come out one step apart). What the packed codes must reproduce, whatever the conventions."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    modules = dict(model.named_modules())

    def reference(name: str) -> Any:
        m = modules[name]
        zp = getattr(m, "weight_zero_point", None)
        with torch.no_grad():
            return fake_quantize(m.weight.float(), m.weight_scale.float(), zp, m.quantization_scheme.weights).cpu()

    return reference
