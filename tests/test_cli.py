"""The seed tutorials' commands, flag for flag, on a local model: finetune -> auto-opt -> generate; and the
one-line errors for flags orch cannot honour here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def orch(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
    )


def test_seed_finetune_then_auto_opt_then_generate(tmp_path: Path, tiny_model: Path, tone_rows) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tone_rows))
    ft = orch(
        "finetune",
        "--method", "lora",
        "--model_name_or_path", str(tiny_model),
        "--data_name", "data/",
        "--train_split", "train[:80%]",
        "--eval_split", "train[80%:]",
        "--text_template", "<|user|>\\n{phrase}<|end|>\\n<|assistant|>\\n{tone}<|end|>",
        "--per_device_train_batch_size", "16",
        "--per_device_eval_batch_size", "16",
        "--max_steps", "12",
        "--logging_steps", "4",
        "--report_to", "azure_ml",
        "--target_modules", "qkv_proj,o_proj",
        "--log_level", "1",
        "--output_path", "models/ft",
        cwd=tmp_path,
    )  # fmt: skip
    assert ft.returncode == 0, ft.stderr[-3000:]
    assert (tmp_path / "models/ft/adapter/adapter_model.safetensors").exists()
    assert (tmp_path / "models/ft/model/config.json").exists()
    manifest = json.loads((tmp_path / "models/ft/manifest.json").read_text())
    assert manifest["passes"][0]["metrics"]["eval_loss"] > 0

    opt = orch(
        "auto-opt",
        "--model_name_or_path", "models/ft/model",
        "--adapter_path", "models/ft/adapter",
        "--device", "cpu",
        "--provider", "CPUExecutionProvider",
        "--use_model_builder",
        "--precision", "int4",
        "--use_ort_genai",
        "--output_path", "models/onnx",
        "--log_level", "1",
        cwd=tmp_path,
    )  # fmt: skip
    assert opt.returncode == 0, opt.stderr[-3000:]
    assert (tmp_path / "models/onnx/model/genai_config.json").exists()
    passes = [p["pass_type"] for p in json.loads((tmp_path / "models/onnx/manifest.json").read_text())["passes"]]
    assert passes == ["ModelBuilder", "ExtractAdapters"]  # as Olive: the adapter is not merged
    assert (tmp_path / "models/onnx/model/adapter_weights.onnx_adapter").is_file()

    gen = orch(
        "generate", "--model", "models/onnx", "--prompt", "I won the lottery", "--max-new-tokens", "6", cwd=tmp_path
    )
    assert gen.returncode == 0, gen.stderr
    assert "tokens in" in gen.stderr


def test_flags_orch_cannot_honour_here_fail_in_one_line(tmp_path: Path, tiny_model: Path) -> None:
    awq = orch("quantize", "-m", str(tiny_model), "--algorithm", "awq", "--precision", "int4", "-o", "q", cwd=tmp_path)
    assert awq.returncode == 2  # AWQ's default calibration set is a hub data set; the suite runs offline
    assert "dataset mit-han-lab/pile-val-backup is not in the Hugging Face cache" in awq.stderr
    assert "Traceback" not in awq.stderr
    assert not (tmp_path / "q").exists()  # nothing half-written

    qlora = orch(
        "finetune", "--method", "qlora", "-m", str(tiny_model), "-d", "json", "--data_files", "x.jsonl",
        "--text_field", "phrase", "-o", "ft", cwd=tmp_path,
    )  # fmt: skip
    assert qlora.returncode != 0
    assert "Traceback" not in qlora.stderr

    npu = orch("auto-opt", "-m", str(tiny_model), "--device", "npu", "-o", "o", cwd=tmp_path)
    assert npu.returncode == 2 and "--device 'npu'" in npu.stderr

    unknown_arg = orch(
        "finetune", "-m", str(tiny_model), "-d", "json", "--data_files", "x.jsonl", "--text_field", "phrase",
        "--max_stepz", "3", "-o", "ft", cwd=tmp_path,
    )  # fmt: skip
    assert unknown_arg.returncode == 2 and "max_steps" in unknown_arg.stderr and "Traceback" not in unknown_arg.stderr


def test_rtn_quantize_on_cpu_produces_int4(tmp_path: Path, tiny_model: Path) -> None:
    """Olive >= 0.10's quantize on a Hugging Face model: Rtn writes the Olive int4 checkpoint (auto-opt exports it:
    tests/test_olive_cli.py)."""
    proc = orch("quantize", "-m", str(tiny_model), "--algorithm", "rtn", "--precision", "int4", "-o", "q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    quant = json.loads((tmp_path / "q" / "model" / "config.json").read_text())["quantization_config"]
    assert (quant["quant_method"], quant["bits"]) == ("olive", 4)
