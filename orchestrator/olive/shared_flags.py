"""The flag sets most Olive commands share (-m/-o and the Hugging Face model flags, output and logging, the
refused shared cache, telemetry, Olive 0.7-0.8's remote run, the accelerator) and the value sets several take
(precisions, execution providers). Every command family's table (finetune_quantize_flags, export_flags,
adapter_flags, single_pass_flags, and `run`'s in flags) is built from these, so a shared flag reads the same on
every command.
"""

from __future__ import annotations

from orchestrator.olive.flag_spec import ACCEL, OTHER, OUTPUT, REMOTE, Flag

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


def model_flags(
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


def output_flags() -> list[Flag]:
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


def shared_cache_flags() -> list[Flag]:
    why = "refused: Olive's Azure Blob shared cache; orch caches every pass by content (engine.cache_dir)"
    return [Flag("--account_name", why, group=OTHER), Flag("--container_name", why, group=OTHER)]


def telemetry_flags() -> list[Flag]:
    return [Flag("--disable_telemetry", "accepted: orch sends no telemetry", kind="flag", group=OTHER)]


def remote_flags() -> list[Flag]:
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


def accelerator_flags(*, single: bool = True, default_provider: str | None = "CPUExecutionProvider") -> list[Flag]:
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
