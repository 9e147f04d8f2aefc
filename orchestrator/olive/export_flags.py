"""Olive's flags of the commands that export a model to ONNX, flag for flag: `auto-opt` (0.7-0.13), `optimize`
(0.9-0.13) and `capture-onnx-graph` (0.7-0.13).

Each flag is decided by the command's builder (olive.auto_opt, olive.optimize, olive.capture): honoured, accepted
with a note, or refused in one line.
"""

from __future__ import annotations

from orchestrator.olive.flag_spec import ACCEL, DATA, EXPORT, OTHER, QUANT, Command, Flag
from orchestrator.olive.shared_flags import (
    EXECUTION_PROVIDERS,
    PRECISIONS,
    accelerator_flags,
    model_flags,
    output_flags,
    remote_flags,
    shared_cache_flags,
    telemetry_flags,
)


def _search() -> list[Flag]:
    return [
        Flag(
            "--enable_search",
            "Olive 0.7-0.9 search over pass parameters: accepted, orch runs each pass once with the parameters given",
            kind="optional",
            const="sequential",
            group=OTHER,
        ),
        Flag("--seed", "seed of the search sampler (no search here)", kind="int", group=OTHER),
    ]


AUTO_OPT = Command(
    "auto-opt",
    "Olive's `auto-opt` (deprecated by `optimize` in Olive 0.13): a Hugging Face model -> an ONNX model for "
    "onnxruntime-genai (the model builder; torch's exporter with --use_dynamo_exporter), quantized to --precision; "
    "with --adapter_path the adapter stays separate (adapter_weights.onnx_adapter).",
    (
        *model_flags(adapter=True, pt=True, output_default="auto-opt-output"),
        *accelerator_flags(single=True),
        Flag(
            "--data_name",
            "evaluation data (Olive's auto-opt builds no evaluator from it: accepted, no effect)",
            short="-d",
            group=DATA,
        ),
        Flag("--split", "evaluation split (with --data_name)", group=DATA),
        Flag("--subset", "evaluation subset (with --data_name)", group=DATA),
        Flag("--input_cols", "evaluation input columns (with --data_name)", kind="list", group=DATA),
        Flag("--batch_size", "evaluation batch size (with --data_name)", kind="int", group=DATA),
        Flag(
            "--precision",
            "fp32 (default, as Olive) | fp16 | bf16 | int8 | int4",
            default="fp32",
            choices=PRECISIONS,
            group=EXPORT,
        ),
        Flag(
            "--use_dynamo_exporter",
            "export with torch.onnx's dynamo exporter (OnnxConversion -> "
            "OrtTransformersOptimization -> quantization) instead of the model builder",
            kind="flag",
            group=EXPORT,
        ),
        Flag(
            "--use_model_builder",
            "export with onnxruntime-genai's model builder (orch's default path)",
            kind="flag",
            group=EXPORT,
        ),
        Flag(
            "--use_ort_genai",
            "write onnxruntime-genai's genai_config.json and tokenizer files (always true on the model builder path)",
            kind="flag",
            group=EXPORT,
        ),
        Flag("--use_qdq_encoding", "QDQ encoding of quantized operators (for NPUs): refused", kind="flag", group=QUANT),
        Flag(
            "--num-splits",
            "split the model into N pipeline parts (CaptureSplitInfo + SplitModel)",
            kind="int",
            group=EXPORT,
            aliases=("--num_split",),
        ),
        Flag("--cost-model", "split by a cost model csv (with --memory): refused, give --num-splits", group=EXPORT),
        Flag(
            "--dynamic-to-fixed-shape-dim-param",
            "QNN only: symbolic dimensions to fix (no effect for CPU/CUDA)",
            kind="list",
            group=OTHER,
        ),
        Flag(
            "--dynamic-to-fixed-shape-dim-value",
            "QNN only: their values (no effect for CPU/CUDA)",
            kind="list",
            group=OTHER,
        ),
        Flag(
            "--mixed-precision-overrides-config",
            "QNN only: name/precision pairs (no effect for CPU/CUDA)",
            kind="list",
            group=OTHER,
        ),
        *_search(),
        *shared_cache_flags(),
        *output_flags(),
        *telemetry_flags(),
        *remote_flags(),
    ),
)

OPTIMIZE = Command(
    "optimize",
    "Olive's `optimize` (0.9+): its pass schedule for a precision and an execution provider: Gptq -> ModelBuilder "
    "for int4 Hugging Face models (wikitext-2 calibration, as Olive), torch's exporter with --exporter, "
    "RTN for ONNX models.",
    (
        *model_flags(adapter=True, pt=True, output_default="optimized-model"),
        Flag(
            "--provider",
            "execution provider: CPUExecutionProvider | CUDAExecutionProvider | "
            "WebGpuExecutionProvider (NPU/OpenVINO/TensorRT-RTX providers are refused)",
            default="CPUExecutionProvider",
            choices=EXECUTION_PROVIDERS,
            group=ACCEL,
        ),
        Flag("--device", "target device (cpu | gpu; npu is refused)", choices=("cpu", "gpu", "npu"), group=ACCEL),
        Flag(
            "--precision",
            "fp32 (default) | fp16 | bf16 | int4 | uint4 | int8 (static, refused)",
            default="fp32",
            choices=PRECISIONS,
            group=EXPORT,
        ),
        Flag(
            "--act_precision",
            "activation precision of static quantization (refused: static quantization is for NPUs)",
            choices=PRECISIONS,
            group=QUANT,
        ),
        Flag(
            "--num_split",
            "split into N pipeline parts (CaptureSplitInfo + SplitModel)",
            kind="int",
            group=EXPORT,
            aliases=("--num-splits",),
        ),
        Flag("--memory", "split by device memory (refused: give --num_split)", kind="int", group=EXPORT),
        Flag(
            "--exporter",
            "model_builder (default) | dynamo_exporter | torchscript_exporter (optimum_exporter is refused)",
            choices=("model_builder", "dynamo_exporter", "torchscript_exporter", "optimum_exporter"),
            group=EXPORT,
        ),
        Flag("--dim_param", "NPU only: dynamic dimensions to fix (no effect for CPU/CUDA)", group=OTHER),
        Flag("--dim_value", "NPU only: their values (no effect for CPU/CUDA)", group=OTHER),
        Flag("--use_qdq_format", "QDQ format (for NPUs): refused", kind="flag", group=QUANT),
        Flag("--surgeries", "graph surgeries to apply (GraphSurgeries), comma-separated", kind="list", group=EXPORT),
        Flag("--block_size", "int4 block size (16-256; -1 per channel for ONNX RTN)", kind="int", group=QUANT),
        Flag("--modality", "model modality: text", default="text", choices=("text",), group=OTHER),
        Flag("--enable_aot", "QNN ahead-of-time compilation: refused", kind="flag", group=OTHER),
        Flag("--qnn_env_path", "QNN environment (with --enable_aot): refused", group=OTHER),
        Flag(
            "--extra_mb_options",
            "extra model builder options, KEY=VALUE,... (e.g. "
            "int4_is_symmetric=false,int4_op_types_to_quantize=MatMul/Gather)",
            group=EXPORT,
        ),
        *output_flags(),
        *telemetry_flags(),
    ),
    versions="0.9-0.13",
)

CAPTURE = Command(
    "capture-onnx-graph",
    "Olive's `capture-onnx-graph`: torch's ONNX exporter (OnnxConversion, the LoRA adapter kept as separate "
    "MatMuls) or, with --use_model_builder, onnxruntime-genai's model builder.",
    (
        *model_flags(adapter=True, pt=True, output_default="onnx-model"),
        Flag(
            "--conversion_device",
            "device the model is traced on (cpu | gpu); the graph is the same",
            default="cpu",
            choices=("cpu", "gpu"),
            group=EXPORT,
        ),
        Flag("--use_dynamo_exporter", "torch.onnx's dynamo exporter instead of TorchScript", kind="flag", group=EXPORT),
        Flag(
            "--use_model_builder",
            "onnxruntime-genai's model builder instead of torch's exporter",
            kind="flag",
            group=EXPORT,
        ),
        Flag("--use_mobius_builder", "MobiusBuilder (mobius-ai): refused", kind="flag", group=OTHER),
        Flag(
            "--model_variant",
            "diffusion model variant (sd, sdxl, ...): refused, diffusion models are not supported",
            group=OTHER,
        ),
        Flag(
            "--fixed_param_dict",
            "fix dynamic dimensions, e.g. batch_size=1,max_length=128 (refused: the "
            "genai decoder keeps dynamic shapes)",
            group=EXPORT,
        ),
        Flag(
            "--past_key_value_name",
            "name of the past key values argument (dynamo exporter)",
            default="past_key_values",
            group=EXPORT,
        ),
        Flag("--torch_dtype", "dtype to cast the model to before export (float32 | float16)", group=EXPORT),
        Flag("--target_opset", "ONNX opset of torch's exporter", kind="int", default=17, group=EXPORT),
        Flag(
            "--precision",
            "model builder precision: fp16 (default, built for CUDA as Olive) | fp32 | int4 | bf16",
            default="fp16",
            choices=("fp16", "fp32", "int4", "bf16"),
            group=EXPORT,
        ),
        Flag("--int4_block_size", "model builder int4 block size (16-256)", kind="int", group=QUANT),
        Flag(
            "--int4_accuracy_level",
            "model builder int4 accuracy level (1 fp32, 2 fp16, 3 bf16, 4 int8)",
            kind="int",
            group=QUANT,
        ),
        Flag(
            "--exclude_embeds", "model builder: leave the embedding layer out (true/false)", kind="bool", group=EXPORT
        ),
        Flag("--exclude_lm_head", "model builder: leave the LM head out (true/false)", kind="bool", group=EXPORT),
        Flag(
            "--enable_cuda_graph",
            "model builder: CUDA graph capture for the CUDA provider (true/false)",
            kind="bool",
            group=EXPORT,
        ),
        Flag("--extra_mb_options", "extra model builder options, KEY=VALUE,...", group=EXPORT),
        Flag(
            "--use_ort_genai",
            "also write onnxruntime-genai's genai_config.json for the exported graph (ModelBuilder metadata_only)",
            kind="flag",
            group=EXPORT,
        ),
        *output_flags(),
        *shared_cache_flags(),
        *telemetry_flags(),
        *remote_flags(),
    ),
)
