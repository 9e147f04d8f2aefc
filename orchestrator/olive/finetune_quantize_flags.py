"""Olive's `finetune` and `quantize` flags, flag for flag (Olive 0.7-0.13): the two commands that read a data
set (one trains on it, the other calibrates with it), so the data-set flags they share are built here.

Each flag is decided by the command's builder (olive.finetune, olive.quantize): honoured, accepted with a note, or
refused in one line.
"""

from __future__ import annotations

from orchestrator.olive.flag_spec import DATA, OTHER, QUANT, TRAIN, Command, Flag
from orchestrator.olive.shared_flags import (
    PRECISIONS,
    model_flags,
    output_flags,
    remote_flags,
    shared_cache_flags,
    telemetry_flags,
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


FINETUNE = Command(
    "finetune",
    "Olive's `finetune`: LoRA (or QLoRA, DoRA, LoHa, LoKr) fine-tuning with peft; every other --name value flag "
    "is a transformers TrainingArguments field (e.g. --max_steps 100 --learning_rate 2e-4).",
    (
        *model_flags(adapter=False, output_default=None),
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
        *shared_cache_flags(),
        *output_flags(),
        *telemetry_flags(),
        *remote_flags(),
    ),
    extra_args=True,
)

QUANTIZE = Command(
    "quantize",
    "Olive's `quantize`: AWQ / GPTQ / RTN on a Hugging Face model (a quantized checkpoint), RTN / HQQ / dynamic "
    "int8 / INC on an ONNX model.",
    (
        *model_flags(adapter=True, pt=True, output_default="quantized-model"),
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
        *shared_cache_flags(),
        *output_flags(),
        *telemetry_flags(),
        *remote_flags(),
    ),
)
