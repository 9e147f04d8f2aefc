"""Olive's flags of the adapter commands, flag for flag: `generate-adapter` (an ONNX model's LoRA weights as
inputs), `convert-adapters` (a PEFT folder -> one weights file) and `extract-adapters` (0.8+: every adapter under a
folder). olive.adapters builds all three.
"""

from __future__ import annotations

from orchestrator.olive.flag_spec import EXPORT, OTHER, OUTPUT, QUANT, Command, Flag
from orchestrator.olive.shared_flags import (
    model_flags,
    output_flags,
    remote_flags,
    shared_cache_flags,
    telemetry_flags,
)

WEIGHT_FORMATS = ("onnx_adapter", "numpy", "safetensors", "pt")
# generate-adapter and convert-adapters write the same adapter weights file
ADAPTER_FORMAT = Flag(
    "--adapter_format",
    "onnx_adapter (default) | numpy | safetensors",
    default="onnx_adapter",
    choices=WEIGHT_FORMATS,
    group=EXPORT,
)


GENERATE_ADAPTER = Command(
    "generate-adapter",
    "Olive's `generate-adapter`: an ONNX model exported with a LoRA adapter (capture-onnx-graph, auto-opt) -> "
    "the base model with the LoRA weights as inputs + the adapter weights file (ExtractAdapters). orch also takes "
    "a Hugging Face base model with --adapter_path and builds that ONNX model first.",
    (
        *model_flags(hf=False, adapter=True, output_default="optimized-model"),
        Flag(
            "--adapter_type",
            "lora (dora / loha adapters cannot be ONNX inputs: merge them first)",
            default="lora",
            choices=("lora", "dora", "loha"),
            group=EXPORT,
        ),
        ADAPTER_FORMAT,
        Flag(
            "--precision",
            "orch: precision of the ONNX model built from an HF base + --adapter_path",
            default="int4",
            choices=("int4", "int8", "fp16", "fp32", "bf16"),
            group=EXPORT,
        ),
        Flag("--trust_remote_code", "trust remote code when loading a Hugging Face base", kind="flag"),
        *output_flags(),
        *shared_cache_flags(),
        *telemetry_flags(),
        *remote_flags(),
    ),
)

CONVERT_ADAPTERS = Command(
    "convert-adapters",
    "Olive's `convert-adapters`: a PEFT LoRA folder -> one adapter weights file for the ONNX base model that "
    "auto-opt / generate-adapter built (the builder's weight names).",
    (
        Flag("--adapter_path", "PEFT LoRA adapter folder", short="-a", required=True),
        ADAPTER_FORMAT,
        Flag("--output_path", "output file (the format's suffix is added)", short="-o", required=True, group=OUTPUT),
        Flag("--dtype", "float32 | float16", default="float32", choices=("float32", "float16"), group=EXPORT),
        Flag("--quantize_int4", "refused: the base model's LoRA inputs are float", kind="flag", group=QUANT),
        Flag("--int4_block_size", "with --quantize_int4 (refused)", kind="int", default=32, group=QUANT),
        Flag(
            "--int4_quantization_mode",
            "with --quantize_int4 (refused)",
            default="symmetric",
            choices=("symmetric", "asymmetric"),
            group=QUANT,
        ),
        Flag(
            "--model_name_or_path",
            "orch: the base model (its config splits Phi-3's fused projections; default: "
            "the adapter's base_model_name_or_path)",
            short="-m",
        ),
        Flag("--log_level", "logging level", kind="int", default=3, group=OUTPUT),
        *telemetry_flags(),
    ),
)

EXTRACT_ADAPTERS = Command(
    "extract-adapters",
    "Olive's `extract-adapters` (0.8+): every PEFT LoRA adapter under a folder -> one weights file each, in the "
    "model builder's names (<output_path>/<adapter name>.<format>).",
    (
        Flag(
            "--model_name_or_path",
            "a PEFT adapter folder, or a folder holding several (one sub-folder each)",
            short="-m",
            required=True,
            aliases=("--model",),
        ),
        Flag(
            "--output_path",
            "output folder (default adapters)",
            short="-o",
            default="adapters",
            group=OUTPUT,
            aliases=("--output",),
        ),
        Flag(
            "--format",
            "onnx_adapter | numpy | safetensors",
            short="-f",
            required=True,
            choices=WEIGHT_FORMATS,
            group=EXPORT,
        ),
        Flag("--dtype", "float32 | float16", default="float32", choices=("float32", "float16"), group=EXPORT),
        Flag("--cache_dir", "hub download cache (local folders need none)", group=OTHER),
        Flag("--task", "Hugging Face task (accepted)", short="-t"),
        Flag("--trust_remote_code", "trust remote code when reading the base model's config", kind="flag"),
        Flag(
            "--test",
            "random 2-layer test model (no effect: adapters are read as they are)",
            kind="optional",
            const="true",
            group=OTHER,
        ),
        Flag("--model_script", "refused: PyTorch model-loader scripts are not run", group=OTHER),
        Flag("--script_dir", "refused with --model_script", group=OTHER),
        Flag("--log_level", "logging level", kind="int", default=3, group=OUTPUT),
        *telemetry_flags(),
    ),
    versions="0.8-0.13",
)
