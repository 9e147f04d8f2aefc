"""Olive's command-line surface, 0.7 to 0.13, flag for flag: one table per command.

Every flag a released Olive CLI command takes is listed here with its help text, so that `orch <command>` parses
all of them (never an unknown-flag error for a real Olive flag) and the command's builder (one module per command,
named in olive.commands.BUILDERS) decides for each one: honoured, accepted with a note saying why it changes
nothing, or refused in one line with what to use instead. The CLI builds its typer commands from these tables
(cli.olive); tests walk them.

Olive's argparse grammar has two forms click does not: space-separated lists (`--input_cols a b`) and flags with
an optional value (`--test [DIR]`, `--enable_search [SAMPLER]`). `normalize_argv` rewrites those into one
`--flag=value` token before click sees the line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LIST_SEP = "\x1f"  # joins the items of a space-separated list flag into one click value

MODEL = "Model"
DATA = "Data"
TRAIN = "Fine-tuning"
EXPORT = "Export"
QUANT = "Quantization"
ACCEL = "Accelerator"
OUTPUT = "Output and logging"
REMOTE = "Azure ML (Olive 0.7-0.8 remote run)"
OTHER = "Accepted for compatibility"


@dataclass(frozen=True)
class Flag:
    """One Olive flag. kind: str | int | float | flag (store_true) | bool (Olive's type=bool: takes a value) |
    list (nargs * or +: space-separated items) | optional (nargs ?: a value or `const` when given bare)."""

    name: str
    help: str
    kind: str = "str"
    default: Any = None
    short: str | None = None
    group: str = MODEL
    choices: tuple[str, ...] | None = None
    const: str | None = None
    aliases: tuple[str, ...] = ()
    required: bool = False

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")

    @property
    def spellings(self) -> tuple[str, ...]:
        """--name plus its dash/underscore twin (Olive mixes both: --num-splits, --num_split), short, aliases."""
        twin = "--" + (self.name[2:].replace("_", "-") if "_" in self.name else self.name[2:].replace("-", "_"))
        names = [self.name, *self.aliases]
        if twin not in names:
            names.append(twin)
        return tuple(dict.fromkeys([*names, *([self.short] if self.short else [])]))


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    flags: tuple[Flag, ...]
    extra_args: bool = False  # finetune: other --name value pairs are transformers TrainingArguments
    versions: str = "0.7-0.13"

    def flag(self, dest: str) -> Flag:
        return next(f for f in self.flags if f.dest == dest)


PRECISIONS = (
    "int4",
    "int8",
    "int16",
    "int32",
    "uint4",
    "uint8",
    "uint16",
    "uint32",
    "fp4",
    "fp8",
    "fp16",
    "fp32",
    "nf4",
    "bf16",
)
EXECUTION_PROVIDERS = (
    "CPUExecutionProvider",
    "CUDAExecutionProvider",
    "DmlExecutionProvider",
    "JsExecutionProvider",
    "MIGraphXExecutionProvider",
    "NvTensorRTRTXExecutionProvider",
    "OpenVINOExecutionProvider",
    "QNNExecutionProvider",
    "ROCMExecutionProvider",
    "TensorrtExecutionProvider",
    "VitisAIExecutionProvider",
    "WebGpuExecutionProvider",
)
QUANT_ALGORITHMS = (
    "awq",
    "gptq",
    "hqq",
    "kquant",
    "rtn",
    "spinquant",
    "quarot",
    "lpbq",
    "seqmse",
    "adaround",
    "static",
    "dynamic",
)
WEIGHT_FORMATS = ("onnx_adapter", "numpy", "safetensors", "pt")


def _model(
    *,
    hf: bool = True,
    adapter: bool = False,
    pt: bool = False,
    required: bool = True,
    output_default: str | None = None,
    output_help: str = "where the command writes its output",
) -> list[Flag]:
    out = [
        Flag(
            "--model_name_or_path",
            "input model: a Hugging Face model folder or hub id, an ONNX model file or "
            "folder, an azureml:// model, or the output folder of an earlier orch/olive command",
            short="-m",
            required=required,
        ),
        Flag(
            "--output_path",
            "where the command writes its output"
            if output_default is None
            else f"{output_help} (default: {output_default})",
            short="-o",
            group=OUTPUT,
            default=output_default,
            required=required and output_default is None,
        ),
    ]
    if hf:
        out += [
            Flag("--task", "Hugging Face task of the model (default text-generation)", short="-t"),
            Flag("--trust_remote_code", "trust remote code when loading the Hugging Face model", kind="flag"),
            Flag(
                "--test",
                "use a randomly initialized copy of the model with 2 hidden layers (same architecture "
                "and tokenizer), saved to DIR (default <output_path>/test_model) and reused",
                kind="optional",
                const="true",
            ),
            Flag(
                "--is_generative_model",
                "Olive 0.7-0.8: whether the model is generative; orch optimizes "
                "generative language models (false is refused)",
                kind="bool",
                group=OTHER,
            ),
        ]
    if adapter:
        out.append(
            Flag(
                "--adapter_path", "a PEFT adapter folder (the output of finetune) that goes with the model", short="-a"
            )
        )
    if pt:
        out += [
            Flag(
                "--model_script",
                "refused: PyTorch model-loader scripts are not run; give a Hugging Face or ONNX model",
                group=OTHER,
            ),
            Flag("--script_dir", "refused with --model_script", group=OTHER),
        ]
    return out


def _output() -> list[Flag]:
    return [
        Flag(
            "--log_level",
            "logging level: 0 debug, 1 info (streams the passes' logs), 2 warning, 3 error, 4 critical",
            kind="int",
            default=3,
            group=OUTPUT,
        ),
        Flag(
            "--save_config_file",
            "write the workflow this command runs to <output_path>/config.json (`orch run --config` runs it again)",
            kind="flag",
            group=OUTPUT,
        ),
        Flag(
            "--dry_run",
            "run nothing: print the plan (which passes would run, which are cached) and, as Olive's "
            "--dry_run, write the workflow to <output_path>/config.json",
            kind="flag",
            group=OUTPUT,
        ),
    ]


def _shared_cache() -> list[Flag]:
    why = "refused: Olive's Azure Blob shared cache; orch caches every pass by content (engine.cache_dir)"
    return [Flag("--account_name", why, group=OTHER), Flag("--container_name", why, group=OTHER)]


def _telemetry() -> list[Flag]:
    return [Flag("--disable_telemetry", "accepted: orch sends no telemetry", kind="flag", group=OTHER)]


def _remote() -> list[Flag]:
    return [
        Flag(
            "--resource_group",
            "Olive 0.7-0.8 remote run: the Azure ML workspace's resource group (with "
            "--workspace_name and --aml_compute the passes run as Azure ML jobs)",
            group=REMOTE,
        ),
        Flag("--workspace_name", "Olive 0.7-0.8 remote run: the Azure ML workspace", group=REMOTE),
        Flag("--aml_compute", "Olive 0.7-0.8 remote run: the compute cluster the jobs run on", group=REMOTE),
        Flag(
            "--keyvault_name",
            "Olive 0.7-0.8 remote run: the Key Vault holding the HF token (secret hf-token)",
            group=REMOTE,
        ),
    ]


def _accelerator(*, single: bool = True, default_provider: str | None = "CPUExecutionProvider") -> list[Flag]:
    out = [
        Flag(
            "--device",
            "target device: cpu or gpu (npu is refused: no NPU toolchain)",
            default="cpu",
            choices=("gpu", "cpu", "npu"),
            group=ACCEL,
        )
    ]
    if single:
        out.append(
            Flag(
                "--provider",
                "execution provider the ONNX model is built for (CPU, CUDA, DirectML or WebGPU)",
                default=default_provider,
                choices=EXECUTION_PROVIDERS,
                group=ACCEL,
            )
        )
    else:
        out.append(
            Flag(
                "--providers_list",
                "execution providers to tune for (space-separated)",
                kind="list",
                choices=EXECUTION_PROVIDERS,
                group=ACCEL,
                aliases=("--provider",),
            )
        )
    out.append(
        Flag("--memory", "accelerator memory (only read to split by a cost model, which is refused)", group=ACCEL)
    )
    return out


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


def _dataset(*, train_eval: bool, required: bool) -> list[Flag]:
    out = [
        Flag(
            "--data_name",
            "data set: a local file or folder, `json`/`csv`/`parquet` with --data_files, or a hub id",
            short="-d",
            group=DATA,
            required=required,
        )
    ]
    if train_eval:
        out += [
            Flag("--train_subset", "subset (configuration) of the data set to train on", group=DATA),
            Flag(
                "--train_split", 'split to train on (datasets syntax, e.g. "train[:80%]")', default="train", group=DATA
            ),
            Flag("--eval_subset", "subset of the data set to evaluate on", group=DATA),
            Flag("--eval_split", 'split to evaluate on (e.g. "train[80%:]"); none: no evaluation', group=DATA),
        ]
    else:
        out += [
            Flag("--subset", "subset (configuration) of the data set", group=DATA),
            Flag("--split", "split of the data set (default train)", group=DATA),
        ]
    out += [
        Flag("--data_files", "data file(s), comma-separated", group=DATA),
        Flag("--text_field", "the column that holds the text", group=DATA),
        Flag(
            "--text_template",
            "a template of the row's columns, e.g. '### Question: {prompt} \\n### Answer: "
            "{response}' (\\n and \\t are decoded)",
            group=DATA,
        ),
        Flag(
            "--use_chat_template",
            "render each row with the tokenizer's chat template: a `messages` column, "
            "ShareGPT `conversations`, or instruction data (instruction/input/output, prompt/response, ...)",
            kind="flag",
            group=DATA,
        ),
        Flag("--max_seq_len", "maximum sequence length in tokens", kind="int", default=1024, group=DATA),
        Flag(
            "--add_special_tokens", "add the tokenizer's BOS/EOS around each text (true/false)", kind="bool", group=DATA
        ),
        Flag("--max_samples", "use at most this many rows of the data set", kind="int", group=DATA),
        Flag(
            "--batch_size",
            "data loader batch size (calibration/evaluation); fine-tuning batches are --per_device_train_batch_size",
            kind="int",
            group=DATA,
        ),
        Flag(
            "--input_cols",
            "input column names (space-separated); text generation reads the text columns above",
            kind="list",
            group=DATA,
        ),
    ]
    return out


# ---- the commands -------------------------------------------------------------------------------------------

FINETUNE = Command(
    "finetune",
    "Olive's `finetune`: LoRA (or QLoRA, DoRA, LoHa, LoKr) fine-tuning with peft; every other --name value flag "
    "is a transformers TrainingArguments field (e.g. --max_steps 100 --learning_rate 2e-4).",
    (
        *_model(adapter=False, output_default=None),
        Flag(
            "--method",
            "lora | qlora (4-bit base, CUDA) | dora | loha | lokr",
            default="lora",
            group=TRAIN,
            choices=("lora", "qlora", "dora", "loha", "lokr"),
        ),
        Flag("--lora_r", "LoRA rank", kind="int", default=64, group=TRAIN),
        Flag("--lora_alpha", "LoRA alpha (scaling = alpha / r)", kind="float", default=16, group=TRAIN),
        Flag("--lora_dropout", "dropout of the LoRA layers", kind="float", default=0.05, group=TRAIN),
        Flag(
            "--target_modules",
            "modules to adapt, comma-separated (default: every linear layer but the LM "
            "head); q_proj,k_proj,v_proj on a Phi-3-family model map to its fused qkv_proj",
            group=TRAIN,
        ),
        Flag(
            "--torch_dtype",
            "dtype to train in on a GPU (bfloat16 | float16 | float32); a CPU trains in float32",
            default="bfloat16",
            choices=("bfloat16", "float16", "float32"),
            group=TRAIN,
        ),
        *_dataset(train_eval=True, required=True),
        *_shared_cache(),
        *_output(),
        *_telemetry(),
        *_remote(),
    ),
    extra_args=True,
)

QUANTIZE = Command(
    "quantize",
    "Olive's `quantize`: AWQ / GPTQ / RTN on a Hugging Face model (a quantized checkpoint), RTN / HQQ / dynamic "
    "int8 / INC on an ONNX model.",
    (
        *_model(adapter=True, pt=True, output_default="quantized-model"),
        Flag(
            "--algorithm",
            "awq | gptq | rtn | hqq (ONNX) | dynamic / static (ONNX int8)",
            default="rtn",
            choices=QUANT_ALGORITHMS,
            group=QUANT,
            aliases=(),
        ),
        Flag(
            "--precision",
            "int4 (orch's default, as Olive 0.7) | int8 | uint4 | uint8; Olive >= 0.8 defaults to "
            "int8: give it to get that",
            choices=PRECISIONS,
            group=QUANT,
        ),
        Flag(
            "--act_precision",
            "activation precision of static quantization (static is refused)",
            choices=PRECISIONS,
            group=QUANT,
        ),
        Flag(
            "--implementation",
            "olive (default) | awq | autogptq | gptq | ort | matmul4 | inc | bnb | nvmo | "
            "quarot | spinquant | aimet: which implementation runs the algorithm",
            group=QUANT,
        ),
        Flag(
            "--use_qdq_encoding",
            "QDQ encoding (for NPUs): refused",
            kind="flag",
            group=QUANT,
            aliases=("--enable-qdq-encoding",),
        ),
        Flag("--quarot_rotate", "Olive 0.7: QuaRot rotation, refused", kind="flag", group=OTHER),
        *_dataset(train_eval=False, required=False),
        *_shared_cache(),
        *_output(),
        *_telemetry(),
        *_remote(),
    ),
)

AUTO_OPT = Command(
    "auto-opt",
    "Olive's `auto-opt` (deprecated by `optimize` in Olive 0.13): a Hugging Face model -> an ONNX model for "
    "onnxruntime-genai (the model builder; torch's exporter with --use_dynamo_exporter), quantized to --precision; "
    "with --adapter_path the adapter stays separate (adapter_weights.onnx_adapter).",
    (
        *_model(adapter=True, pt=True, output_default="auto-opt-output"),
        *_accelerator(single=True),
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
        *_shared_cache(),
        *_output(),
        *_telemetry(),
        *_remote(),
    ),
)

OPTIMIZE = Command(
    "optimize",
    "Olive's `optimize` (0.9+): its pass schedule for a precision and an execution provider: Gptq -> ModelBuilder "
    "for int4 Hugging Face models (wikitext-2 calibration, as Olive), torch's exporter with --exporter, "
    "RTN for ONNX models.",
    (
        *_model(adapter=True, pt=True, output_default="optimized-model"),
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
        *_output(),
        *_telemetry(),
    ),
    versions="0.9-0.13",
)

CAPTURE = Command(
    "capture-onnx-graph",
    "Olive's `capture-onnx-graph`: torch's ONNX exporter (OnnxConversion, the LoRA adapter kept as separate "
    "MatMuls) or, with --use_model_builder, onnxruntime-genai's model builder.",
    (
        *_model(adapter=True, pt=True, output_default="onnx-model"),
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
        *_output(),
        *_shared_cache(),
        *_telemetry(),
        *_remote(),
    ),
)

GENERATE_ADAPTER = Command(
    "generate-adapter",
    "Olive's `generate-adapter`: an ONNX model exported with a LoRA adapter (capture-onnx-graph, auto-opt) -> "
    "the base model with the LoRA weights as inputs + the adapter weights file (ExtractAdapters). orch also takes "
    "a Hugging Face base model with --adapter_path and builds that ONNX model first.",
    (
        *_model(hf=False, adapter=True, output_default="optimized-model"),
        Flag(
            "--adapter_type",
            "lora (dora / loha adapters cannot be ONNX inputs: merge them first)",
            default="lora",
            choices=("lora", "dora", "loha"),
            group=EXPORT,
        ),
        Flag(
            "--adapter_format",
            "onnx_adapter (default) | numpy | safetensors",
            default="onnx_adapter",
            choices=WEIGHT_FORMATS,
            group=EXPORT,
        ),
        Flag(
            "--precision",
            "orch: precision of the ONNX model built from an HF base + --adapter_path",
            default="int4",
            choices=("int4", "int8", "fp16", "fp32", "bf16"),
            group=EXPORT,
        ),
        Flag("--trust_remote_code", "trust remote code when loading a Hugging Face base", kind="flag"),
        *_output(),
        *_shared_cache(),
        *_telemetry(),
        *_remote(),
    ),
)

CONVERT_ADAPTERS = Command(
    "convert-adapters",
    "Olive's `convert-adapters`: a PEFT LoRA folder -> one adapter weights file for the ONNX base model that "
    "auto-opt / generate-adapter built (the builder's weight names).",
    (
        Flag("--adapter_path", "PEFT LoRA adapter folder", short="-a", required=True),
        Flag(
            "--adapter_format",
            "onnx_adapter (default) | numpy | safetensors",
            default="onnx_adapter",
            choices=WEIGHT_FORMATS,
            group=EXPORT,
        ),
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
        *_telemetry(),
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
        *_telemetry(),
    ),
    versions="0.8-0.13",
)

TUNE_SESSION_PARAMS = Command(
    "tune-session-params",
    "Olive's `tune-session-params`: time onnxruntime session settings for an ONNX model (OrtSessionParamsTuning) "
    "and write the fastest as <output_path>/<device>-<provider>.json (Olive's inference settings).",
    (
        *_model(hf=False, output_default="tuned-inference-settings"),
        Flag("--cpu_cores", "CPU cores the tuned session may use", kind="int", group=ACCEL),
        Flag("--io_bind", "bind inputs and outputs on the device (I/O binding)", kind="flag", group=ACCEL),
        Flag("--enable_cuda_graph", "CUDA graph capture (CUDA provider)", kind="flag", group=ACCEL),
        Flag("--execution_mode_list", "execution modes to try (0 sequential, 1 parallel)", kind="list", group=ACCEL),
        Flag("--opt_level_list", "graph optimization levels to try (0, 1, 2, 99)", kind="list", group=ACCEL),
        Flag("--trt_fp16_enable", "TensorRT fp16 (TensorRT provider)", kind="flag", group=ACCEL),
        Flag("--intra_thread_num_list", "intra-op thread counts to try", kind="list", group=ACCEL),
        Flag("--inter_thread_num_list", "inter-op thread counts to try", kind="list", group=ACCEL),
        Flag("--extra_session_config", "extra session config entries as JSON", group=ACCEL),
        Flag(
            "--disable_force_evaluate_other_eps",
            "do not evaluate the other providers when the first fails",
            kind="flag",
            group=ACCEL,
        ),
        Flag("--enable_profiling", "onnxruntime profiling while tuning", kind="flag", group=ACCEL),
        Flag(
            "--predict_with_kv_cache",
            "time one decode step with a KV cache instead of a prompt",
            kind="flag",
            group=ACCEL,
        ),
        *_accelerator(single=False),
        *_output(),
        *_shared_cache(),
        *_telemetry(),
        *_remote(),
    ),
)

RUN_PASS = Command(
    "run-pass",
    "Olive's `run-pass` (0.10+): run one pass on a model (--pass-name, --pass-config JSON); --list-passes lists "
    "the pass types orch runs.",
    (
        *_model(adapter=True, pt=True, required=False, output_default="run-pass-output"),
        Flag("--pass-name", "the pass type, e.g. OnnxDynamicQuantization", group=EXPORT),
        Flag("--pass-config", "the pass's config as JSON", group=EXPORT),
        Flag("--list-passes", "list the pass types and exit", kind="flag", group=EXPORT),
        *_accelerator(single=True),
        *_output(),
        *_telemetry(),
    ),
    versions="0.10-0.13",
)

# `orch run` is orch's own command (typer, in cli.main); these are Olive's flags it also takes.
RUN_FLAGS = (
    Flag(
        "--list_required_packages",
        "list the environments and packages the workflow's passes need, and exit",
        kind="flag",
        group=OTHER,
        aliases=("--packages",),
    ),
    Flag(
        "--setup",
        "Olive 0.7-0.8: build the environments the workflow's passes need (side venvs), and exit",
        kind="flag",
        group=OTHER,
    ),
    Flag("--tempdir", "root folder for temporary files", group=OTHER),
    Flag("--package-config", "refused: Olive's pass package registry; orch's passes are built in", group=OTHER),
    Flag("--model_name_or_path", "replace the workflow's input model", short="-m"),
    Flag("--output_path", "replace the workflow's output_dir", short="-o", group=OUTPUT),
    Flag("--task", "task of the replacing model", short="-t"),
    Flag("--trust_remote_code", "trust remote code of the replacing model", kind="flag"),
    Flag("--adapter_path", "adapter of the replacing model", short="-a"),
    Flag(
        "--test",
        "run on a random 2-layer copy of the input model (saved to DIR, default <output_dir>/test_model)",
        kind="optional",
        const="true",
    ),
    Flag("--model_script", "refused: PyTorch model-loader scripts are not run", group=OTHER),
    Flag("--script_dir", "refused with --model_script", group=OTHER),
    Flag("--log_level", "replace the workflow's log_severity_level", kind="int", group=OUTPUT),
    Flag("--disable_telemetry", "accepted: orch sends no telemetry", kind="flag", group=OTHER),
)

COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        FINETUNE,
        QUANTIZE,
        AUTO_OPT,
        OPTIMIZE,
        CAPTURE,
        GENERATE_ADAPTER,
        CONVERT_ADAPTERS,
        EXTRACT_ADAPTERS,
        TUNE_SESSION_PARAMS,
        RUN_PASS,
    )
}

# Olive commands orch does not run, and what to use instead (the CLI answers with this one line).
UNSUPPORTED_COMMANDS: dict[str, str] = {
    "benchmark": "lm-evaluation-harness benchmarks are not run by orch; add an evaluator with perplexity / "
    "accuracy / latency / throughput metrics to a workflow (`orch run --config`)",
    "shared-cache": "Olive's Azure Blob shared cache is not used: orch caches passes by content in "
    "engine.cache_dir (`orch cache ls`, `orch cache clean`)",
    "generate-cost-model": "cost-model splitting is not supported; split by layer count (auto-opt --num-splits N)",
    "configure-qualcomm-sdk": "Qualcomm NPU toolchains are not part of orch (CPU, CUDA, DirectML and WebGPU builds)",
    "manage-aml-compute": "create Azure ML compute with orch's infra/ templates or `az ml compute create`; "
    "orch submits to an existing cluster (systems.<name>.aml_compute)",
    "diffusion-lora": "diffusion models are not supported: orch fine-tunes language models (`orch finetune`)",
    "model-package": "Olive's model packaging for Foundry Local / AITK is not supported; the output folder's "
    "model/ is an onnxruntime-genai model (packaging_config Zipfile zips it)",
    "init": "the interactive wizard is not provided; start from `orch finetune`, `orch optimize` or a workflow "
    "file (`orch run --config`)",
}


def normalize_argv(command: Command | tuple[Flag, ...], argv: list[str]) -> list[str]:
    """Olive's argparse grammar -> one token per flag value: `--input_cols a b` -> `--input_cols=a<SEP>b`, and a
    bare optional-value flag (`--test` then another flag or the end) -> `--test=<const>`."""
    flags = command.flags if isinstance(command, Command) else command
    by_name = {s: f for f in flags for s in f.spellings}
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        name = token.split("=", 1)[0]
        spec = by_name.get(name)
        if spec is None or "=" in token or spec.kind not in ("list", "optional"):
            out.append(token)
            i += 1
            continue
        values: list[str] = []
        j = i + 1
        while j < len(argv) and not _is_flag(argv[j]) and (spec.kind == "list" or not values):
            values.append(argv[j])
            j += 1
        if spec.kind == "optional":
            out.append(f"{name}={values[0] if values else spec.const}")
        else:
            out.append(f"{name}={LIST_SEP.join(values)}")
        i = j
    return out


def _is_flag(token: str) -> bool:
    """A token that starts another flag (negative numbers are values)."""
    return token.startswith("-") and not token[1:2].isdigit() and token != "-"


def split_values(value: str | None) -> list[str] | None:
    """A list flag's value (LIST_SEP-joined, or typed comma-separated) -> its items."""
    if value is None:
        return None
    items = value.split(LIST_SEP) if LIST_SEP in value else [value]
    return [v.strip() for item in items for v in item.split(",") if v.strip()] if items != [""] else []


def parse_bool(flag: str, value: str | bool | None) -> bool | None:
    """Olive's type=bool flags take a value; "false"/"0"/"no" mean False (argparse's bool("False") would not)."""
    if value is None or isinstance(value, bool):
        return value
    low = value.strip().lower()
    if low in ("1", "true", "yes", "y", "on"):
        return True
    if low in ("0", "false", "no", "n", "off", ""):
        return False
    from orchestrator.core.errors import UserError

    raise UserError(f"{flag} {value!r}: give true or false")


@dataclass
class Given:
    """The values a command line gave, by dest, with the flags that were set explicitly (not defaulted)."""

    values: dict[str, Any]
    explicit: set[str] = field(default_factory=set)

    def __getitem__(self, key: str) -> Any:
        return self.values.get(key)

    def get(self, key: str, default: Any = None) -> Any:
        value = self.values.get(key)
        return default if value is None else value

    def given(self, key: str) -> bool:
        return key in self.explicit
