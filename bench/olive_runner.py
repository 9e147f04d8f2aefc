"""Microsoft Olive 0.13's `olive finetune` with the benchmark's settings, timed step by step.

Runs Olive's own CLI entry point in this process (olive.cli.launcher.main with the argv a user types), after
bench/baseline_peft.install_step_timer() has hooked every transformers Trainer: Olive's LoRA pass trains with a
plain transformers.Trainer, so the same per-step timer and token counter measure it.

Olive's data path: `olive finetune` pre-processes text with its default "join" strategy (every text joined with
"\\n\\n" and cut into max_seq_len blocks, attention over the whole block), so its rows are full and unpadded.

    python bench/olive_runner.py --model DIR --data train.jsonl --steps 30 --warmup 5 --json out.json

Olive must be importable (`pip install "olive-ai[lora]==0.13.0"`; on the GPU machine it travels as wheels, see
bench/README.md). Set OLIVE_DISABLE_TELEMETRY=1 (done here).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from baseline_peft import SETTINGS, install_step_timer, runner_main, summarize  # noqa: E402


def olive_argv(model: Path, data: Path, steps: int, out_dir: Path, cuda: bool = True) -> list[str]:
    """`olive finetune ...` with the same LoRA and training settings as the other rows (bf16 on CUDA)."""
    s = SETTINGS
    argv = [
        "finetune",
        "-m",
        str(model),
        "--data_name",
        "json",
        "--data_files",
        str(data),
        "--text_field",
        "text",
        "--max_seq_len",
        str(s["max_len"]),
        "--max_samples",
        str(steps * s["batch_size"]),
        "--method",
        "lora",
        "--lora_r",
        str(s["lora_r"]),
        "--lora_alpha",
        str(s["lora_alpha"]),
        "--target_modules",
        ",".join(s["target_modules"]),
        "--torch_dtype",
        "bfloat16" if cuda else "float32",
        "-o",
        str(out_dir),
        # HF TrainingArguments, passed through by `olive finetune`
        "--per_device_train_batch_size",
        str(s["batch_size"]),
        "--gradient_accumulation_steps",
        "1",
        "--max_steps",
        str(steps),
        "--learning_rate",
        str(s["learning_rate"]),
        "--lr_scheduler_type",
        s["lr_scheduler_type"],
        "--warmup_steps",
        "0",
        "--weight_decay",
        str(s["weight_decay"]),
        "--optim",
        s["optim"],
        # gradient checkpointing: Olive's default (True) is kept; without it Olive ran out of memory on an 80 GB H100
        "--seed",
        str(s["seed"]),
        "--data_seed",
        str(s["seed"]),
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "True",
    ]
    return [*argv, "--bf16", "True"] if cuda else argv


NOT_INSTALLED = 'olive: not installed: pip install "olive-ai[lora]==0.13.0" (bench/README.md lists its GPU wheels)'


def run(model: Path, data: Path, steps: int, warmup: int, out_json: Path) -> dict:
    import importlib.util

    if importlib.util.find_spec("olive") is None:
        raise SystemExit(NOT_INSTALLED)
    os.environ["OLIVE_DISABLE_TELEMETRY"] = "1"
    install_step_timer()
    from olive.cli.launcher import main as olive_main

    out_dir = out_json.parent / "olive_out"
    t0 = time.perf_counter()
    import torch

    argv = olive_argv(model, data, steps, out_dir, cuda=torch.cuda.is_available())
    olive_main(argv, called_as_console_script=False)
    wall = time.perf_counter() - t0
    adapters = list(out_dir.rglob("adapter_model.safetensors"))
    if not adapters:  # Olive can exit 0 having produced nothing (../shared/FACTS.md)
        raise SystemExit(f"olive finetune wrote no adapter under {out_dir}")
    import olive

    result = summarize(
        f"Olive {olive.__version__} `olive finetune`",
        warmup,
        {"attn": "sdpa", "batches": "Olive 'join': texts joined, cut into full blocks", "olive_wall_s": wall},
    )
    harness.write_json(out_json, result)
    return result


def main(argv: list[str] | None = None) -> int:
    return runner_main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
