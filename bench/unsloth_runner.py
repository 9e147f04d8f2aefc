"""Unsloth (2026.10.9) with the benchmark's settings: the same model folder, data, order, LoRA and training settings
as every other row of bench/gpu_finetune.py, timed by the same step timer (bench/baseline_peft.install_step_timer).

Unsloth's own recipe as its documentation writes it: `FastLanguageModel.from_pretrained` (it patches the model:
"Fast Phi3 patching", its LoRA MLP / QKV / O kernels, compiled decoder blocks), `FastLanguageModel.get_peft_model`,
then TRL's SFTTrainer (which Unsloth patches on import; it turns padding-free batches on by itself). LoRA rows run
without activation checkpointing (its fastest setting, like orch's LoRA rows, which fit without it); the QLoRA row
loads the base in 4 bits (nf4 + double quant, bf16 compute) with Unsloth's own checkpointing ("unsloth"), like orch's
QLoRA row, which checkpoints too. The samples are tokenized here exactly as for the baseline ([BOS] text EOS, cut at
max_len) and handed over pre-tokenized, so Unsloth sees the same token sequences in the same order.

Unsloth needs a CUDA GPU (it refuses to import without one) and its own wheel set: it pins transformers <= 5.17,
trl <= 1.15 and datasets < 5 (bench/README.md lists the set). Without CUDA or without unsloth the runner prints one
line saying so and exits 2.

    python bench/unsloth_runner.py --model DIR --data train.jsonl --steps 20 --warmup 5 --json out.json [--qlora]
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from baseline_peft import SETTINGS, install_step_timer, read_texts, summarize  # noqa: E402

VERSION = "2026.10.9"
# set before unsloth is imported: no statistics call home, no hub look-ups (the GPU machine has no network)
ENV = {
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


class Refusal(RuntimeError):
    """This machine cannot run the Unsloth row; the message is the one line the runner prints."""


def refusal(cuda: bool, installed: bool) -> str | None:
    """The one-line reason this machine cannot run Unsloth, or None when it can."""
    if not cuda:
        return "unsloth: needs a CUDA GPU (Unsloth refuses to import without one); this machine has none"
    if not installed:
        return (
            f"unsloth: not installed: pip install unsloth=={VERSION} unsloth-zoo=={VERSION} trl==1.15.0 "
            "'datasets<5' (its own environment: it pins transformers <= 5.17; bench/README.md)"
        )
    return None


def load_kwargs(model_dir: Path, qlora: bool, settings: dict[str, Any] = SETTINGS) -> dict[str, Any]:
    """FastLanguageModel.from_pretrained arguments (dtype is added by the caller: it needs torch)."""
    return {
        "model_name": str(model_dir),
        "max_seq_length": int(settings["max_len"]),
        "load_in_4bit": qlora,  # nf4 + double quant, bf16 compute: Unsloth's 4-bit config
        "full_finetuning": False,
        "fix_tokenizer": False,  # the benchmark's tokenizer is used as it is (no added tokens, no resize)
        "use_gradient_checkpointing": "unsloth" if qlora else False,
    }


def peft_kwargs(qlora: bool, settings: dict[str, Any] = SETTINGS) -> dict[str, Any]:
    """FastLanguageModel.get_peft_model arguments: the benchmark's LoRA on the same modules."""
    return {
        "r": int(settings["lora_r"]),
        "lora_alpha": settings["lora_alpha"],
        "lora_dropout": float(settings["lora_dropout"]),
        "target_modules": list(settings["target_modules"]),
        "bias": "none",
        "use_gradient_checkpointing": "unsloth" if qlora else False,
        "random_state": int(settings["seed"]),
    }


def sft_kwargs(out_dir: Path, steps: int, settings: dict[str, Any] = SETTINGS) -> dict[str, Any]:
    """SFTConfig arguments: the benchmark's training settings; the data arrives tokenized."""
    s = settings
    return {
        "output_dir": str(out_dir),
        "per_device_train_batch_size": int(s["batch_size"]),
        "gradient_accumulation_steps": 1,
        "max_steps": int(steps),
        "learning_rate": float(s["learning_rate"]),
        "lr_scheduler_type": s["lr_scheduler_type"],
        "warmup_steps": int(s["warmup_steps"]),
        "weight_decay": float(s["weight_decay"]),
        "optim": s["optim"],
        "seed": int(s["seed"]),
        "data_seed": int(s["seed"]),
        "bf16": True,
        "logging_steps": int(s["logging_steps"]),
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "max_length": int(s["max_len"]),
        "packing": False,
        "dataset_kwargs": {"skip_prepare_dataset": True},
    }


def token_ids(tokenizer: Any, texts: list[str], max_len: int) -> list[list[int]]:
    """[BOS] text EOS cut at max_len: the baseline's and orch's sequences."""
    enc = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return [[*x, tokenizer.eos_token_id][:max_len] for x in enc]


def run(model_dir: Path, data: Path, steps: int, warmup: int, out_json: Path, qlora: bool = False) -> dict[str, Any]:
    import torch

    why = refusal(torch.cuda.is_available(), importlib.util.find_spec("unsloth") is not None)
    if why:
        raise Refusal(why)
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    import unsloth  # noqa: F401  (first: it patches transformers / trl / peft on import)
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    install_step_timer()  # after unsloth's patches: its trainer still ends in transformers.Trainer.__init__
    s = SETTINGS
    model, tokenizer = FastLanguageModel.from_pretrained(dtype=torch.bfloat16, **load_kwargs(model_dir, qlora))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = FastLanguageModel.get_peft_model(model, **peft_kwargs(qlora))
    ds = Dataset.from_dict({"input_ids": token_ids(tokenizer, read_texts(data), int(s["max_len"]))})
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=ds,
        args=SFTConfig(**sft_kwargs(out_json.parent / "unsloth_out", steps)),
    )
    trainer.train()
    import importlib.metadata as md

    name = "Unsloth QLoRA" if qlora else "Unsloth LoRA"
    extra = {
        "unsloth": md.version("unsloth"),
        "qlora": qlora,
        "lora_dropout": float(s["lora_dropout"]),
        "gradient_checkpointing": "unsloth" if qlora else False,
    }
    result = summarize(name, warmup, extra)
    harness.write_json(out_json, result)
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="jsonl with a 'text' field")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--qlora", action="store_true", help="4-bit base (nf4 + double quant) with Unsloth checkpointing")
    a = p.parse_args(argv)
    try:
        r = run(a.model, a.data, a.steps, a.warmup, a.json, qlora=a.qlora)
    except Refusal as exc:
        print(exc, file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in r.items() if k not in ("step_times", "step_tokens")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
