"""Olive 0.7-0.13's command-line surface, complete per command: every flag Olive's argparse defines for a command
(OLIVE_FLAGS, read from olive/cli/*.py of those releases) is parsed by `orch <command>` with help text, and ends
honoured, noted or refused in one line: never an unknown-flag error, never a traceback. Then what the flags do:
the pass Olive would pick for quantize / optimize / auto-opt / capture-onnx-graph, and end-to-end runs of the
chains the known misses were about (quantize of an HF model the Olive >= 0.10 way, capture-onnx-graph with an
adapter then generate-adapter from the ONNX folder alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# Every flag of each Olive command in releases 0.7.0, 0.8.0, 0.9.3, 0.10.0, 0.11.0, 0.12.1, 0.13.0 (their
# olive/cli/<command>.py register_subcommand and the olive/cli/base.py option groups it calls), union of releases.
OLIVE_FLAGS: dict[str, set[str]] = {
    "finetune": {
        "--account_name",
        "--add_special_tokens",
        "--aml_compute",
        "--batch_size",
        "--container_name",
        "--data_files",
        "--data_name",
        "--disable_telemetry",
        "--dry_run",
        "--eval_split",
        "--eval_subset",
        "--input_cols",
        "--is_generative_model",
        "--keyvault_name",
        "--log_level",
        "--lora_alpha",
        "--lora_r",
        "--max_samples",
        "--max_seq_len",
        "--method",
        "--model_name_or_path",
        "--output_path",
        "--resource_group",
        "--save_config_file",
        "--target_modules",
        "--task",
        "--test",
        "--text_field",
        "--text_template",
        "--torch_dtype",
        "--train_split",
        "--train_subset",
        "--trust_remote_code",
        "--use_chat_template",
        "--workspace_name",
        "-d",
        "-m",
        "-o",
        "-t",
    },
    "quantize": {
        "--account_name",
        "--act_precision",
        "--adapter_path",
        "--add_special_tokens",
        "--algorithm",
        "--aml_compute",
        "--batch_size",
        "--container_name",
        "--data_files",
        "--data_name",
        "--disable_telemetry",
        "--dry_run",
        "--enable-qdq-encoding",
        "--implementation",
        "--input_cols",
        "--is_generative_model",
        "--keyvault_name",
        "--log_level",
        "--max_samples",
        "--max_seq_len",
        "--model_name_or_path",
        "--model_script",
        "--output_path",
        "--precision",
        "--quarot_rotate",
        "--resource_group",
        "--save_config_file",
        "--script_dir",
        "--split",
        "--subset",
        "--task",
        "--test",
        "--text_field",
        "--text_template",
        "--trust_remote_code",
        "--use_chat_template",
        "--use_qdq_encoding",
        "--workspace_name",
        "-a",
        "-d",
        "-m",
        "-o",
        "-t",
    },
    "auto-opt": {
        "--account_name",
        "--adapter_path",
        "--aml_compute",
        "--batch_size",
        "--container_name",
        "--cost-model",
        "--data_name",
        "--device",
        "--disable_telemetry",
        "--dry_run",
        "--dynamic-to-fixed-shape-dim-param",
        "--dynamic-to-fixed-shape-dim-value",
        "--enable_search",
        "--input_cols",
        "--is_generative_model",
        "--keyvault_name",
        "--log_level",
        "--memory",
        "--mixed-precision-overrides-config",
        "--model_name_or_path",
        "--model_script",
        "--num-splits",
        "--output_path",
        "--precision",
        "--provider",
        "--resource_group",
        "--save_config_file",
        "--script_dir",
        "--seed",
        "--split",
        "--subset",
        "--task",
        "--test",
        "--trust_remote_code",
        "--use_dynamo_exporter",
        "--use_model_builder",
        "--use_ort_genai",
        "--use_qdq_encoding",
        "--workspace_name",
        "-a",
        "-d",
        "-m",
        "-o",
        "-t",
    },
    "optimize": {
        "--act_precision",
        "--adapter_path",
        "--block_size",
        "--device",
        "--dim_param",
        "--dim_value",
        "--disable_telemetry",
        "--dry_run",
        "--enable_aot",
        "--exporter",
        "--extra_mb_options",
        "--log_level",
        "--memory",
        "--modality",
        "--model_name_or_path",
        "--model_script",
        "--num_split",
        "--output_path",
        "--precision",
        "--provider",
        "--qnn_env_path",
        "--save_config_file",
        "--script_dir",
        "--surgeries",
        "--task",
        "--test",
        "--trust_remote_code",
        "--use_qdq_format",
        "-a",
        "-m",
        "-o",
        "-t",
    },
    "capture-onnx-graph": {
        "--account_name",
        "--adapter_path",
        "--aml_compute",
        "--container_name",
        "--conversion_device",
        "--disable_telemetry",
        "--dry_run",
        "--enable_cuda_graph",
        "--exclude_embeds",
        "--exclude_lm_head",
        "--extra_mb_options",
        "--fixed_param_dict",
        "--int4_accuracy_level",
        "--int4_block_size",
        "--is_generative_model",
        "--keyvault_name",
        "--log_level",
        "--model_name_or_path",
        "--model_script",
        "--model_variant",
        "--output_path",
        "--past_key_value_name",
        "--precision",
        "--resource_group",
        "--save_config_file",
        "--script_dir",
        "--target_opset",
        "--task",
        "--test",
        "--torch_dtype",
        "--trust_remote_code",
        "--use_dynamo_exporter",
        "--use_mobius_builder",
        "--use_model_builder",
        "--use_ort_genai",
        "--workspace_name",
        "-a",
        "-m",
        "-o",
        "-t",
    },
    "generate-adapter": {
        "--account_name",
        "--adapter_format",
        "--adapter_type",
        "--aml_compute",
        "--container_name",
        "--disable_telemetry",
        "--dry_run",
        "--keyvault_name",
        "--log_level",
        "--model_name_or_path",
        "--output_path",
        "--resource_group",
        "--save_config_file",
        "--workspace_name",
        "-m",
        "-o",
    },
    "convert-adapters": {
        "--adapter_format",
        "--adapter_path",
        "--disable_telemetry",
        "--dtype",
        "--int4_block_size",
        "--int4_quantization_mode",
        "--log_level",
        "--output_path",
        "--quantize_int4",
        "-a",
        "-o",
    },
    "extract-adapters": {
        "--cache_dir",
        "--disable_telemetry",
        "--dtype",
        "--format",
        "--log_level",
        "--model",
        "--model_name_or_path",
        "--model_script",
        "--output",
        "--output_path",
        "--script_dir",
        "--task",
        "--test",
        "--trust_remote_code",
        "-f",
        "-m",
        "-o",
        "-t",
    },
    "tune-session-params": {
        "--account_name",
        "--aml_compute",
        "--container_name",
        "--cpu_cores",
        "--device",
        "--disable_force_evaluate_other_eps",
        "--disable_telemetry",
        "--dry_run",
        "--enable_cuda_graph",
        "--enable_profiling",
        "--execution_mode_list",
        "--extra_session_config",
        "--inter_thread_num_list",
        "--intra_thread_num_list",
        "--io_bind",
        "--keyvault_name",
        "--log_level",
        "--memory",
        "--model_name_or_path",
        "--opt_level_list",
        "--output_path",
        "--predict_with_kv_cache",
        "--providers_list",
        "--resource_group",
        "--save_config_file",
        "--trt_fp16_enable",
        "--workspace_name",
        "-m",
        "-o",
    },
    "run-pass": {
        "--adapter_path",
        "--device",
        "--disable_telemetry",
        "--dry_run",
        "--list-passes",
        "--log_level",
        "--memory",
        "--model_name_or_path",
        "--model_script",
        "--output_path",
        "--pass-config",
        "--pass-name",
        "--provider",
        "--save_config_file",
        "--script_dir",
        "--task",
        "--test",
        "--trust_remote_code",
        "-a",
        "-m",
        "-o",
        "-t",
    },
    "run": {
        "--adapter_path",
        "--config",
        "--disable_telemetry",
        "--list_required_packages",
        "--log_level",
        "--model_name_or_path",
        "--model_script",
        "--output_path",
        "--package-config",
        "--packages",
        "--run-config",
        "--script_dir",
        "--setup",
        "--task",
        "--tempdir",
        "--test",
        "--trust_remote_code",
        "-a",
        "-m",
        "-o",
        "-t",
    },
}
OLIVE_COMMANDS_NOT_RUN = (
    "benchmark",
    "shared-cache",
    "generate-cost-model",
    "configure-qualcomm-sdk",
    "manage-aml-compute",
    "diffusion-lora",
    "model-package",
    "init",
)


def _spellings(command: str) -> set[str]:
    """Every option string `orch <command>` accepts (from the click command typer builds)."""
    import typer

    from orchestrator.cli.main import app

    group = typer.main.get_command(app)
    cmd = group.commands[command]
    return {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}


@pytest.mark.parametrize("command", sorted(OLIVE_FLAGS))
def test_every_olive_flag_is_an_orch_flag_with_help(command: str) -> None:
    from orchestrator.olive.flags import COMMANDS

    missing = sorted(OLIVE_FLAGS[command] - _spellings(command))
    assert missing == [], f"orch {command} lacks Olive's {missing}"
    if command in COMMANDS:
        assert all(f.help.strip() for f in COMMANDS[command].flags), command


def _value(flag: Any, tmp: Path) -> list[str]:
    """A plausible command-line value for an Olive flag of the table."""
    if flag.kind == "flag":
        return []
    if flag.kind == "optional":
        return []
    if flag.kind == "list":
        return ["1", "2"] if "list" in flag.name or "dim-value" in flag.name else ["a", "b"]
    if flag.kind == "bool":
        return ["true"]
    if flag.kind == "int":
        return ["2"]
    if flag.kind == "float":
        return ["0.1"]
    if flag.choices:
        return [flag.choices[1] if len(flag.choices) > 1 else flag.choices[0]]
    if "path" in flag.name or flag.name in ("--model", "--output", "--tempdir", "--cache_dir"):
        return [str(tmp / "somewhere")]
    if flag.name == "--extra_mb_options":
        return ["int4_is_symmetric=false"]
    if flag.name in ("--pass-config", "--extra_session_config"):
        return ["{}"]
    return ["x"]


def _base(command: str, tmp: Path, tiny: Path, onnx_dir: Path, adapter: Path) -> list[str]:
    data = tmp / "data.jsonl"
    data.write_text('{"text": "a b c"}\n')
    model = {"generate-adapter": onnx_dir, "tune-session-params": onnx_dir}.get(command, tiny)
    out = ["-o", str(tmp / "out")]
    if command == "finetune":
        return ["-m", str(model), "-d", "json", "--data_files", str(data), *out, "--dry_run"]
    if command == "convert-adapters":
        return ["-a", str(adapter), *out]
    if command == "extract-adapters":
        return ["-m", str(adapter), "-f", "numpy", *out]
    if command == "run-pass":
        return ["-m", str(model), "--pass-name", "ModelBuilder", *out, "--dry_run"]
    return ["-m", str(model), *out, "--dry_run"]


@pytest.fixture(scope="module")
def fake_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-MatMul ONNX folder: enough for the commands that take an ONNX model to plan their passes."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    folder = tmp_path_factory.mktemp("onnx") / "model"
    folder.mkdir()
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [w],
    )
    onnx.save(helper.make_model(graph), str(folder / "model.onnx"))
    return folder


@pytest.fixture(scope="module")
def fake_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A PEFT LoRA folder (r 2 on layer 0's o_proj) of the tiny model, written without training."""
    import numpy as np
    from safetensors.numpy import save_file

    cfg = json.loads((tiny_model / "config.json").read_text())
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 2,
                "lora_alpha": 4,
                "target_modules": ["o_proj"],
                "base_model_name_or_path": str(tiny_model),
                "task_type": "CAUSAL_LM",
            }
        )
    )
    h = cfg["hidden_size"]
    prefix = "base_model.model.model.layers.0.self_attn.o_proj"
    save_file(
        {
            f"{prefix}.lora_A.weight": np.full((2, h), 0.01, np.float32),
            f"{prefix}.lora_B.weight": np.full((h, 2), 0.01, np.float32),
        },
        str(folder / "adapter_model.safetensors"),
    )
    return folder


def _run(argv: list[str], capsys: pytest.CaptureFixture[str], cwd: Path) -> tuple[int, str]:
    from orchestrator.cli.main import run_cli

    old = Path.cwd()
    os.chdir(cwd)
    try:
        rc = run_cli(argv)
    finally:
        os.chdir(old)
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


@pytest.mark.parametrize("command", sorted(c for c in OLIVE_FLAGS if c != "run"))
def test_each_olive_flag_is_honoured_noted_or_refused_in_one_line(
    command: str, tmp_path: Path, tiny_model: Path, fake_onnx: Path, fake_adapter: Path, capsys: Any
) -> None:
    """`orch <command> <base> <flag> <value>` for every flag of the table: exit 0, or exit 2 with one `orch:
    error:` line per problem; never click's unknown-option error, never a traceback or an internal error."""
    from orchestrator.olive.flags import COMMANDS

    base = _base(command, tmp_path, tiny_model, fake_onnx, fake_adapter)
    given = {a for a in base if a.startswith("-")}
    outcomes: dict[str, int] = {}
    for flag in COMMANDS[command].flags:
        if flag.name in given or (flag.short and flag.short in given):
            continue
        argv = [command, *base, flag.name, *_value(flag, tmp_path)]
        rc, text = _run(argv, capsys, tmp_path)
        errors = [ln for ln in text.splitlines() if ln.startswith("orch: error:")]
        assert "No such option" not in text and "unknown argument" not in text, (argv, text[-800:])
        assert "Traceback" not in text and "internal error" not in text, (argv, text[-2000:])
        assert rc == 0 or (rc == 2 and errors), (argv, rc, text[-1500:])  # one line per problem
        outcomes[flag.name] = rc
    assert outcomes  # every flag was tried


def test_run_takes_olives_run_flags(tmp_path: Path, tiny_model: Path, capsys: Any) -> None:
    """olive run's -m / -o / --log_level replace the workflow's parts; --list_required_packages names the
    environments; --package-config is refused in one line; --tempdir is the temp root."""
    wf = {
        "input_model": {"type": "HfModel", "model_path": "missing-model"},
        "passes": {"mb": {"type": "ModelBuilder", "precision": "fp32"}},
        "engine": {"output_dir": "out"},
    }
    (tmp_path / "wf.json").write_text(json.dumps(wf))
    rc, text = _run(
        ["run", "--config", "wf.json", "-m", str(tiny_model), "-o", "elsewhere", "--dry-run"], capsys, tmp_path
    )
    assert rc == 0 and "replaces the workflow's input model" in text, text
    rc, text = _run(["run", "--config", "wf.json", "-m", str(tiny_model), "--list_required_packages"], capsys, tmp_path)
    assert rc == 0 and "environment cpu-export" in text and "onnxruntime-genai" in text, text
    rc, text = _run(["run", "--run-config", "wf.json", "--package-config", "p.json"], capsys, tmp_path)
    assert rc == 2 and "Olive's pass package registry" in text, text
    tmpdir_before, tempdir_before = os.environ.get("TMPDIR"), tempfile.gettempdir()
    rc, text = _run(
        ["run", "--config", "wf.json", "-m", str(tiny_model), "--tempdir", str(tmp_path / "t"), "--dry-run"],
        capsys,
        tmp_path,
    )
    assert rc == 0 and (tmp_path / "t").is_dir(), text
    # the command's temp root ends with it: a later command in this process writes where it did before
    assert os.environ.get("TMPDIR") == tmpdir_before and tempfile.gettempdir() == tempdir_before


@pytest.mark.parametrize("command", OLIVE_COMMANDS_NOT_RUN)
def test_olive_commands_orch_does_not_run_answer_one_line(command: str, tmp_path: Path, capsys: Any) -> None:
    rc, text = _run([command, "--some_flag", "x"], capsys, tmp_path)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"orch: error: {command}: "), text


def test_olive_list_and_optional_value_grammar() -> None:
    from orchestrator.olive.export_flags import AUTO_OPT
    from orchestrator.olive.flag_parsing import LIST_SEP, normalize_argv, split_values
    from orchestrator.olive.single_pass_flags import TUNE_SESSION_PARAMS

    argv = ["--input_cols", "a", "b", "--test", "--enable_search", "--seed", "3", "--execution_mode_list", "0", "1"]
    spec = (*AUTO_OPT.flags, *TUNE_SESSION_PARAMS.flags)
    out = normalize_argv(spec, argv)
    assert out == [
        f"--input_cols=a{LIST_SEP}b",
        "--test=true",
        "--enable_search=sequential",
        "--seed",
        "3",
        f"--execution_mode_list=0{LIST_SEP}1",
    ]
    assert split_values(out[0].split("=", 1)[1]) == ["a", "b"]
    assert normalize_argv(AUTO_OPT, ["--test", "dir", "-o", "x"]) == ["--test=dir", "-o", "x"]


# ---- what the flags build --------------------------------------------------------------------------------------


def _quantize(tmp: Path, model: str, **kw: Any) -> dict[str, Any]:
    from orchestrator.olive.quantize import quantize_workflow

    wf = quantize_workflow(model_name_or_path=model, output_path=str(tmp / "q"), **kw)
    return wf["passes"]["quantize"]


def test_quantize_picks_the_pass_olive_picks(tmp_path: Path, tiny_model: Path, fake_onnx: Path) -> None:
    """olive/cli/quantize.py's (model kind, algorithm, precision, implementation) -> pass, Olive >= 0.10."""
    from orchestrator.olive.plan import FlagError

    hf, onnx = str(tiny_model), str(fake_onnx)
    cases = {
        (hf, "rtn", "int4", None): ("Rtn", {"bits": 4, "sym": True}),
        (hf, "rtn", "uint8", None): ("Rtn", {"bits": 8, "sym": False}),
        (hf, "gptq", "int4", None): ("Gptq", {"bits": 4}),
        (hf, "gptq", "int4", "autogptq"): ("GptqQuantizer", {"bits": 4}),
        (hf, "awq", "int4", "awq"): ("AutoAWQQuantizer", {"bits": 4}),
        (onnx, "rtn", "int4", None): ("OnnxBlockWiseRtnQuantization", {"bits": 4}),
        (onnx, "rtn", "int8", None): ("OnnxBlockWiseRtnQuantization", {"bits": 8}),
        (onnx, "rtn", "int8", "ort"): ("OnnxDynamicQuantization", {"weight_type": "QInt8"}),
        (onnx, "dynamic", "uint8", None): ("OnnxDynamicQuantization", {"weight_type": "QUInt8"}),
        (onnx, "hqq", "int4", None): ("OnnxHqqQuantization", {}),
        (onnx, "rtn", "int8", "inc"): ("IncDynamicQuantization", {}),
    }
    for (model, algo, precision, impl), (kind, fields) in cases.items():
        cfg = _quantize(tmp_path, model, algorithm=algo, precision=precision, implementation=impl)
        assert cfg["type"] == kind and fields.items() <= cfg.items(), (algo, precision, impl, cfg)
    refused = {
        (hf, "hqq", "int4", None): "HQQ quantizes ONNX models",
        (hf, "rtn", "fp8", None): "'fp8'",
        (hf, "rtn", "int4", "nvmo"): "ModelOpt",
        (hf, "rtn", "int4", "quarot"): "QuaRot",
        (onnx, "rtn", "int4", "bnb"): "bitsandbytes",
        (onnx, "static", "int8", None): r"static \(QDQ\)",
        (onnx, "kquant", "int4", None): "k-quant",
        (onnx, "gptq", "int4", None): "quantize the Hugging Face model",
    }
    for (model, algo, precision, impl), needle in refused.items():
        with pytest.raises(FlagError, match=needle):
            _quantize(tmp_path, model, algorithm=algo, precision=precision, implementation=impl)


def _plan(command: str, argv: list[str]) -> Any:
    from orchestrator.olive.commands import BUILDERS, given_from
    from orchestrator.olive.flags import COMMANDS

    spec = COMMANDS[command]
    values: dict[str, Any] = {f.dest: f.default if f.kind != "flag" else False for f in spec.flags}
    it = iter(argv)
    for token in it:
        flag = next(f for f in spec.flags if token in f.spellings)
        values[flag.dest] = True if flag.kind == "flag" else flag.const if flag.kind == "optional" else next(it)
    g = given_from(spec, values)
    return BUILDERS[command](g, None, None) if command in ("auto-opt", "optimize") else BUILDERS[command](g, None)


def test_optimize_builds_olives_schedule(tiny_model: Path, fake_onnx: Path) -> None:
    """olive/cli/optimize.py: int4 on an HF model = Gptq (wikitext-2, as Olive's template) -> ModelBuilder int4
    (block 32, accuracy 4, MatMul and Gather); an exporter = OnnxConversion -> OrtTransformersOptimization; an
    ONNX model = blockwise RTN; NPU-only options refused."""
    from orchestrator.olive.plan import FlagError

    wf = _plan("optimize", ["-m", str(tiny_model), "--precision", "int4", "--num_split", "2"]).workflow
    assert [p["type"] for p in wf["passes"].values()] == ["Gptq", "ModelBuilder", "SplitModel"]
    assert wf["passes"]["gptq"]["data_config"] == "wikitext2_train"
    assert wf["data_configs"][0]["load_dataset_config"]["data_name"] == "Salesforce/wikitext"
    mb = wf["passes"]["model_builder"]
    assert (mb["int4_block_size"], mb["int4_accuracy_level"], mb["int4_op_types_to_quantize"]) == (
        32,
        4,
        ["MatMul", "Gather"],
    )
    wf = _plan("optimize", ["-m", str(tiny_model), "--exporter", "dynamo_exporter", "--precision", "fp16"]).workflow
    assert [p["type"] for p in wf["passes"].values()] == [
        "OnnxConversion",
        "OrtTransformersOptimization",
        "ModelBuilder",
    ]
    assert wf["passes"]["onnx_conversion"]["use_dynamo_exporter"] and wf["passes"]["genai_config"]["metadata_only"]
    wf = _plan("optimize", ["-m", str(fake_onnx), "--precision", "int4", "--block_size", "64"]).workflow
    assert list(wf["passes"].values()) == [{"type": "OnnxBlockWiseRtnQuantization", "block_size": 64}]
    for argv, needle in (
        (["--enable_aot"], "QNN"),
        (["--provider", "QNNExecutionProvider"], "NPU"),
        (["--precision", "int8"], "static"),
        (["--use_qdq_format"], "QDQ"),
    ):
        with pytest.raises(FlagError, match=needle):
            _plan("optimize", ["-m", str(tiny_model), *argv])
    for command in ("auto-opt", "quantize"):  # Olive's MatMulNBitsToQDQ (NPUs): refused by name, with the fix
        with pytest.raises(FlagError, match=r"^--use_qdq_encoding: .*drop it for MatMulNBits$"):
            _plan(command, ["-m", str(tiny_model), "--use_qdq_encoding"])


def test_auto_opt_and_capture_follow_olive(tiny_model: Path, fake_adapter: Path) -> None:
    """auto-opt: fp32 by default (Olive's), the builder path, the adapter kept separate; --use_dynamo_exporter is
    Olive's exporter chain. capture-onnx-graph: the adapter exported unmerged; --use_model_builder with Olive's
    builder switches; fp16 builds for CUDA as Olive does."""
    plan = _plan("auto-opt", ["-m", str(tiny_model), "-a", str(fake_adapter)])
    assert plan.workflow["passes"] == {
        "builder": {"type": "ModelBuilder", "precision": "fp32"},
        "extract_adapters": {"type": "ExtractAdapters"},
    }
    plan = _plan("auto-opt", ["-m", str(tiny_model), "--use_dynamo_exporter", "--precision", "int4"])
    assert [p["type"] for p in plan.workflow["passes"].values()] == [
        "OnnxConversion",
        "OrtTransformersOptimization",
        "OnnxBlockWiseRtnQuantization",
        "ModelBuilder",
    ]
    plan = _plan("auto-opt", ["-m", str(tiny_model), "--data_name", "x", "--enable_search"])
    assert any("no search" in n for n in plan.notes) and any("--data_name" in n for n in plan.notes)
    plan = _plan("capture-onnx-graph", ["-m", str(tiny_model), "-a", str(fake_adapter), "--use_ort_genai"])
    conv = plan.workflow["passes"]["conversion"]
    assert not conv.get("merge_adapter_weights")  # Olive exports the adapter unmerged
    assert plan.workflow["passes"]["genai_config"]["metadata_only"]
    plan = _plan(
        "capture-onnx-graph",
        [
            "-m",
            str(tiny_model),
            "--use_model_builder",
            "--exclude_embeds",
            "true",
            "--int4_block_size",
            "64",
            "--extra_mb_options",
            "int4_is_symmetric=false",
        ],
    )
    builder = plan.workflow["passes"]["builder"]
    assert builder["extra_options"] == {"int4_is_symmetric": False, "exclude_embeds": True}
    assert builder["int4_block_size"] == 64 and plan.workflow["engine"]["execution_providers"] == [
        "CUDAExecutionProvider"
    ]


def test_test_flag_builds_a_two_layer_copy(tmp_path: Path, tiny_model: Path) -> None:
    from orchestrator.olive.model_ref import make_test_model

    dest = make_test_model(str(tiny_model), tmp_path / "test_model")
    cfg = json.loads((dest / "config.json").read_text())
    assert (
        cfg["num_hidden_layers"] == 2
        and cfg["model_type"] == json.loads((tiny_model / "config.json").read_text())["model_type"]
    )
    assert (dest / "tokenizer.json").is_file()


def _orch(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
    )


def test_quantize_of_an_hf_model_is_olives_rtn_then_auto_opt_exports_it(tmp_path: Path, tiny_model: Path) -> None:
    """Olive >= 0.10: `quantize --algorithm rtn` on a Hugging Face model writes the Olive quantized checkpoint
    (Rtn); auto-opt exports it to int4 MatMulNBits; --save_config_file writes the workflow `orch run` runs."""
    from orchestrator.passes.common.onnx_tools import matmulnbits_count

    q = _orch(
        "quantize",
        "-m",
        str(tiny_model),
        "--algorithm",
        "rtn",
        "--precision",
        "int4",
        "-o",
        "q",
        "--save_config_file",
        "--no-tracking",
        cwd=tmp_path,
    )
    assert q.returncode == 0, q.stderr[-2000:]
    quant = json.loads((tmp_path / "q/model/config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "olive" and quant["bits"] == 4
    saved = json.loads((tmp_path / "q/config.json").read_text())
    assert saved["passes"]["quantize"]["type"] == "Rtn" and Path(saved["input_model"]["model_path"]).is_absolute()
    ao = _orch("auto-opt", "-m", "q", "--precision", "int4", "-o", "ao", "--no-tracking", cwd=tmp_path)
    assert ao.returncode == 0, ao.stderr[-2000:]
    assert matmulnbits_count(tmp_path / "ao/model/model.onnx") > 0


def test_capture_with_adapter_then_generate_adapter_from_the_onnx_folder(
    tmp_path: Path, tiny_model: Path, fake_adapter: Path
) -> None:
    """Olive's multi-LoRA notebook: capture-onnx-graph -m <fine-tuned> --use_ort_genai, then generate-adapter -m
    <the ONNX folder> (no --adapter_path): the LoRA weights become inputs + adapter_weights.onnx_adapter, and
    onnxruntime-genai with the adapter active matches transformers + peft."""
    import numpy as np

    from orchestrator.passes.common import onnx_tools

    cap = _orch(
        "capture-onnx-graph",
        "-m",
        str(tiny_model),
        "-a",
        str(fake_adapter),
        "--use_ort_genai",
        "-o",
        "cap",
        "--no-tracking",
        cwd=tmp_path,
    )
    assert cap.returncode == 0, cap.stderr[-2000:]
    gen = _orch("generate-adapter", "-m", "cap", "-o", "gen", "--no-tracking", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr[-2000:]
    model_dir = tmp_path / "gen/model"
    assert (model_dir / "adapter_weights.onnx_adapter").is_file()
    ids = onnx_tools.hf_encode(tiny_model, "the quick brown fox")
    with_adapter = onnx_tools.GenaiModel(model_dir).logits(ids)
    base = onnx_tools.GenaiModel(model_dir, use_adapter=False).logits(ids)

    import torch
    from peft import PeftModel

    hf = onnx_tools.load_hf_model(tiny_model)
    peft = PeftModel.from_pretrained(hf, str(fake_adapter)).eval()
    with torch.no_grad():
        ref = peft(torch.tensor([ids])).logits[0].float().numpy()
    assert np.abs(with_adapter - ref).max() < 1e-3
    assert np.abs(base - ref).max() > 1e-3  # the adapter changes the logits: it is really bound
