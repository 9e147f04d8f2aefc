"""LoRA fine-tuning throughput on one GPU: the transformers+peft baseline, Olive, orch's LoRA and QLoRA, side by side.

One command builds the model and data once and runs every row in its own process (clean peak-memory numbers),
in the same GPU session:

    python bench/gpu_finetune.py --out OUT                 # the full table (Phi-3-mini shape, ~8 min on an H100)
    python bench/gpu_finetune.py --out OUT --rows orch:var:-liger/-input_cast,orch:var  # ablations
    python bench/gpu_finetune.py --render OUT/results.json # rewrite the gpu section of bench/RESULTS.md

Model: Phi3ForCausalLM from a config with Phi-3-mini's shapes (hidden 3072, 32 layers, 32 heads, intermediate
8192, vocab 32064: 3.82 B parameters), random weights, built on the GPU and saved once in bf16; every row loads
that folder. Data: a generated corpus (a 6,000-word pseudo-language with a Markov structure, so the loss has
something to learn), a BPE tokenizer trained on it, written as jsonl; two sets, the SAME for every row:
  var    samples of ~100-1000 tokens (uniform), as instruction data comes; batches of 8 padded to the longest
  fixed  every sample cut at exactly 1024 tokens: no padding anywhere, so only kernels can make a difference
Rows (system:data[:ORCH_CUDA_FASTPATH]):
  baseline  bench/baseline_peft.py: plain transformers Trainer + peft
  olive     bench/olive_runner.py: Olive 0.13 `olive finetune` (its CLI, same settings)
  orch      orchestrator.passes.lora.train.LoRAPass.train (orch's real pass; it picks its CUDA fast path itself)
  qlora     orchestrator.passes.lora.train.QLoRAPass.train (bitsandbytes nf4 + double quant)
  qlora_baseline  bench/baseline_peft.py --qlora: transformers + peft + bitsandbytes (nf4, double quant,
            prepare_model_for_kbit_training with gradient checkpointing): the QLoRA row's own baseline
Shapes: phi3-mini (default), phi4-mini (GQA 24/8 heads, vocab 200,064, tied embeddings, partial RoPE 0.75).
`--profile ROW` profiles the last two steps of that row (bench/baseline_peft.py BENCH_PROFILE; those steps are
left out of its median) and writes profile_<n>.txt beside the row's log.
Numbers: tokens/s = real (non-padding) tokens per second, median of the per-step rates after the warm-up steps;
peak memory = torch.cuda.max_memory_allocated of the row's process; MFU = tokens/s x (4 N + causal attention
FLOPs per token of the data's samples) / 989 TFLOP/s (H100 / H200 SXM dense bf16), N = all parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import results_md  # noqa: E402
from baseline_peft import SETTINGS, install_step_timer, read_texts, summarize  # noqa: E402

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
DEFAULT_ROWS = "baseline:var,orch:var,olive:var,qlora:var,baseline:fixed,orch:fixed"
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
    from orchestrator.passes.tiny_model import train_phi3_tokenizer

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
    meta_path.write_text(json.dumps(meta))
    return meta


# --------------------------------------------------------------------------------------------------------------
# orch rows: the real LoRA / QLoRA pass


def run_orch_row(model_dir: Path, data: Path, steps: int, warmup: int, out_json: Path, qlora: bool) -> dict:
    from datasets import Dataset

    from orchestrator.core.job import Job, ModelArtifact
    from orchestrator.passes.base import PassContext
    from orchestrator.passes.lora import cuda as lora_cuda
    from orchestrator.passes.lora.train import LoRAConfig, LoRAPass, QLoRAPass

    install_step_timer()
    s = SETTINGS
    # the benchmark's user config: the same LoRA and training settings as every other row, and nothing about
    # bf16 / packing / kernels / checkpointing: the pass chooses those
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
        "logging_steps": 1,
    }
    cfg_kwargs: dict[str, Any] = {
        "lora_r": s["lora_r"],
        "lora_alpha": s["lora_alpha"],
        "lora_dropout": s["lora_dropout"],
        "target_modules": s["target_modules"],
        "train_data_config": "train",
        "training_args": training_args,
    }
    if qlora:
        cfg_kwargs.update(double_quant=True, quant_type="nf4")
    config = LoRAConfig(**cfg_kwargs)
    pass_cls = QLoRAPass if qlora else LoRAPass
    artifact = ModelArtifact(format="hf", path=str(model_dir))
    out_dir = out_json.parent / ("qlora_out" if qlora else "lora_out")
    out_dir.mkdir(parents=True, exist_ok=True)
    job = Job(
        job_id="bench",
        pass_name="qlora" if qlora else "lora",
        pass_type=pass_cls.type_name,
        pass_config=config.model_dump(mode="json"),
        model=artifact,
        output_dir=str(out_dir),
        accelerator="gpu",
    )
    events: list[dict] = []
    ctx = PassContext(job=job, out_dir=out_dir, emit=events.append)
    spec = SimpleNamespace(max_len=s["max_len"], pad_to_max_len=False, corpus_join=False, use_attention_mask=True)
    train_ds = Dataset.from_dict({"text": read_texts(data)})
    t0 = time.perf_counter()
    output = pass_cls().train(config, artifact, ctx, train_ds, None, spec)
    wall = time.perf_counter() - t0
    plan = lora_cuda.LAST_PLAN
    from orchestrator.passes.lora import kernels as lora_kernels

    splits = {" ".join(map(str, k[:4])): v for k, v in lora_kernels._SPLIT_CACHE.items()}
    result = summarize(
        f"orch {pass_cls.type_name}",
        warmup,
        {
            "plan": list(plan.reasons) if plan else [],
            "fastpath_options": os.environ.get("ORCH_CUDA_FASTPATH", ""),
            "split_picks": splits,  # the skinny-GEMM splits lora_kernels timed and kept, per shape
            "pass_metrics": output.metrics,
            "pass_wall_s": wall,
            "pass_log": [e.get("message") for e in events if e.get("type") == "log"],
        },
    )
    out_json.write_text(json.dumps(result, indent=1))
    return result


# --------------------------------------------------------------------------------------------------------------
# the table


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
    return "qlora_baseline" if system in ("qlora", "qlora_baseline") else "baseline"


def render(results: dict[str, Any]) -> str:
    metas = results.get("metas") or {results["meta"]["shape"]: results["meta"]}
    rows = results["rows"]
    first = next(iter(metas.values()))
    lines = [
        f"Measured {results.get('date', '')} on {results.get('device', '?')}; {results.get('versions', '')}.",
        f"LoRA r={SETTINGS['lora_r']}, alpha={SETTINGS['lora_alpha']}, dropout={SETTINGS['lora_dropout']} on "
        f"{', '.join(SETTINGS['target_modules'])}; batch {SETTINGS['batch_size']} x max {SETTINGS['max_len']} tokens, "
        f"AdamW lr {SETTINGS['learning_rate']} constant; {results['steps']} steps, tokens/s = median over steps "
        f"{results['warmup'] + 1}-{results['steps']} (real tokens, padding excluded). Random weights, bf16.",
        "",
    ]
    for shape, meta in metas.items():
        cfg = meta["config"]
        lines.append(
            f"- Model `{shape}`: Phi3ForCausalLM, {meta['n_params'] / 1e9:.2f} B parameters, hidden "
            f"{cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']} heads / "
            f"{cfg['num_key_value_heads']} KV heads, vocab {cfg['vocab_size']:,}"
            + (", tied embeddings" if cfg.get("tie_word_embeddings") else "")
            + (f", partial RoPE {cfg['partial_rotary_factor']}" if cfg.get("partial_rotary_factor") else "")
        )
    lines.append("")
    multi = len({r.get("session", 1) for r in rows}) > 1
    if multi:
        lines.append(
            "Rows marked (run N) come from the N-th call of this script, each on a fresh machine of the same kind; "
            "every ratio is taken against the baseline of the same run (QLoRA: the QLoRA baseline)."
        )
        lines.append("")
    n_loss = results["steps"]
    for shape, meta in metas.items():
        for data in ("var", "fixed"):
            data_rows = [r for r in rows if r.get("data") == data and r.get("shape", first["shape"]) == shape]
            if not data_rows:
                continue
            lens = meta["lengths"][data]
            lines.append(
                f"**`{shape}`, data `{data}`**: {len(lens)} samples, {min(lens)}-{max(lens)} tokens "
                f"(mean {statistics.mean(lens):.0f})"
                + (" — every row sees the same texts" if data == "var" else " — every sample exactly the max length")
            )
            lines.append("")

            def ref(system: str, session: int, rows: list[dict[str, Any]] = data_rows) -> dict[str, Any] | None:
                return next(
                    (
                        r
                        for r in rows
                        if r["row"].split(":")[0] == system and r.get("ok") and r.get("session", 1) == session
                    ),
                    None,
                )

            fpt = flops_per_token(meta, data)
            has_olive = any(r["row"].startswith("olive") for r in data_rows)
            olive_col = " vs Olive |" if has_olive else ""
            lines.append(
                f"| system | tokens/s | vs its baseline |{olive_col} peak mem (alloc / reserved GiB) | MFU "
                f"| loss @ step {n_loss} | loss @ 10 | step 1 s | how |"
            )
            lines.append("|---|---:|---:|" + ("---:|" if has_olive else "") + "---:|---:|---:|---:|---:|---|")
            for r in data_rows:
                if not r.get("ok"):
                    blanks = "| | | | | | |" + (" |" if has_olive else "")
                    lines.append(f"| {r['row']} | failed {blanks} {r.get('error', '')[:160]} |")
                    continue
                tps = r["tokens_per_s_median"]
                session = r.get("session", 1)
                system = r["row"].split(":")[0]
                base = ref(baseline_of(system), session)
                olive = ref("olive", session)
                mfu = tps * fpt / peak_flops(r.get("device", ""))
                vb = f"{tps / base['tokens_per_s_median']:.2f}x" if base else "-"
                vo = (f" {tps / olive['tokens_per_s_median']:.2f}x |" if olive else " - |") if has_olive else ""
                loss_n, loss_10 = loss_at(r, n_loss), loss_at(r, 10)
                step1 = (r.get("step_times") or [None])[0]
                lines.append(
                    f"| {r['system']}{' [' + r['fastpath_options'] + ']' if r.get('fastpath_options') else ''}"
                    f"{f' (run {session})' if multi else ''} "
                    f"| {tps:,.0f} | {vb} |{vo} {r['peak_mem_allocated_gib']:.1f} / {r['peak_mem_reserved_gib']:.1f} "
                    f"| {mfu:.1%} | {loss_n if loss_n is None else f'{loss_n:.3f}'} "
                    f"| {loss_10 if loss_10 is None else f'{loss_10:.3f}'} "
                    f"| {step1 if step1 is None else f'{step1:.1f}'} | {how_text(system, r)} |"
                )
            lines.append("")
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    if results.get("notes"):
        lines.append("")
    plans = {f"{r.get('shape', '')} {r['row']}".strip(): r.get("plan") for r in rows if r.get("ok") and r.get("plan")}
    if plans:
        lines.append("What orch picked on this GPU (orchestrator/passes/lora/cuda.py, printed by the pass):")
        lines.append("")
        first = next(iter(plans.items()))
        for reason in first[1]:
            lines.append(f"- {reason}")
        for row, plan in plans.items():
            if plan != first[1]:
                lines.append(f"- {row}: " + "; ".join(plan))
        lines.append("")
    return "\n".join(lines)


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
    plan = " ".join(r.get("plan") or [])
    bits = []
    if "padding-free batches:" in plan:
        bits.append("padding-free + varlen attention")
    if "cuDNN's SDPA" in plan and r.get("data") == "fixed":
        bits.append("cuDNN attention (equal-length rows)")
    if "Liger kernels:" in plan:
        bits.append("Liger RMSNorm/RoPE" + ("" if "SwiGLU: orch" in plan else "/SwiGLU"))
    if "SwiGLU: orch" in plan:
        bits.append("orch SwiGLU kernel")
    if "q, k, v split" in plan:
        bits.append("qkv split")
    if "input cast off" in plan:
        bits.append("no peft fp32 input cast")
    if "fused LoRA layers:" in plan:
        inside = ", dropout inside" if "LoRA dropout inside" in plan else ""
        bits.append(f"fused LoRA layers (addmm epilogue{inside})")
    if "checkpointing on" in plan:
        bits.append("grad checkpointing")
    if "torch.compile" in plan:
        bits.append("torch.compile per decoder layer")
    if "adamw_torch_fused" in plan:
        bits.append("fused AdamW")
    bits.append("Liger fused linear CE" if "Liger's fused linear cross-entropy" in plan else "TRL fused LM head")
    if system == "qlora":
        bits.insert(0, "nf4 + double quant base")
    return ", ".join(bits)


def merge_results(paths: list[Path]) -> dict[str, Any]:
    """One table from several runs (same steps; shapes may differ): run N's rows carry session=N and their shape.

    Runs of different shapes count as one session per shape (their ratios are within a run either way)."""
    merged: dict[str, Any] | None = None
    seen: dict[str, int] = {}
    for path in paths:
        res = json.loads(Path(path).read_text())
        shape = res["meta"]["shape"]
        seen[shape] = seen.get(shape, 0) + 1
        for r in res["rows"]:
            r["session"] = seen[shape]
            r["shape"] = shape
        if merged is None:
            merged = res
            merged["metas"] = {shape: res["meta"]}
        else:
            if res["steps"] != merged["steps"]:
                raise SystemExit(f"{path}: another step count than {paths[0]}")
            merged["metas"].setdefault(shape, res["meta"])
            merged["rows"] += res["rows"]
    assert merged is not None
    return merged


def write_results_md(md: str, path: Path) -> None:
    results_md.write_section(path, SECTION, f"## GPU fine-tuning (bench/gpu_finetune.py)\n\n{md}")


def versions() -> str:
    import importlib.metadata as md

    parts = []
    for name in ("torch", "transformers", "peft", "trl", "liger-kernel", "bitsandbytes", "olive-ai"):
        with contextlib.suppress(md.PackageNotFoundError):
            parts.append(f"{name} {md.version(name)}")
    return ", ".join(parts)


def orchestrate(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    # in a child process: the model is built on the GPU, and the CUDA context must not outlive it into the rows
    cmd = [sys.executable, str(Path(__file__).resolve()), "prepare", str(work), args.shape, str(args.steps)]
    subprocess.run(cmd, check=True)
    meta = json.loads((work / "prepared.json").read_text())
    print(f"prepared {args.shape}: {meta['n_params'] / 1e9:.2f} B params in {meta['prepare_s']:.0f}s", flush=True)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "device": "?",  # from the rows: this process never touches the GPU (its CUDA context would count)
        "versions": versions(),
        "steps": args.steps,
        "warmup": args.warmup,
        "meta": meta,
        "rows": [],
    }
    deadline = time.monotonic() + args.budget_s
    profile_rows = {r.strip() for r in (args.profile or "").split(",") if r.strip()}
    for spec in [r.strip() for r in args.rows.split(",") if r.strip()]:
        system, _, rest = spec.partition(":")
        data, _, opts = rest.partition(":")
        opts = opts.replace("/", ",")
        left = deadline - time.monotonic()
        if left < 45:
            results["rows"].append({"row": spec, "data": data, "ok": False, "error": "skipped: out of time budget"})
            continue
        row_json = out / f"row_{len(results['rows'])}_{system}_{data}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "row", system, "--data", str(work / f"data_{data}.jsonl")]
        cmd += ["--model", str(work / "model"), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += ["--json", str(row_json)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        env["ORCH_CUDA_FASTPATH"] = opts
        if spec in profile_rows:
            prof_dir = out / f"profile_{len(results['rows'])}"
            env["BENCH_PROFILE"] = f"{prof_dir}:{args.steps - 1}:2"
        t0 = time.perf_counter()
        log = out / f"row_{len(results['rows'])}_{system}_{data}.log"
        try:
            with open(log, "w") as lf:
                rc = subprocess.run(
                    cmd, env=env, stdout=lf, stderr=subprocess.STDOUT, timeout=min(left, args.row_timeout_s)
                ).returncode
        except subprocess.TimeoutExpired:
            rc = -9
        wall = time.perf_counter() - t0
        if rc == 0 and row_json.exists():
            r = json.loads(row_json.read_text())
            r.update(row=spec, data=data, ok=True, row_wall_s=wall, shape=args.shape)
            results["device"] = r.get("device", results["device"])
            r["how"] = how_text(system, r)
        else:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            r = {"row": spec, "data": data, "ok": False, "error": f"rc={rc} " + " | ".join(tail), "row_wall_s": wall}
        results["rows"].append(r)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        brief = {k: r.get(k) for k in ("row", "ok", "tokens_per_s_median", "peak_mem_allocated_gib", "row_wall_s")}
        print(json.dumps(brief), flush=True)
        if not r["ok"]:
            print("  " + r["error"][:600], flush=True)
    md = render(results)
    (out / "RESULTS_gpu.md").write_text(md)
    print(md, flush=True)
    return 0


def row_main(args: argparse.Namespace) -> int:
    import olive_runner  # noqa: F401  (bench/ is on sys.path)
    from baseline_peft import run as run_baseline

    if args.system == "baseline":
        run_baseline(args.model, args.data, args.steps, args.warmup, args.json)
    elif args.system == "qlora_baseline":
        run_baseline(args.model, args.data, args.steps, args.warmup, args.json, qlora=True)
    elif args.system == "olive":
        olive_runner.run(args.model, args.data, args.steps, args.warmup, args.json)
    elif args.system in ("orch", "qlora"):
        run_orch_row(args.model, args.data, args.steps, args.warmup, args.json, qlora=args.system == "qlora")
    else:
        raise SystemExit(f"unknown system {args.system!r}")
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
    from orchestrator.passes.lora import cuda as lora_cuda

    dev = lora_cuda.probe_device()
    print("device:", dev, flush=True)
    torch.manual_seed(0)
    lens = [700, 1024, 37, 300]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(sum(lens), 32, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
    out = lora_cuda._varlen_call(q, k, v, cu, max(lens), 96**-0.5)
    print("varlen_attn used:", out is not None, flush=True)
    if out is None:
        return 0
    ref = lora_cuda._segment_attention(q.float(), k.float(), v.float(), cu, 96**-0.5)
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
        "--render", type=Path, nargs="+", help="results.json of one or more runs: render them into bench/RESULTS.md"
    )
    p.add_argument("--notes", type=Path, help="with --render: a text file of notes (paragraphs) under the tables")
    args = p.parse_args(argv)
    if args.render:
        results = merge_results(args.render)
        if args.notes:  # one note per paragraph (blank-line separated) of the file
            paras = [" ".join(b.split()) for b in args.notes.read_text().split("\n\n") if b.strip()]
            results["notes"] = [*results.get("notes", []), *paras]
        write_results_md(render(results), BENCH / "RESULTS.md")
        return 0
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
