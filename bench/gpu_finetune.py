"""LoRA fine-tuning throughput on one GPU: transformers+peft, Unsloth, Olive, orch's LoRA and QLoRA, side by side.

One command builds the model and data once and runs every row in its own process (clean peak-memory numbers),
in the same GPU session, and writes one JSON file per row plus run.json into --out:

    python bench/gpu_finetune.py --out OUT                 # the default rows (Phi-3-mini shape)
    python bench/gpu_finetune.py --out OUT --rows orch:fixed:-flce,orch:fixed:dropout=0  # ablations
    python bench/gpu_finetune.py --render bench/results/gpu_finetune   # rewrite the gpu section of bench/RESULTS.md

Model: Phi3ForCausalLM from a config with Phi-3-mini's shapes (hidden 3072, 32 layers, 32 heads, intermediate
8192, vocab 32064: 3.82 B parameters), random weights, built on the GPU and saved once in bf16; every row loads
that folder. Data: a generated corpus (a 6,000-word pseudo-language with a Markov structure, so the loss has
something to learn), a BPE tokenizer trained on it, written as jsonl; two sets, the SAME for every row:
  var    samples of ~100-1000 tokens (uniform), as instruction data comes; batches of 8 padded to the longest
  fixed  every sample cut at exactly 1024 tokens: no padding anywhere, so only kernels can make a difference
Rows are system:data[:options], options joined by '/': +name / -name go to ORCH_CUDA_FASTPATH (orch rows),
key=value overrides a setting of bench/baseline_peft.SETTINGS for that row (dropout=0 is lora_dropout=0).
  baseline       bench/baseline_peft.py: plain transformers Trainer + peft
  qlora_baseline bench/baseline_peft.py --qlora: transformers + peft + bitsandbytes (nf4, double quant,
                 prepare_model_for_kbit_training with gradient checkpointing)
  olive          bench/olive_runner.py: Olive 0.13 `olive finetune` (its CLI, same settings)
  orch           orchestrator.passes.training.lora.train.LoRAPass.run (orch's real pass, its own data config; it picks
                 its CUDA fast path itself)
  qlora          orchestrator.passes.training.lora.train.QLoRAPass.run (bitsandbytes nf4 + double quant)
  unsloth        bench/unsloth_runner.py: Unsloth's FastLanguageModel + TRL SFTTrainer (its own wheel set)
  unsloth_qlora  the same with a 4-bit base and Unsloth's checkpointing
Shapes: phi3-mini (default), phi4-mini (GQA 24/8 heads, vocab 200,064, tied embeddings, partial RoPE 0.75).
`--profile ROW` profiles the last two steps of that row (bench/baseline_peft.py BENCH_PROFILE; those steps are
left out of its median) and writes profile_<n>/profile.txt beside the row's log; two earlier steps run under cProfile
(profile_<n>/host_profile.txt: the host's Python by function), also left out of the median.
Numbers: tokens/s = real (non-padding) tokens per second, median of the per-step rates after the warm-up steps;
peak memory = torch.cuda.max_memory_allocated of the row's process; MFU = tokens/s x (4 N + causal attention
FLOPs per token of the data's samples) / 989 TFLOP/s (H100 / H200 SXM dense bf16), N = all parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import harness  # noqa: E402
from baseline_peft import SETTINGS, install_step_timer, summarize  # noqa: E402

from orchestrator.passes.training.lora.cuda import parse_options  # noqa: E402

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
SHAPES: dict[str, dict[str, Any]] = {
    "phi3-mini": {
        "hidden_size": 3072,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 8192,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "lexicon": 6000,
    },
    # Phi-4-mini's shape: grouped-query attention (24 query heads of 128, 8 KV heads), a 200,064-token vocabulary
    # with tied embeddings, RoPE on 3/4 of each head (3.84 B parameters)
    "phi4-mini": {
        "hidden_size": 3072,
        "num_hidden_layers": 32,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 200064,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
        "partial_rotary_factor": 0.75,
        "lexicon": 6000,
    },
    # a 2-layer model of full width: a quick check of every code path on the GPU
    "phi3-2l": {
        "hidden_size": 3072,
        "num_hidden_layers": 2,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 8192,
        "vocab_size": 32064,
        "max_position_embeddings": 4096,
        "lexicon": 6000,
    },
    # CPU smoke test of the harness (with BENCH_SETTINGS='{"max_len": 128, "batch_size": 2}')
    "tiny": {
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 352,
        "vocab_size": 1000,
        "max_position_embeddings": 1024,
        "lexicon": 400,
    },
}
# the issue-21 table: everything on fixed-length data (no padding anywhere, so only kernels make a difference)
DEFAULT_ROWS = ",".join(
    [
        "baseline:fixed",
        "orch:fixed",
        "orch:fixed:dropout=0",
        "unsloth:fixed",
        "unsloth:fixed:dropout=0",
        "qlora:fixed",
        "unsloth_qlora:fixed",
    ]
)
SECTION = "gpu"  # its markers in bench/RESULTS.md


# --------------------------------------------------------------------------------------------------------------
# data and model


def make_corpus(n: int, lexicon: int, lo: int, hi: int, seed: int) -> list[str]:
    """n texts of lo..hi words from a pseudo-language: Zipf word frequencies and a few likely successors per word."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < lexicon:
        w = "".join(rng.choice(letters) for _ in range(rng.randint(2, 9)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    weights = [1.0 / (i + 1) for i in range(lexicon)]
    succ = [rng.sample(range(lexicon), 4) for _ in range(lexicon)]
    texts = []
    for _ in range(n):
        length = rng.randint(lo, hi)
        cur = rng.randrange(lexicon)
        out = []
        for i in range(length):
            out.append(words[cur])
            if i % 17 == 16:
                out[-1] += "."
            cur = rng.choice(succ[cur]) if rng.random() < 0.75 else rng.choices(range(lexicon), weights)[0]
        texts.append(" ".join(out))
    return texts


def prepare(work: Path, shape_name: str, steps: int) -> dict[str, Any]:
    """Write work/model (bf16, random weights), work/data_var.jsonl and work/data_fixed.jsonl; reuse them if there."""
    import torch

    shape = SHAPES[shape_name]
    meta_path = work / "prepared.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("shape") == shape_name and meta.get("steps", 0) >= steps:
            return meta
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    max_len = SETTINGS["max_len"]
    words_hi = max(max_len - 24, 16)
    var = make_corpus(max(steps * 16, 400), shape["lexicon"], max(words_hi // 10, 8), words_hi, seed=1)
    fixed = make_corpus(max(steps * SETTINGS["batch_size"] + 16, 64), shape["lexicon"], max_len + 100, max_len + 120, 2)
    from orchestrator.passes.models.tiny_model import train_phi3_tokenizer

    tok = train_phi3_tokenizer(var + fixed, shape["vocab_size"], max_len)
    for name, texts in (("var", var), ("fixed", fixed)):
        with open(work / f"data_{name}.jsonl", "w", encoding="utf-8") as f:
            for t in texts:
                f.write(json.dumps({"text": t}) + "\n")

    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(
        vocab_size=shape["vocab_size"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        max_position_embeddings=shape["max_position_embeddings"],
        original_max_position_embeddings=shape["max_position_embeddings"],
        rope_scaling=None,
        sliding_window=None,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=bool(shape.get("tie_word_embeddings", False)),
        **({"partial_rotary_factor": shape["partial_rotary_factor"]} if "partial_rotary_factor" in shape else {}),
    )
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda" if cuda else "cpu"):
            model = Phi3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.config.dtype = dtype
    model.save_pretrained(work / "model", safe_serialization=True)
    tok.save_pretrained(work / "model")
    n_params = sum(p.numel() for p in model.parameters())
    del model
    if cuda:
        torch.cuda.empty_cache()

    def lengths(texts: list[str]) -> list[int]:
        ids = tok(texts, add_special_tokens=True)["input_ids"]
        return [min(len(x) + 1, max_len) for x in ids]

    meta = {
        "shape": shape_name,
        "steps": steps,
        "n_params": n_params,
        "config": {k: v for k, v in shape.items() if k != "lexicon"},
        "tokenizer_vocab": len(tok),
        "lengths": {"var": lengths(var), "fixed": lengths(fixed)},
        "prepare_s": time.perf_counter() - t0,
    }
    harness.write_json(meta_path, meta, indent=None)
    return meta


# --------------------------------------------------------------------------------------------------------------
# row specs: system:data[:options]


SYSTEMS = ("baseline", "qlora_baseline", "olive", "orch", "qlora", "unsloth", "unsloth_qlora")
SETTING_ALIASES = {"dropout": "lora_dropout", "r": "lora_r", "alpha": "lora_alpha"}


def parse_row(spec: str) -> dict[str, Any]:
    """'orch:fixed:dropout=0/-flce' -> system, data, ORCH_CUDA_FASTPATH options, settings overrides, a file slug."""
    system, _, rest = spec.strip().partition(":")
    data, _, opts = rest.partition(":")
    if system not in SYSTEMS:
        raise ValueError(f"row {spec!r}: unknown system {system!r}; known: {', '.join(SYSTEMS)}")
    if data not in ("var", "fixed"):
        head, sep, _ = data.partition("/")
        hint = f" (options go after a second colon: {system}:{head}:{data[len(head) + 1 :]})" if sep else ""
        raise ValueError(f"row {spec!r}: data must be var or fixed, got {data!r}{hint}")
    fastpath: list[str] = []
    settings: dict[str, Any] = {}
    for item in filter(None, opts.split("/")):
        if "=" in item:
            key, _, value = item.partition("=")
            key = SETTING_ALIASES.get(key, key)
            if key not in SETTINGS:
                raise ValueError(f"row {spec!r}: unknown setting {key!r}; known: {', '.join(sorted(SETTINGS))}")
            settings[key] = json.loads(value)
        elif item[0] in "+-":
            fastpath.append(item)
        else:
            raise ValueError(f"row {spec!r}: option {item!r} is neither +name / -name nor key=value")
    try:  # a misspelt option fails here, before the model is built, not in the row's process on the GPU
        parse_options(",".join(fastpath))
    except ValueError as exc:
        raise ValueError(f"row {spec!r}: {exc}") from None
    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in spec.replace(":", "_").replace("/", "_"))
    return {"system": system, "data": data, "fastpath": ",".join(fastpath), "settings": settings, "slug": slug}


# --------------------------------------------------------------------------------------------------------------
# orch rows: the real LoRA / QLoRA pass, through its own run() as `orch finetune` calls it


def orch_job(model_dir: Path, data: Path, steps: int, out_dir: Path, qlora: bool) -> tuple[Any, Any, Any]:
    """(pass config, Job, pass class): the benchmark's settings as a user's workflow states them.

    The data goes through the pass's own data config (a json file with a "text" column, line-by-line, each sample
    cut at max_len, no padding to max_len), so the pass builds its text spec, tokenization and batches itself;
    nothing about bf16 / packing / kernels / checkpointing is said: the pass chooses those.
    """
    from orchestrator.core.job import Job, ModelArtifact
    from orchestrator.passes.training.lora.train import LoRAConfig, LoRAPass, QLoRAPass

    s = SETTINGS
    training_args = {
        "per_device_train_batch_size": s["batch_size"],
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "learning_rate": s["learning_rate"],
        "lr_scheduler_type": s["lr_scheduler_type"],
        "warmup_ratio": 0.0,
        "warmup_steps": s["warmup_steps"],
        "weight_decay": s["weight_decay"],
        "optim": s["optim"],
        "seed": s["seed"],
        "data_seed": s["seed"],
        "logging_steps": s["logging_steps"],
    }
    cfg: dict[str, Any] = {
        "lora_r": s["lora_r"],
        "lora_alpha": s["lora_alpha"],
        "lora_dropout": s["lora_dropout"],
        "target_modules": s["target_modules"],
        "train_data_config": "train",
        "training_args": training_args,
    }
    if qlora:
        cfg.update(double_quant=True, quant_type="nf4")
    config = LoRAConfig.model_validate(cfg)
    pass_cls = QLoRAPass if qlora else LoRAPass
    data_config = {
        "name": "train",
        "type": "HuggingfaceContainer",
        "load_dataset_config": {"data_name": "json", "data_files": str(data), "split": "train"},
        "pre_process_data_config": {
            "text_cols": ["text"],
            "corpus_strategy": "line-by-line",
            "source_max_len": s["max_len"],
            "pad_to_max_len": False,
        },
    }
    job = Job(
        job_id="bench",
        pass_name="qlora" if qlora else "lora",
        pass_type=pass_cls.type_name,
        pass_config=config.model_dump(mode="json"),
        model=ModelArtifact(format="hf", path=str(model_dir)),
        data_configs={"train": data_config},
        output_dir=str(out_dir),
        accelerator="gpu",
    )
    return config, job, pass_cls


def tuned_launch(kernels_json: Path) -> dict[str, dict[str, int]]:
    """{kernel: Launch fields} picked by a gpu_kernels.py `tune` step (its kernels.json); a file without one fails
    here, before any row starts."""
    tune = harness.read_json(kernels_json).get("tune") or {}
    picks = {k: v.get("fields") for k, v in (tune.get("picks") or {}).items()}
    if not picks:
        raise SystemExit(f"--launch: {kernels_json} has no tune picks (run bench/gpu_kernels.py --steps tune)")
    failed = sorted(k for k, v in picks.items() if not v)
    if failed:  # run 8: a kernel mode that did not compile left every shape infinite, and rows ran at a non-pick
        raise SystemExit(f"--launch: {kernels_json}: the tune picked nothing for {', '.join(failed)} (see its errors)")
    return picks


def apply_launch() -> dict[str, Any]:
    """The row process's Philox launch shapes: BENCH_LAUNCH's (the same call's tune picks) over the defaults."""
    from orchestrator.passes.training.lora import philox_dropout as pd

    for kernel, fields in json.loads(os.environ.get("BENCH_LAUNCH") or "{}").items():
        pd.LAUNCH[kernel] = pd.Launch(**fields)
    return {k: dataclasses.asdict(v) for k, v in pd.LAUNCH.items()}


def run_orch_row(model_dir: Path, data: Path, steps: int, warmup: int, out_json: Path, qlora: bool) -> dict:
    from orchestrator.passes.base import PassContext
    from orchestrator.passes.training.lora import cuda as lora_cuda
    from orchestrator.passes.training.lora import kernels as lora_kernels

    launch = apply_launch()
    install_step_timer()
    out_dir = out_json.parent / ("qlora_out" if qlora else "lora_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    config, job, pass_cls = orch_job(model_dir, data, steps, out_dir, qlora)
    events: list[dict] = []
    ctx = PassContext(job=job, out_dir=out_dir, emit=events.append)
    t0 = time.perf_counter()
    output = pass_cls().run(config, job.model, ctx)
    wall = time.perf_counter() - t0
    plan = lora_cuda.LAST_PLAN
    splits = {" ".join(map(str, k[:4])): v for k, v in lora_kernels._SPLIT_CACHE.items()}
    result = summarize(
        f"orch {pass_cls.type_name}",
        warmup,
        {
            "plan": list(plan.reasons) if plan else [],
            "fastpath_options": os.environ.get("ORCH_CUDA_FASTPATH", ""),
            "split_picks": splits,  # the skinny-GEMM splits lora_kernels timed and kept, per shape
            "philox_launch": launch,  # the Philox kernels' launch shapes (a tune step's picks where given)
            "pass_metrics": output.metrics,
            "pass_wall_s": wall,
            "pass_log": [e.get("message") for e in events if e.get("type") == "log"],
        },
    )
    harness.write_json(out_json, result)
    return result


# --------------------------------------------------------------------------------------------------------------
# the table: rendered from the per-row JSON files of one or more runs (bench/results/gpu_finetune/<run>/)


def flops_per_token(meta: dict[str, Any], data: str) -> float:
    cfg = meta["config"]
    lens = meta["lengths"][data]
    attn = 6 * cfg["num_hidden_layers"] * cfg["hidden_size"] * sum(n * n for n in lens) / sum(lens)
    return 4 * meta["n_params"] + attn


def peak_flops(device: str) -> float:
    for key, value in PEAK_FLOPS.items():
        if key in device:
            return value
    return 989e12


def loss_at(r: dict[str, Any], step: int) -> float | None:
    losses = r.get("losses") or {}
    return losses.get(str(step))


def baseline_of(system: str) -> str:
    """The row a system's ratio is taken against: QLoRA against the QLoRA baseline, the rest against the bf16 one."""
    return "qlora_baseline" if system in ("qlora", "qlora_baseline", "unsloth_qlora") else "baseline"


def peer_of(system: str) -> str | None:
    """The Unsloth row an orch row is compared with (same dropout): LoRA with LoRA, QLoRA with QLoRA."""
    return {"orch": "unsloth", "qlora": "unsloth_qlora"}.get(system)


LABELS = {
    "baseline": "transformers+peft (baseline)",
    "qlora_baseline": "transformers+peft+bitsandbytes QLoRA (baseline)",
    "olive": "Olive 0.13 `olive finetune`",
    "orch": "orch LoRA",
    "qlora": "orch QLoRA",
    "unsloth": "Unsloth LoRA",
    "unsloth_qlora": "Unsloth QLoRA",
}


def load_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """Runs from run folders (run.json + its row files) or folders holding run folders, sorted by folder name."""
    folders: list[Path] = []
    for path in paths:
        path = Path(path)
        if (path / "run.json").exists():
            folders.append(path)
        else:
            folders += sorted(p.parent for p in path.glob("*/run.json"))
    runs = []
    for folder in sorted(set(folders)):
        run = json.loads((folder / "run.json").read_text())
        run["name"] = folder.name
        run["rows"] = [json.loads((folder / name).read_text()) for name in run["row_files"]]
        notes = folder / "notes.json"
        run["notes"] = json.loads(notes.read_text()) if notes.exists() else []
        runs.append(run)
    if not runs:
        raise SystemExit(f"no run.json under {', '.join(map(str, paths))}")
    return runs


def _ok(rows: list[dict[str, Any]], system: str, dropout: float | None = None) -> dict[str, Any] | None:
    """The run's row of `system` at `dropout` with the plan's defaults; of several, the first not profiled (a
    profiled row's neighbouring steps run on a drained GPU queue: the profile is for reading, not for the median)."""
    same = [
        r
        for r in rows
        if r.get("ok") and r["system_id"] == system and not r.get("fastpath_options")
        and (dropout is None or abs(r.get("lora_dropout", -1) - dropout) < 1e-9)
    ]  # fmt: skip
    return next((r for r in same if not r.get("profiled_steps")), same[0] if same else None)


def max_loss_diff(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    la, lb = a.get("losses") or {}, b.get("losses") or {}
    common = [k for k in la if k in lb]
    return max(abs(la[k] - lb[k]) for k in common) if common else None


def row_line(r: dict[str, Any], rows: list[dict[str, Any]], meta: dict[str, Any], steps: int) -> str:
    if not r.get("ok"):
        error = " ".join(str(r.get("error", "")).replace("|", "/").split())
        return harness.row(r["row"], "", f"failed: {error[:160]}", *[""] * 8)
    system = r["system_id"]
    tps = r["tokens_per_s_median"]
    base = _ok(rows, baseline_of(system))
    peer_id = peer_of(system)
    peer = _ok(rows, peer_id, r.get("lora_dropout")) if peer_id else None
    mfu = tps * flops_per_token(meta, r["data"]) / peak_flops(r.get("device", ""))
    vb = f"{tps / base['tokens_per_s_median']:.2f}x" if base else "-"
    vu = f"{tps / peer['tokens_per_s_median']:.2f}x" if peer else "-"
    loss_n = loss_at(r, steps)
    diff = max_loss_diff(r, base) if base and base is not r else None
    step1 = (r.get("step_times") or [None])[0]
    label = LABELS.get(system, system) + (f" [{r['fastpath_options']}]" if r.get("fastpath_options") else "")
    return harness.row(
        label, f"{r.get('lora_dropout', SETTINGS['lora_dropout']):g}", f"{tps:,.0f}", vb, vu,
        f"{r['peak_mem_allocated_gib']:.1f} / {r['peak_mem_reserved_gib']:.1f}", f"{mfu:.1%}",
        "-" if loss_n is None else f"{loss_n:.3f}", "-" if diff is None else f"{diff:.3f}",
        "-" if step1 is None else f"{step1:.1f}", how_text(system, r),
    )  # fmt: skip


def target_lines(run: dict[str, Any]) -> list[str]:
    """The issue's targets, checked on this run's rows (the same machine, one call)."""
    rows, meta = run["rows"], run["meta"]
    out = []
    base = _ok(rows, "baseline")
    for dropout in sorted({r.get("lora_dropout") for r in rows if r.get("ok") and r["system_id"] == "orch"}):
        orch, uns = _ok(rows, "orch", dropout), _ok(rows, "unsloth", dropout)
        if orch is None:
            continue
        bits = []
        if base:
            ratio = orch["tokens_per_s_median"] / base["tokens_per_s_median"]
            if abs(base.get("lora_dropout", -1) - dropout) < 1e-9:
                bits.append(f"{ratio:.2f}x HF+peft ({'met' if ratio >= 2.0 else 'NOT met'}: >= 2.0x)")
            else:
                bits.append(f"{ratio:.2f}x HF+peft's row (its dropout {base.get('lora_dropout', 0):g})")
        if uns:
            ratio = orch["tokens_per_s_median"] / uns["tokens_per_s_median"]
            mem_ok = orch["peak_mem_allocated_gib"] <= uns["peak_mem_allocated_gib"]
            bits.append(f"{ratio:.2f}x Unsloth ({'met' if ratio >= 1.05 else 'NOT met'}: >= 1.05x)")
            bits.append(
                f"peak {orch['peak_mem_allocated_gib']:.1f} vs Unsloth {uns['peak_mem_allocated_gib']:.1f} GiB "
                f"({'met' if mem_ok else 'NOT met'}: no higher)"
            )
            d = max_loss_diff(orch, uns)
            if d is not None:
                bits.append(f"per-step loss within {d:.3f} of Unsloth's")
        mfu = orch["tokens_per_s_median"] * flops_per_token(meta, orch["data"]) / peak_flops(orch.get("device", ""))
        bits.append(f"MFU {mfu:.1%} ({'met' if mfu >= 0.5 else 'NOT met'}: >= 50%)")
        out.append(f"orch LoRA, dropout {dropout:g}: " + "; ".join(bits))
    q, uq = _ok(rows, "qlora"), _ok(rows, "unsloth_qlora")
    if q and uq:
        ratio = q["tokens_per_s_median"] / uq["tokens_per_s_median"]
        mem_ok = q["peak_mem_allocated_gib"] <= uq["peak_mem_allocated_gib"]
        out.append(
            f"orch QLoRA: {ratio:.2f}x Unsloth QLoRA ({'met' if ratio >= 1.05 else 'NOT met'}: >= 1.05x); peak "
            f"{q['peak_mem_allocated_gib']:.1f} vs {uq['peak_mem_allocated_gib']:.1f} GiB "
            f"({'met' if mem_ok else 'NOT met'}: no more)"
        )
    return out


def run_order(name: str) -> list[Any]:
    """A run folder's sort key: its numbers as numbers ('2026-12-07-h100-12' after '2026-12-07-h100-9')."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def render(runs: list[dict[str, Any]]) -> str:
    """The gpu section of bench/RESULTS.md, from the runs' JSON files alone."""
    s = SETTINGS
    lines = [
        "Rendered by `python bench/gpu_finetune.py --render bench/results/gpu_finetune` from the per-row JSON files "
        "under bench/results/gpu_finetune/ (tests/test_bench.py checks that this section is that rendering).",
        "",
        f"LoRA r={s['lora_r']}, alpha={s['lora_alpha']} on {', '.join(s['target_modules'])} (dropout per row); "
        f"batch {s['batch_size']} x {s['max_len']} tokens, AdamW lr {s['learning_rate']} constant, the Trainer logging "
        f"every {s['logging_steps']} steps (per-step losses are read from each step's loss tensor after training); "
        "random weights, bf16; every row sees the same samples in the same order. tokens/s = median of the per-step "
        "rates after the warm-up steps (per-step times from CUDA events at step ends: the timer adds no host sync). "
        "MFU = tokens/s x (4 N + causal attention FLOPs per token) / 989 TFLOP/s. Peak memory: "
        "torch.cuda.max_memory_allocated / max_memory_reserved of each row's own process. Ratios are taken within one "
        "run (one call on one machine): vs HF+peft against the run's baseline row, vs Unsloth against the Unsloth "
        "row of the same dropout (QLoRA: Unsloth QLoRA). No row saves checkpoints (orch's pass: its job has no "
        "checkpoint_dir, so its resume checkpoints are off, and save_strategy 'no'; the others: save_strategy 'no'); "
        "activation checkpointing as each row's 'how' says.",
        "",
    ]
    runs = sorted(runs, key=lambda r: run_order(r["name"]))  # run folders are named in the order they ran
    summary = [(run["name"], t) for run in reversed(runs) for t in target_lines(run)]
    if summary:
        lines.append("Summary: the issue's targets checked on each run (newest first; details under each run):")
        lines.append("")
        lines += [f"- `{name}`: {t}" for name, t in summary]
        lines.append("")
    shown_plan = None
    for run in runs:
        meta, cfg = run["meta"], run["meta"]["config"]
        lines.append(f"### `{meta['shape']}` ({run['name']}): {run.get('device', '?')}, {run.get('date', '')}")
        lines.append("")
        lines.append(
            f"Phi3ForCausalLM, {meta['n_params'] / 1e9:.2f} B parameters, hidden {cfg['hidden_size']}, "
            f"{cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} KV "
            f"heads, vocab {cfg['vocab_size']:,}"
            + (", tied embeddings" if cfg.get("tie_word_embeddings") else "")
            + (f", partial RoPE {cfg['partial_rotary_factor']}" if cfg.get("partial_rotary_factor") else "")
            + f". {run['steps']} steps, median over steps {run['warmup'] + 1}-{run['steps']}. "
            + f"{run.get('versions', '')}."
        )
        lines.append("")
        for data in ("fixed", "var"):
            data_rows = [r for r in run["rows"] if r.get("data") == data]
            if not data_rows:
                continue
            lens = meta["lengths"][data]
            lines.append(
                f"Data `{data}`: {len(lens)} samples of {min(lens)}-{max(lens)} tokens "
                f"(mean {statistics.mean(lens):.0f})."
            )
            lines.append("")
            header = ["system", "dropout", "tokens/s", "vs HF+peft", "vs Unsloth", "peak mem GiB (alloc / reserved)",
                      "MFU", f"loss @ {run['steps']}", "max per-step loss diff vs baseline", "step 1 s",
                      "how"]  # fmt: skip
            lines += harness.table(header, "lrrrrrrrrrl")
            lines += [row_line(r, data_rows, meta, run["steps"]) for r in data_rows]
            lines.append("")
        targets = target_lines(run)
        if targets:
            lines.append("Targets (issue 21), this run:")
            lines.append("")
            lines += [f"- {t}" for t in targets]
            lines.append("")
        for note in run.get("notes", []):
            lines.append(f"- {note}")
        if run.get("notes"):
            lines.append("")
        plan = next((r.get("plan") for r in run["rows"] if r.get("ok") and r.get("plan")), None)
        if plan and plan != shown_plan:
            lines.append(f"What orch picked on this GPU ({run['name']}, printed by the pass):")
            lines.append("")
            lines += [f"- {reason}" for reason in plan]
            lines.append("")
            shown_plan = plan
    return "\n".join(lines).rstrip("\n") + "\n"


def how_text(system: str, r: dict[str, Any]) -> str:
    if system == "baseline":
        return "HF Trainer, sdpa, batches padded to the longest"
    if system == "qlora_baseline":
        return "HF Trainer, bitsandbytes nf4 + double quant, prepare_model_for_kbit_training, grad checkpointing, sdpa"
    if system == "olive":
        return (
            "Olive's join: texts concatenated into full 1024 blocks (samples see each other); grad checkpointing "
            "(Olive's default: without it, it ran out of memory)"
        )
    if system in ("unsloth", "unsloth_qlora"):
        ckpt = "Unsloth checkpointing" if system == "unsloth_qlora" else "no checkpointing"
        base = "bitsandbytes nf4 + double quant base, " if system == "unsloth_qlora" else ""
        return (
            f"{base}FastLanguageModel (its LoRA kernels, compiled blocks), TRL SFTTrainer as Unsloth patches it, {ckpt}"
        )
    plan = " ".join(r.get("plan") or [])
    bits = []
    if "padding-free batches:" in plan:
        bits.append("padding-free")
    if "cuDNN's SDPA" in plan and r.get("data") == "fixed":
        bits.append("cuDNN attention")
    if "Liger kernels:" in plan:
        bits.append("Liger RMSNorm/RoPE" + ("" if "SwiGLU: orch" in plan else "/SwiGLU"))
    if "SwiGLU: orch" in plan:
        bits.append("orch SwiGLU")
    if "q, k, v split" in plan:
        bits.append("qkv split")
    if "fused LoRA layers:" in plan:
        masks = (
            ", masks as bits" if "kept as 1 bit per element" in plan
            else ", masks regenerated" if "mask regenerated from a Philox seed" in plan
            else ", stored masks" if "stored byte masks" in plan or "native_dropout: peft's masks" in plan
            else ""
        )  # fmt: skip
        bits.append("fused LoRA layers" + (f" (dropout inside{masks})" if "LoRA dropout inside" in plan else ""))
    if "small LoRA term written first" in plan:
        bits.append("LoRA-first GEMM order")
    if "residual add inside the post-attention RMSNorm" in plan:
        bits.append("fused add + RMSNorm")
    if "kept in pinned host memory" in plan:
        bits.append("checkpointed inputs in host memory")
    if "q, k (RoPE applied) and v written by one Triton kernel" in plan:
        bits.append("q/k/v + RoPE kernel")
    if "recomputes silu(gate) * up" in plan:
        bits.append("SwiGLU recomputed in down_proj's backward")
    if "no host sync in the training step" in plan:
        bits.append("no host syncs in the step")
    if "pinned memory without waiting" in plan:
        bits.append("non-blocking batch copies")
    if "QLoRA: the frozen norms" in plan:
        bits.append("bf16 frozen params")
    if "checkpointing on" in plan:
        bits.append("grad checkpointing")
    if "torch.compile" in plan:
        bits.append("torch.compile per decoder layer")
    if "adamw_torch_fused" in plan:
        bits.append("fused AdamW")
    bits.append("fused linear CE" if "fused linear cross-entropy" in plan else "TRL fused LM head")
    if system == "qlora":
        bits.insert(0, "nf4 + double quant base")
    return ", ".join(bits)


def write_results_md(md: str, path: Path) -> None:
    harness.write_section(path, SECTION, f"## GPU fine-tuning (bench/gpu_finetune.py)\n\n{md}")


def section_of(path: Path) -> str:
    """The gpu section's body as bench/RESULTS.md holds it (what write_results_md wrote)."""
    return harness.section_of(path, SECTION).removeprefix("## GPU fine-tuning (bench/gpu_finetune.py)\n\n")


def versions() -> str:
    import importlib.metadata as md

    parts = []
    names = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "liger-kernel", "bitsandbytes")
    for name in (*names, "unsloth", "unsloth_zoo", "olive-ai"):
        with contextlib.suppress(md.PackageNotFoundError):
            parts.append(f"{name} {md.version(name)}")
    return ", ".join(parts)


def orchestrate(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    specs = [parse_row(r) | {"row": r.strip()} for r in args.rows.split(",") if r.strip()]  # bad specs fail first
    # in a child process: the model is built on the GPU, and the CUDA context must not outlive it into the rows
    cmd = [sys.executable, str(Path(__file__).resolve()), "prepare", str(work), args.shape, str(args.steps)]
    subprocess.run(cmd, check=True)  # not a row: its output goes to the terminal, and a failure stops the run
    meta = json.loads((work / "prepared.json").read_text())
    print(f"prepared {args.shape}: {meta['n_params'] / 1e9:.2f} B params in {meta['prepare_s']:.0f}s", flush=True)
    run: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "device": "?",  # from the rows: this process never touches the GPU (its CUDA context would count)
        "versions": versions(),
        "steps": args.steps,
        "warmup": args.warmup,
        "meta": meta,
        "row_files": [],
    }
    deadline = time.monotonic() + args.budget_s
    profile_rows = {r.strip() for r in (args.profile or "").split(",") if r.strip()}
    launch = tuned_launch(args.launch) if getattr(args, "launch", None) else {}
    base_settings = json.loads(os.environ.get("BENCH_SETTINGS") or "{}")
    for i, spec in enumerate(specs):
        row_json = out / f"row_{i}_{spec['slug']}.json"
        log = out / f"row_{i}_{spec['slug']}.log"
        settings = {**SETTINGS, **spec["settings"]}
        ident = {"row": spec["row"], "system_id": spec["system"], "data": spec["data"], "shape": args.shape}
        ident["lora_dropout"] = float(settings["lora_dropout"])
        left = deadline - time.monotonic()
        if left < 45:
            r = {**ident, "ok": False, "error": "skipped: out of time budget"}
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "row", spec["system"]]
            cmd += ["--data", str(work / f"data_{spec['data']}.jsonl"), "--model", str(work / "model")]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--json", str(row_json)]
            env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
            env["ORCH_CUDA_FASTPATH"] = spec["fastpath"]
            env["BENCH_SETTINGS"] = json.dumps({**base_settings, **spec["settings"]})
            if launch:
                env["BENCH_LAUNCH"] = json.dumps(launch)
            if spec["row"] in profile_rows:
                env["BENCH_PROFILE"] = f"{out / f'profile_{i}'}:{args.steps - 1}:2"
            row_json.unlink(missing_ok=True)
            done = harness.run_row(cmd, log, env=env, timeout=min(left, args.row_timeout_s))
            if done.rc == 0 and row_json.exists():
                r = {**harness.read_json(row_json), **ident, "ok": True, "row_wall_s": done.wall_s}
                run["device"] = r.get("device", run["device"])
                r["how"] = how_text(spec["system"], r)
            else:
                error = f"rc={done.rc} " + " | ".join(done.tail())
                r = {**ident, "ok": False, "error": error, "row_wall_s": done.wall_s}
        harness.write_json(row_json, r)
        run["row_files"].append(row_json.name)
        harness.write_json(out / "run.json", run)
        brief = {k: r.get(k) for k in ("row", "ok", "tokens_per_s_median", "peak_mem_allocated_gib", "row_wall_s")}
        print(json.dumps(brief), flush=True)
        if not r["ok"]:
            print("  " + r["error"][:600], flush=True)
    md = render(load_runs([out]))
    harness.write_text(out / "RESULTS_gpu.md", md)
    print(md, flush=True)
    return 0


def row_main(args: argparse.Namespace) -> int:
    """One row in this process; a machine that cannot run it (QLoRA or Unsloth without CUDA) gets one line, exit 2."""
    from baseline_peft import run as run_baseline

    from orchestrator.passes.base import PassError

    try:
        if args.system == "baseline":
            run_baseline(args.model, args.data, args.steps, args.warmup, args.json)
        elif args.system == "qlora_baseline":
            run_baseline(args.model, args.data, args.steps, args.warmup, args.json, qlora=True)
        elif args.system == "olive":
            import olive_runner

            olive_runner.run(args.model, args.data, args.steps, args.warmup, args.json)
        elif args.system in ("orch", "qlora"):
            run_orch_row(args.model, args.data, args.steps, args.warmup, args.json, qlora=args.system == "qlora")
        elif args.system in ("unsloth", "unsloth_qlora"):
            import unsloth_runner

            try:
                unsloth_runner.run(
                    args.model, args.data, args.steps, args.warmup, args.json, qlora=args.system == "unsloth_qlora"
                )
            except unsloth_runner.Refusal as exc:
                print(exc, flush=True)
                return 2
        else:
            raise SystemExit(f"unknown system {args.system!r}")
    except PassError as exc:
        print(f"{args.system}: {exc}", flush=True)
        return 2
    return 0


def check() -> int:
    """Print the GPU stack's versions and check the padding-free attention kernel against per-sample SDPA."""
    import importlib

    import torch

    print("versions:", versions(), flush=True)
    for mod in ("trl", "liger_kernel", "bitsandbytes", "olive", "datasets", "pydantic", "flash_attn"):
        try:
            m = importlib.import_module(mod)
            print(f"import {mod}: ok {getattr(m, '__version__', '')}", flush=True)
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            print(f"import {mod}: FAILED {type(e).__name__}: {e}"[:300], flush=True)
    from orchestrator.passes.training.lora import cuda as lora_cuda
    from orchestrator.passes.training.lora import varlen_attention

    dev = lora_cuda.probe_device()
    print("device:", dev, flush=True)
    torch.manual_seed(0)
    lens = [700, 1024, 37, 300]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(sum(lens), 32, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    out = varlen_attention._varlen_call(q, k, v, cu, max(lens), 96**-0.5)
    print("varlen_attn used:", out is not None, flush=True)
    if out is None:
        return 0
    ref = varlen_attention._segment_attention(q.float(), k.float(), v.float(), cu, 96**-0.5)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), g.float())
    for name, a, b in (("out", out, ref), ("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        print(f"varlen vs per-sample fp32 SDPA: {name} rel err {err:.2e}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "check":
        return check()
    if argv and argv[0] == "prepare":
        prepare(Path(argv[1]), argv[2], int(argv[3]))
        return 0
    if argv and argv[0] == "row":
        p = argparse.ArgumentParser(prog="gpu_finetune.py row")
        p.add_argument("system")
        p.add_argument("--model", type=Path, required=True)
        p.add_argument("--data", type=Path, required=True)
        p.add_argument("--steps", type=int, required=True)
        p.add_argument("--warmup", type=int, required=True)
        p.add_argument("--json", type=Path, required=True)
        return row_main(p.parse_args(argv[1:]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out", help="where results.json, RESULTS_gpu.md and row logs go")
    p.add_argument("--work", default="/tmp/orch_bench", help="model and data folder (reused when present)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="phi3-mini")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma list of system:data[:opts] (default {DEFAULT_ROWS})")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=3600, help="stop starting rows after this many seconds")
    p.add_argument("--row-timeout-s", type=float, default=300)
    p.add_argument("--profile", default="", help="comma list of row specs whose last two steps are profiled")
    p.add_argument(
        "--launch",
        type=Path,
        help="a gpu_kernels.py kernels.json with a `tune` step: orch rows run the Philox kernels at its picked launch "
        "shapes (measured in the same device call) instead of philox_dropout.LAUNCH's",
    )
    p.add_argument(
        "--render",
        type=Path,
        nargs="+",
        help="run folders (run.json + row files), or folders of them: render them into bench/RESULTS.md",
    )
    args = p.parse_args(argv)
    if args.render:
        write_results_md(render(load_runs(args.render)), BENCH / "RESULTS.md")
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
