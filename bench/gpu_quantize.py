"""AWQ and GPTQ int4 (orchestrator/passes/quantization/awq_gptq.py, llm-compressor) on a CUDA GPU, then export and
generation.

Two phases, because the GPU machine has no onnxruntime(-genai) and this one has no GPU:

1. `run`, on the GPU machine: builds a ~31 M-parameter Phi-3-architecture model with random weights (seed 0, hidden
   512, 8 layers, intermediate 1536, vocab 4000: every Linear input width a multiple of group_size 128) and a
   calibration file of generated text, then runs each algorithm as `orch quantize --algorithm awq|gptq --precision
   int4 --data_name json --data_files calib.jsonl` does: the workflow from orchestrator.olive.quantize.
   quantize_workflow, read by orchestrator.schema.load_workflow, handed as a Job to orchestrator.runner.run_job (the
   entry point every system runs), so the pass loads its calibration data through its data_config. Recorded per
   algorithm: wall seconds of run_job, torch.cuda.max_memory_allocated/reserved, the checkpoint size, the pass's log,
   the error if it failed (one failing algorithm does not stop the other; results.json is rewritten after every
   step), and the int4 model's logits against the full-precision one (with round-to-nearest int4 as a reference).
   Each checkpoint comes back as OUT/<algo>.tgz (split into <algo>.tgz.NN parts of at most 15 MiB if larger).
2. `finish`, here (the orch venv): unpacks, runs orch's ModelBuilder pass (int4, CPU; through run_job) on each
   checkpoint, counts MatMulNBits nodes, generates with onnxruntime-genai, compares the ONNX logits with the
   dequantized checkpoint in transformers (load_dequantized), and rewrites the `quantize` section of
   bench/RESULTS.md.

On the lent GPU (carry `.whl_awq`; its wheels: see bench/README.md), about 30-40 s:

    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/siteq .whl_awq/*.whl && \
    PYTHONPATH=/tmp/siteq:$PWD python3 bench/gpu_quantize.py run --out $OUT/quant

then here:

    .venv/bin/python bench/gpu_quantize.py finish <files_at>/quant    # [--no-write]: print the section only

CPU run, in an environment with llm-compressor and transformers 5.17 (the wheels above): `python
bench/gpu_quantize.py run --device cpu --out /tmp/q_out --algo-timeout-s 0 [--algorithms awq] [--samples 8]`, then
`.venv/bin/python bench/gpu_quantize.py finish /tmp/q_out --no-write`. `--device cpu` sets ORCH_AWQ_CPU=1, so AWQ
runs there too (the pass refuses AWQ without a GPU otherwise: it is slow on CPU, 4-9 min for this model with 32
samples on 2 shared cores, against 7 s on an H100). This is how the first H100 AWQ result (zero points packed in
the wrong convention, int4 vs fp rel. L2 1.42) was reproduced and its fix checked without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import signal
import sys
import tarfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

SECTION = "quantize"  # its markers in bench/RESULTS.md
SIZES = {
    "vocab_size": 4000,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_layers": 8,
    "num_heads": 8,
    "num_kv_heads": 8,
    "max_position_embeddings": 1024,
}
ALGORITHMS = ("gptq", "awq")  # GPTQ first: the quicker, surer one
PART_BYTES = 15 * 2**20  # what comes back from the GPU machine: files of at most 16 MiB
RESULTS = "results.json"
VERSION_NAMES = (
    "torch",
    "transformers",
    "llmcompressor",
    "compressed-tensors",
    "accelerate",
    "datasets",
    "pydantic",
    "numpy",
    "tokenizers",
    "safetensors",
    "huggingface-hub",
)
PROMPT = "the quick brown fox jumps over the lazy dog and"
NO_CUDA = (
    "gpu_quantize: run needs a CUDA GPU (--device cuda, the default) and this machine has none; "
    "`run --device cpu` runs it on CPU (slowly)"
)
NO_LLMCOMPRESSOR = (
    "gpu_quantize: run needs llm-compressor 0.14.0.1 (the wheels of .whl_awq/, see bench/README.md) and this "
    "environment has none"
)


def corpus(n: int, seed: int, words: tuple[int, int] = (60, 160)) -> list[str]:
    """Generated text: words of random letters, a fixed vocabulary of 3000 of them (seeded)."""
    import random

    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(*words))) for _ in range(n)]


def versions(names: tuple[str, ...] = VERSION_NAMES) -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


write_json = harness.write_json  # results.json after every step: a run cut short keeps what it measured


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """TimeoutError in the main thread after `seconds` (0: no limit)."""
    if seconds <= 0:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"stopped after {seconds:.0f} s (--algo-timeout-s)")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()[:2000]


# ---------------------------------------------------------------------------------------------------------------
# phase 1: on the GPU machine


def build_model(work: Path) -> Path:
    from orchestrator.passes.models.tiny_model import build_tiny_phi3

    hf = work / "hf"
    if not (hf / "config.json").exists():
        build_tiny_phi3(hf, texts=corpus(400, seed=0), seed=0, **SIZES)
    return hf


def count_params(hf: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in hf.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def make_job(algo: str, hf: Path, calib: Path, work: Path, gpu: bool) -> Any:
    """The Job `orch quantize --algorithm ALGO --precision int4 --data_name json --data_files CALIB` would run."""
    from orchestrator.core.job import Job, JobTracking, ModelArtifact
    from orchestrator.olive import load_workflow
    from orchestrator.olive.quantize import quantize_workflow

    # cuda_available=True: the CLI refuses awq/gptq on a machine without CUDA; the CPU run goes past it (the pass
    # itself then runs GPTQ on CPU, and AWQ with ORCH_AWQ_CPU=1, which `run --device cpu` sets).
    wf = quantize_workflow(
        model_name_or_path=str(hf),
        output_path=str(work / f"orch_{algo}"),
        algorithm=algo,
        precision="int4",
        cuda_available=True,
        data_name="json",
        data_files=str(calib),
    )
    conf = load_workflow(wf, base_dir=work)
    ((name, entry),) = conf.passes.items()
    return Job(
        job_id=f"bench-{algo}",
        pass_name=name,
        pass_type=entry.type,
        pass_config=dict(entry.config or {}),
        model=ModelArtifact(format="hf", path=str(hf)),
        data_configs={dc.name: dc.model_dump(mode="json") for dc in conf.data_configs},
        output_dir=str(work / f"job_{algo}"),
        accelerator="gpu" if gpu else "cpu",
        tracking=JobTracking(mode="events", metric_prefix=f"{name}/"),
    )


def pass_log(job_dir: Path) -> list[str]:
    events = job_dir / "events.jsonl"
    if not events.exists():
        return []
    lines = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    return [e["message"] for e in lines if e.get("type") == "log"]


def pack(ckpt: Path, out: Path, algo: str) -> list[str]:
    """ckpt folder -> out/ALGO.tgz (gzip level 1: int4 codes hardly compress), split into parts if too large."""
    archive = out / f"{algo}.tgz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        tar.add(ckpt, arcname=algo)
    if archive.stat().st_size <= PART_BYTES:
        return [archive.name]
    names = []
    with archive.open("rb") as src:
        for i in range(100):
            chunk = src.read(PART_BYTES)
            if not chunk:
                break
            part = out / f"{algo}.tgz.{i:02d}"
            part.write_bytes(chunk)
            names.append(part.name)
    archive.unlink()
    return names


def logits_vs_reference(ref: Any, model: Any, batches: list[Any]) -> dict[str, float]:
    """Logits of `model` against `ref` on the same token ids: max/mean |diff|, relative L2 error, greedy agreement,
    mean KL(ref || model) per token."""
    import torch

    diffs_max, abs_sum, sq_diff, sq_ref, agree, kl_sum, n = 0.0, 0.0, 0.0, 0.0, 0, 0.0, 0
    with torch.no_grad():
        for ids in batches:
            a = ref(ids).logits[0].float()
            b = model(ids).logits[0].float()
            d = (b - a).abs()
            diffs_max = max(diffs_max, float(d.max()))
            abs_sum += float(d.mean()) * a.shape[0]
            sq_diff += float(((b - a) ** 2).sum())
            sq_ref += float((a**2).sum())
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            la, lb = a.log_softmax(-1), b.log_softmax(-1)
            kl_sum += float((la.exp() * (la - lb)).sum())
            n += a.shape[0]
    return {
        "max_abs_diff": diffs_max,
        "mean_abs_diff": abs_sum / n,
        "rel_l2": (sq_diff / max(sq_ref, 1e-30)) ** 0.5,
        "greedy_agree": agree / n,
        "kl_per_token": kl_sum / n,
        "n_tokens": float(n),
    }


def eval_batches(hf: Path, device: str, n: int = 8, max_len: int = 256) -> list[Any]:
    """Held-out generated text (another seed than the calibration data), as [1, T] id tensors on `device`."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    return [torch.tensor([tok(t)["input_ids"][:max_len]], device=device) for t in corpus(n, seed=2, words=(150, 250))]


def rtn_model(hf: Path, device: str, sym: bool, group: int = 128) -> Any:
    """The full-precision model with every Linear but the LM head rounded to int4 (round to nearest, groups of
    `group`, fp16 scales): what AWQ/GPTQ should beat."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    head = model.get_output_embeddings()
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        w = module.weight.data
        g = w.reshape(w.shape[0], -1, group)
        if sym:
            scale = (g.abs().amax(-1, keepdim=True) / 7).clamp_min(1e-8).half().float()
            q = torch.clamp(torch.round(g / scale), -8, 7)
            deq = q * scale
        else:
            lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
            scale = ((hi - lo) / 15).clamp_min(1e-8).half().float()
            zp = torch.round(-lo / scale).clamp(0, 15)
            deq = (torch.clamp(torch.round(g / scale) + zp, 0, 15) - zp) * scale
        module.weight.data = deq.reshape_as(w)
    return model.to(device)


def quality(hf: Path, ckpt: Path | None, device: str, batches: list[Any]) -> dict[str, Any]:
    """int4 (the checkpoint, dequantized) vs the full-precision model; ckpt None: the two RTN references."""
    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.passes.common.gptq_layout import load_dequantized

    ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval().to(device)
    if ckpt is not None:
        return logits_vs_reference(ref, load_dequantized(ckpt).to(device), batches)
    return {
        f"rtn_{'sym' if sym else 'asym'}": logits_vs_reference(ref, rtn_model(hf, device, sym), batches)
        for sym in (True, False)
    }


def quantize_one(algo: str, hf: Path, calib: Path, work: Path, out: Path, device: str, limit: float) -> dict[str, Any]:
    import torch

    from orchestrator.passes.base import PassError
    from orchestrator.runner import run_job

    row: dict[str, Any] = {"algorithm": algo, "ok": False}
    gpu = device == "cuda"
    try:
        job = make_job(algo, hf, calib, work, gpu)
    except Exception as exc:  # noqa: BLE001 - recorded, the other algorithm still runs
        row["error"] = f"building the workflow/job: {error_text(exc)}"
        row["traceback"] = traceback.format_exc()[-4000:]
        return row
    row["pass_type"], row["pass_config"] = job.pass_type, job.pass_config
    job_dir = Path(job.output_dir)
    shutil.rmtree(job_dir, ignore_errors=True)
    gc.collect()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        with time_limit(limit):
            result = run_job(job)
        row["ok"] = True
    except PassError as exc:
        row["error"] = f"PassError: {exc}"
    except Exception as exc:  # noqa: BLE001 - recorded, the other algorithm still runs
        row["error"] = error_text(exc)
        row["traceback"] = traceback.format_exc()[-4000:]
    row["quantize_s"] = time.perf_counter() - t0
    if gpu:
        torch.cuda.synchronize()
        row["peak_gpu_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    row["log"] = pass_log(job_dir)
    if not row["ok"]:
        return row
    row["metrics"] = dict(result.metrics)
    row["pass_versions"] = dict(result.versions)
    ckpt = job_dir / (result.model.path if result.model else "model")
    row["checkpoint_path"] = str(ckpt)
    try:
        row["checkpoint_mb"] = folder_bytes(ckpt) / 1e6
        row["checkpoint_files"] = sorted(p.name for p in ckpt.iterdir())
        row["quantization_config"] = json.loads((ckpt / "config.json").read_text()).get("quantization_config")
        t1 = time.perf_counter()
        row["archive"] = pack(ckpt, out, algo)
        row["pack_s"] = time.perf_counter() - t1
    except Exception as exc:  # noqa: BLE001 - the timing and the log are still worth bringing back
        row["pack_error"] = error_text(exc)
    return row


def refusal(device: str) -> str | None:
    """Why `run` cannot start here (checked before anything is built or written), or None."""
    import importlib.util

    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return NO_CUDA
    if importlib.util.find_spec("llmcompressor") is None:
        return NO_LLMCOMPRESSOR
    return None


def cmd_run(a: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported
        os.environ.setdefault("ORCH_AWQ_CPU", "1")  # AWQ runs on CPU when asked (passes/quantization/awq_gptq.py)
    why = refusal(a.device)
    if why:
        print(why, file=sys.stderr)
        return 2
    work, out = a.work.resolve(), a.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(work / "hf_home"),
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
    }.items():
        os.environ.setdefault(key, value)
    os.chdir(work)  # whatever a library writes into the working directory stays out of the repository
    algos = [s.strip() for s in a.algorithms.split(",") if s.strip()]
    res: dict[str, Any] = {
        "bench": "gpu_quantize",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "argv": sys.argv[1:],
        "sizes": SIZES,
        "rows": {},
        "setup": {},
    }
    path = out / RESULTS

    def save() -> None:
        res["total_s"] = time.perf_counter() - t_start
        write_json(path, res)

    save()
    try:
        import torch

        res["versions"] = versions()
        res["torch_cuda"] = torch.version.cuda
        gpu = torch.cuda.is_available()
        device = "cuda" if gpu else "cpu"
        res["device"] = device
        res["device_name"] = torch.cuda.get_device_name(0) if gpu else "cpu"
        if gpu:
            props = torch.cuda.get_device_properties(0)
            res["gpu_memory_gib"] = props.total_memory / 2**30
            res["compute_capability"] = f"{props.major}.{props.minor}"
            x = torch.randn(1024, 1024, device="cuda")
            (x @ x).sum().item()  # CUDA context + cuBLAS up before anything is timed
        t0 = time.perf_counter()
        try:  # imported before timing: quantize_s is the pass, not Python imports
            import datasets  # noqa: F401
            import llmcompressor  # noqa: F401
            from llmcompressor.modifiers.awq import AWQModifier  # noqa: F401
            from llmcompressor.modifiers.gptq import GPTQModifier  # noqa: F401

            import orchestrator.passes.quantization.awq_gptq  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - the pass reports it again, per algorithm
            res["setup"]["import_error"] = error_text(exc)
        res["setup"]["import_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf = build_model(work)
        res["setup"]["build_s"] = time.perf_counter() - t0
        res["n_params"] = count_params(hf)
        res["model_mb_fp32"] = sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 1e6
        texts = corpus(a.samples, seed=1)
        calib = work / "calib.jsonl"
        calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        from transformers import AutoTokenizer

        lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(hf)(texts)["input_ids"]]
        res["calibration"] = {
            "samples": len(texts),
            "tokens": sum(lengths),
            "min_tokens": min(lengths),
            "max_tokens": max(lengths),
        }
        save()
    except Exception as exc:  # noqa: BLE001 - the JSON says what went wrong
        res["setup"]["error"] = error_text(exc)
        res["setup"]["traceback"] = traceback.format_exc()[-4000:]
        save()
        print(json.dumps(res, indent=1, default=str)[-6000:])
        return 1

    batches = None
    for algo in algos:
        print(f"=== {algo} ===", flush=True)
        res["rows"][algo] = {
            "algorithm": algo,
            "ok": False,
            "error": f"started {time.perf_counter() - t_start:.0f} s into the script, never finished (command stopped)",
        }
        save()
        row = quantize_one(algo, hf, calib, work, out, device, a.algo_timeout_s)
        res["rows"][algo] = row
        save()
        if row["ok"] and not a.no_quality:
            t0 = time.perf_counter()
            try:
                batches = batches or eval_batches(hf, device)
                row["int4_vs_fp"] = quality(hf, Path(row["checkpoint_path"]), device, batches)
            except Exception as exc:  # noqa: BLE001
                row["int4_vs_fp_error"] = error_text(exc)
            row["quality_s"] = time.perf_counter() - t0
            save()
        print(
            f"{algo}: ok={row['ok']} quantize_s={row.get('quantize_s', 0):.1f} "
            f"peak_gib={row.get('peak_gpu_alloc_gib', 0):.2f} error={row.get('error', '')[:300]}",
            flush=True,
        )
    if not a.no_quality and any(r["ok"] for r in res["rows"].values()):
        try:
            batches = batches or eval_batches(hf, device)
            res["rtn_vs_fp"] = quality(hf, None, device, batches)
        except Exception as exc:  # noqa: BLE001
            res["rtn_vs_fp_error"] = error_text(exc)
    save()
    summary = {
        k: {f: v.get(f) for f in ("ok", "quantize_s", "peak_gpu_alloc_gib", "checkpoint_mb", "archive", "error")}
        for k, v in res["rows"].items()
    }
    print(json.dumps({"device": res["device_name"], "versions": res["versions"], "rows": summary}, indent=1))
    print(f"results: {path} ({time.perf_counter() - t_start:.1f} s)")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# phase 2: here, on CPU


def find_results(folder: Path) -> Path:
    for p in [folder / RESULTS, *sorted(folder.rglob(RESULTS))]:
        if p.is_file() and json.loads(p.read_text()).get("bench") == "gpu_quantize":
            return p
    raise SystemExit(f"no {RESULTS} of bench/gpu_quantize.py under {folder}")


def unpack(src: Path, names: list[str], dest: Path, algo: str) -> Path:
    archive = dest / f"{algo}.tgz"
    with archive.open("wb") as f:
        for name in names:
            f.write((src / name).read_bytes())
    shutil.rmtree(dest / algo, ignore_errors=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest / algo


def export_one(algo: str, ckpt: Path, work: Path) -> dict[str, Any]:
    """orch's ModelBuilder pass (int4, CPU) on the checkpoint, as a workflow's second pass would get it."""
    import numpy as np

    from orchestrator.core.job import Job, JobTracking, ModelArtifact
    from orchestrator.passes.base import PassError
    from orchestrator.passes.common import onnx_tools
    from orchestrator.passes.common.gptq_layout import load_dequantized
    from orchestrator.runner import run_job

    row: dict[str, Any] = {"export_ok": False}
    # check_parity off: its reference is transformers loading the checkpoint, which needs a GPTQ kernel package
    # (gptqmodel); the logits are compared below with the dequantized checkpoint instead.
    config = {"precision": "int4", "check_parity": False}
    job = Job(
        job_id=f"export-{algo}",
        pass_name="export",
        pass_type="ModelBuilder",
        pass_config=config,
        model=ModelArtifact(format="hf", path=str(ckpt), quantized=True),
        output_dir=str(work / f"onnx_{algo}"),
        tracking=JobTracking(mode="events", metric_prefix="export/"),
    )
    row["export_config"] = config
    shutil.rmtree(job.output_dir, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        result = run_job(job)
    except PassError as exc:
        row["export_error"] = f"PassError: {exc}"
        return row
    except Exception as exc:  # noqa: BLE001
        row["export_error"] = error_text(exc)
        row["traceback"] = traceback.format_exc()[-4000:]
        return row
    row["export_s"] = time.perf_counter() - t0
    row["export_ok"] = True
    row["export_metrics"] = dict(result.metrics)
    onnx_dir = Path(job.output_dir) / (result.model.path if result.model else "model")
    row["onnx_mb"] = onnx_tools.model_size_bytes(onnx_dir) / 1e6
    nodes = onnx_tools.matmulnbits_nodes(onnx_dir)
    row["matmulnbits"] = len(nodes)
    row["matmulnbits_block_sizes"] = sorted({int(n["block_size"]) for n in nodes})
    row["matmulnbits_bits"] = sorted({int(n["bits"]) for n in nodes})
    row["matmul_left"] = onnx_tools.op_counts(onnx_dir).get("MatMul", 0)
    try:
        gen = onnx_tools.generate(onnx_dir, PROMPT, 16)
        row["generated_tokens"], row["generated_text"] = gen[1], gen[0]
        row["generation_ok"] = gen[1] > 0
    except Exception as exc:  # noqa: BLE001
        row["generation_ok"] = False
        row["generation_error"] = error_text(exc)
    try:
        text = " ".join(corpus(2, seed=3))
        ids = onnx_tools.hf_encode(ckpt, text)[:200]
        ref = onnx_tools.hf_logits(load_dequantized(ckpt), ids)
        got = onnx_tools.GenaiModel(onnx_dir).logits(ids)
        diff = np.abs(got - ref)
        row["onnx_vs_dequantized"] = {
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "ref_abs_mean": float(np.abs(ref).mean()),
            "greedy_agree": float((got.argmax(-1) == ref.argmax(-1)).mean()),
            "n_tokens": len(ids),
        }
    except Exception as exc:  # noqa: BLE001
        row["onnx_vs_dequantized_error"] = error_text(exc)
    return row


def cmd_finish(a: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    src = find_results(a.folder.resolve())
    res = json.loads(src.read_text())
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    export: dict[str, Any] = {}
    for algo, row in res.get("rows", {}).items():
        if not row.get("ok") or not row.get("archive"):
            continue
        print(f"=== export {algo} ===", flush=True)
        try:
            ckpt = unpack(src.parent, row["archive"], work, algo)
            export[algo] = export_one(algo, ckpt, work)
        except Exception as exc:  # noqa: BLE001
            export[algo] = {"export_ok": False, "export_error": error_text(exc)}
    res["finish"] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "versions": versions(("onnxruntime-genai", "onnxruntime", "onnx", "transformers", "torch")),
        "rows": export,
    }
    write_json(work / "finish.json", res)
    md = render(res)
    print(md)
    if not a.no_write:
        write_section(md, a.results_md)
        print(f"wrote the quantize section of {a.results_md}")
    return 0


def cmd_render(a: argparse.Namespace) -> int:
    md = render(json.loads(a.finish_json.read_text()))
    print(md)
    if not a.no_write:
        write_section(md, a.results_md)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# RESULTS.md


def _f(value: Any, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def render(r: dict[str, Any]) -> str:
    v = r.get("versions", {})
    fin = r.get("finish", {})
    fv = fin.get("versions", {})
    gpu = r.get("device") == "cuda"
    calib = r.get("calibration", {})
    sizes = r.get("sizes", SIZES)
    lines = []
    if not gpu:
        lines += [
            "**CPU run of the harness, not a GPU measurement** (`run --device cpu`, AWQ with ORCH_AWQ_CPU=1).",
            "",
        ]
    lines += [
        f"Run {r.get('date', '?')} on {r.get('device_name', '?')}"
        + (f" (CUDA {r.get('torch_cuda')}, {r.get('gpu_memory_gib', 0):.0f} GiB)" if gpu else "")
        + f"; quantize side: Python {v.get('python')}, torch {v.get('torch')}, transformers {v.get('transformers')}, "
        f"llmcompressor {v.get('llmcompressor')}, compressed-tensors {v.get('compressed-tensors')}, accelerate "
        f"{v.get('accelerate')}, datasets {v.get('datasets')}. Export side (CPU, {fin.get('date', '?')}): "
        f"onnxruntime-genai {fv.get('onnxruntime-genai')}, onnxruntime {fv.get('onnxruntime')}, transformers "
        f"{fv.get('transformers')}.",
        f"Model: Phi-3 architecture, {r.get('n_params', 0) / 1e6:.1f} M parameters (hidden {sizes['hidden_size']}, "
        f"{sizes['num_layers']} layers, intermediate {sizes['intermediate_size']}, vocab {sizes['vocab_size']}), "
        f"random weights (seed 0), {r.get('model_mb_fp32', 0):.0f} MB in fp32. Calibration: {calib.get('samples')} "
        f"generated texts ({calib.get('min_tokens')}-{calib.get('max_tokens')} tokens, {calib.get('tokens')} in all) "
        "through the pass's own data_config: each algorithm runs the workflow of `orch quantize --algorithm ALGO "
        "--precision int4 --data_name json --data_files calib.jsonl` (pass defaults: groups of 128, GPTQ "
        "symmetric, AWQ with zero points) as a Job through `orchestrator.runner.run_job`.",
        "",
        *harness.table(
            ["algorithm", "device", "params", "calib. samples", "quantize s", "peak GPU mem GiB (alloc / reserved)",
             "checkpoint MB", "ModelBuilder int4 export", "MatMulNBits (block)", "generation",
             "ONNX vs dequantized checkpoint logits (max / mean abs diff, greedy agree)",
             "int4 vs fp model logits (rel. L2 error, greedy agree)"],
            "llrrrrrlrlll",
        ),  # fmt: skip
    ]
    notes = []
    for algo, row in r.get("rows", {}).items():
        ex = fin.get("rows", {}).get(algo, {})
        device = r.get("device_name", "?") if gpu else "cpu"
        head = [algo.upper(), device, f"{r.get('n_params', 0) / 1e6:.1f} M", calib.get("samples")]
        if not row.get("ok"):
            err = (row.get("error") or "?").replace("|", "/").splitlines()[0][:300]
            lines.append(harness.row(*head, f"failed ({_f(row.get('quantize_s'), '.1f')} s)", *["-"] * 7))
            notes.append(f"- {algo.upper()} failed: {err}")
            continue
        mem = (
            f"{row['peak_gpu_alloc_gib']:.2f} / {row['peak_gpu_reserved_gib']:.2f}"
            if "peak_gpu_alloc_gib" in row
            else "- (CPU)"
        )
        if ex.get("export_ok"):
            export = f"ok ({ex['export_s']:.0f} s, {ex['onnx_mb']:.0f} MB)"
            mnb = f"{ex['matmulnbits']} ({', '.join(map(str, ex['matmulnbits_block_sizes']))})"
            gen = f"ok, {ex.get('generated_tokens')} tokens" if ex.get("generation_ok") else "FAILED"
            par = ex.get("onnx_vs_dequantized")
            par_s = (
                f"{par['max_abs_diff']:.3g} / {par['mean_abs_diff']:.3g} ({par['greedy_agree']:.0%})" if par else "-"
            )
        else:
            export = "FAILED" if ex else "not run"
            mnb = gen = par_s = "-"
            if ex.get("export_error"):
                notes.append(f"- {algo.upper()} export failed: {ex['export_error'].splitlines()[0][:300]}")
        for key in ("pack_error", "int4_vs_fp_error"):
            if row.get(key):
                notes.append(f"- {algo.upper()} {key.replace('_', ' ')}: {row[key].splitlines()[0][:300]}")
        q = row.get("int4_vs_fp")
        q_s = f"{q['rel_l2']:.3f} ({q['greedy_agree']:.0%})" if q else "-"
        ckpt = _f(row.get("checkpoint_mb"), ".1f")
        lines.append(harness.row(*head, f"{row['quantize_s']:.1f}", mem, ckpt, export, mnb, gen, par_s, q_s))
    lines.append("")
    rtn = r.get("rtn_vs_fp")
    if rtn:
        lines.append(
            "int4 vs fp reference: plain round-to-nearest int4 of the same layers (groups of 128, fp16 scales) gives "
            f"rel. L2 error {rtn['rtn_sym']['rel_l2']:.3f} ({rtn['rtn_sym']['greedy_agree']:.0%} greedy agree) "
            f"symmetric and {rtn['rtn_asym']['rel_l2']:.3f} ({rtn['rtn_asym']['greedy_agree']:.0%}) with zero points "
            f"(logits on {rtn['rtn_sym']['n_tokens']:.0f} held-out tokens). With random weights the activations have "
            "little structure (no outlier channels) for AWQ/GPTQ to exploit, and the next-token distributions are "
            "nearly flat (greedy agreement is a harsh measure): these columns check that the int4 model is sane, "
            "they do not rank the algorithms."
        )
    lines += [
        "- quantize s: wall time of run_job: the pass loads the checkpoint onto the device, tokenizes the "
        "calibration data, runs llm-compressor's oneshot, packs the GPTQ layout and writes it (imports and CUDA "
        f"start-up excluded: imports took {r.get('setup', {}).get('import_s', 0):.1f} s). Peak memory: "
        "torch.cuda.max_memory_allocated / max_memory_reserved, reset before each algorithm (one process).",
        "- Export: orch's ModelBuilder pass, int4, CPU, check_parity off (its reference would be transformers loading "
        "the GPTQ checkpoint, which needs a GPTQ kernel package); the builder keeps the checkpoint's int4 codes "
        "(MatMulNBits block = group size 128) and RTN-quantizes the LM head, which AWQ/GPTQ leave in fp16 (the "
        "MatMulNBits of block 32), and runs with accuracy_level 4 (int8 activations): both show in the ONNX vs "
        "dequantized logits.",
        *notes,
    ]
    return "\n".join(lines)


def write_section(md: str, path: Path) -> None:
    harness.write_section(path, SECTION, f"## AWQ / GPTQ int4 quantization (bench/gpu_quantize.py)\n\n{md}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="phase 1, on the GPU machine: build, quantize, pack")
    r.add_argument("--out", type=Path, required=True, help="what comes back (results.json, ALGO.tgz[.NN])")
    r.add_argument("--work", type=Path, default=Path("/tmp/orch_gpu_quant"))
    r.add_argument("--algorithms", default=",".join(ALGORITHMS))
    r.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: hide the GPU (smoke test)")
    r.add_argument("--samples", type=int, default=32, help="calibration texts")
    r.add_argument("--algo-timeout-s", type=float, default=30.0, help="per algorithm; 0: no limit")
    r.add_argument("--no-quality", action="store_true", help="skip the int4 vs fp logits comparison")
    f = sub.add_parser("finish", help="phase 2, here: export with ModelBuilder, check, write RESULTS.md")
    f.add_argument("folder", type=Path, help="the folder that came back (holds results.json)")
    f.add_argument("--work", type=Path, default=Path("/tmp/orch_gpu_quant_finish"))
    f.add_argument("--results-md", type=Path, default=BENCH / "RESULTS.md")
    f.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    g = sub.add_parser("render", help="rewrite the section from a finish.json")
    g.add_argument("finish_json", type=Path)
    g.add_argument("--results-md", type=Path, default=BENCH / "RESULTS.md")
    g.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    return {"run": cmd_run, "finish": cmd_finish, "render": cmd_render}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
