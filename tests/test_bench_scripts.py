"""The bench scripts tests/test_bench.py does not run, run tiny on CPU as a user runs them (a subprocess of the
script), their tables and JSON checked; none of them rewrites the committed bench/RESULTS.md (--no-write).

- bench/docker_overhead.py: the same ModelBuilder job on LocalSystem and DockerSystem (the real engine, the cached
  cpu-export image), --runs 1, and the uv vs pip image builds from scratch of a one-package conda.yaml; a bad
  --build-env is refused before any job runs.
- bench/quality.py: every CPU variant (transformers fp32, ModelBuilder fp32 / int4, RTN) of a tiny Phi-3 given as
  --model, scored on 4 held-out demo rows, plus the main run's export and scoring of a GPTQ checkpoint left by the
  side phase (WORK/gptq.json). The side phase itself needs llm-compressor, which this venv lacks (it needs
  transformers 5.15-5.17): its one-line refusal.
- bench/gpu_quantize.py: `run` refuses in one line without CUDA, and without llm-compressor on `--device cpu`;
  `finish` exports, generates with and compares the GPTQ-layout checkpoints of the shape `run` returns (archives +
  results.json). The checkpoints are written by the pass's own writer (write_gptq_checkpoint) from int4 params set
  the way llm-compressor leaves them (tests/test_awq_gptq.py's restatement of its math): llm-compressor's AWQ/GPTQ
  search itself cannot run in this venv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import gpu_quantize  # noqa: E402
import quality  # noqa: E402
from test_awq_gptq import attach_qparams  # noqa: E402

GS = 32  # the tiny Phi-3's widths (128, 352) are multiples of 32, not of the passes' default 128


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def _script(name: str, *args: object, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(BENCH / name), *map(str, args)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer tiny Phi-3 whose tokenizer knows the demo's tone texts."""
    from orchestrator.passes.models.tiny_model import build_tiny_phi3

    rows = [json.loads(line) for line in quality.demo_rows().read_text().splitlines()]
    texts = [f"### Text: {r['phrase']}\n### The tone is:\n{r['tone']}" for r in rows]
    return build_tiny_phi3(tmp_path_factory.mktemp("tiny") / "model", texts=texts, num_layers=1, seed=3)


def gptq_checkpoint(model_dir: Path, dest: Path, *, symmetric: bool) -> Path:
    """A checkpoint as orch's GPTQ (symmetric) / AWQ (zero points) pass writes it: every decoder Linear's int4
    params as llm-compressor leaves them, packed by the pass's writer; the LM head stays fp16."""
    import torch
    import transformers

    from orchestrator.passes.common.gptq_layout import write_gptq_checkpoint
    from orchestrator.passes.quantization.awq_gptq import collect_quant_params

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            attach_qparams(module, symmetric=symmetric)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    write_gptq_checkpoint(model, collect_quant_params(model), dest, group_size=GS, sym=symmetric, tokenizer=tok)
    return dest


def _no_traceback_one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    return line


# ---------------------------------------------------------------------------------------------------------------
# bench/docker_overhead.py

TINY_ENV = """name: bench-tiny
dependencies:
  - python=3.11
  - pip
  - pip:
      - filelock==4.2.12
"""


@pytest.mark.docker
def test_docker_overhead_runs_the_job_on_both_systems_and_builds_with_both_installers(tmp_path: Path) -> None:
    """--runs 1: the ModelBuilder int4 job on LocalSystem and in a container; both installers build the tiny env
    from scratch (a one-package conda.yaml without orch's deps: only the installers are compared), the images are
    removed again; the section and the JSON written to --out, bench/RESULTS.md untouched."""
    from orchestrator.systems.docker.images import docker_client

    before = (BENCH / "RESULTS.md").read_text()
    env_file = tmp_path / "tiny.conda.yaml"
    env_file.write_text(TINY_ENV)
    out = tmp_path / "out"
    proc = _script("docker_overhead.py", "--runs", 1, "--build-env", env_file, "--out", out, "--no-write")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((out / "docker_overhead.json").read_text())
    assert set(res["runs"]) == {"local", "docker"} and all(len(v) == 1 and v[0] > 0 for v in res["runs"].values())
    builds = res["builds"]
    assert list(builds) == ["uv", "pip"]
    for installer, b in builds.items():
        assert b["installer"] == installer and b["built"] is True and b["seconds"] > 0 and b["image_mb"] > 50
        assert b["tag"].startswith(f"orch/bench:{installer}-")
    client = docker_client()
    assert not [t for img in client.images.list(name="orch/bench") for t in img.tags if t in {
        b["tag"] for b in builds.values()
    }]  # fmt: skip
    md = (out / "RESULTS_docker.md").read_text()
    assert md in proc.stdout and md.startswith("## Docker overhead (bench/docker_overhead.py)")
    assert "median of 1 runs" in md and f"Image build of `{env_file}`" in md
    local, docker = res["runs"]["local"][0], res["runs"]["docker"][0]
    assert f"| LocalSystem job (median) | {local:.2f} |" in md
    assert f"| DockerSystem job, cached image (median) | {docker:.2f} |" in md
    assert f"| Docker overhead per job | {docker - local:+.2f} |" in md
    for installer, b in builds.items():
        assert f"| {installer} | {b['seconds']:.1f} | {b['image_mb']:.0f} |" in md
    assert (BENCH / "RESULTS.md").read_text() == before


def test_docker_overhead_refuses_a_bad_build_env_before_running_anything(tmp_path: Path) -> None:
    bad = tmp_path / "bad.conda.yaml"
    bad.write_text("name: x\ndependencies: [python=3.11\n")
    proc = _script("docker_overhead.py", "--build-env", bad, "--out", tmp_path / "out", "--no-write", timeout=120)
    assert proc.returncode == 2
    line = _no_traceback_one_line(proc)
    assert line.startswith(f"docker_overhead: error: --build-env: {bad}") and "not valid YAML" in line
    assert not (tmp_path / "out").exists()
    proc = _script("docker_overhead.py", "--build-env", "no-such-family", "--no-write", timeout=120)
    assert proc.returncode == 2 and "no-such-family: no such environment file or family" in proc.stderr
    proc = _script("docker_overhead.py", "--runs", 0, "--no-write", timeout=120)
    assert proc.returncode == 2 and "--runs: at least 1" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# bench/quality.py


def test_quality_scores_every_cpu_variant_and_a_side_checkpoint(tiny_phi3: Path, tmp_path: Path) -> None:
    """The tiny Phi-3 as --model on 4 held-out rows, 1 decode run of 4 tokens: transformers fp32, ModelBuilder fp32
    (parity with transformers), ModelBuilder int4, RTN; and a GPTQ checkpoint that the side phase's record
    (WORK/gptq.json) names, exported and scored by the main run."""
    before = (BENCH / "RESULTS.md").read_text()
    work = tmp_path / "work"
    side_out = work / "job_gptq"
    gptq_checkpoint(tiny_phi3, side_out / "model", symmetric=True)
    work.mkdir(exist_ok=True)
    record = {"quantize_s": 12.0, "out": str(side_out), "model": {"format": "hf", "path": "model", "quantized": True}}
    (work / "gptq.json").write_text(json.dumps(record))
    args = ["--model", tiny_phi3, "--work", work, "--no-write", "--max-samples", 4]
    proc = _script("quality.py", *args, "--decode-runs", 1, "--decode-tokens", 4)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((work / "results.json").read_text())
    assert res["merged"] == str(tiny_phi3) and res["demo_model"] is False
    assert res["settings"] == {"max_samples": 4, "decode_runs": 1, "decode_tokens": 4}
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == [
        "transformers fp32 (merged checkpoint)", "ModelBuilder fp32", "ModelBuilder int4",
        "RTN int4 (OnnxMatMul4Quantizer)", "GPTQ int4 (orch gptq pass)",
    ]  # fmt: skip
    for name, r in rows.items():
        assert r["n"] == 4 and 1 < r["perplexity"] < 1e5 and 0 <= r["accuracy"] <= 1, (name, r)
        assert r["size_mb"] > 0 and (r["tokens_per_s"] is None) == name.startswith("transformers"), (name, r)
    ref, fp32 = rows["transformers fp32 (merged checkpoint)"], rows["ModelBuilder fp32"]
    assert fp32["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-3)  # the same model, exported
    assert rows["ModelBuilder int4"]["size_mb"] < fp32["size_mb"]
    assert "llm-compressor 12 s" in rows["GPTQ int4 (orch gptq pass)"]["how"]
    assert (work / "onnx_gptq").is_dir() and (work / "eval_gptq").is_dir()
    # the section printed: the rows with their numbers, the missing AWQ named, no demo-specific notes
    assert "## int4 quality on real weights (bench/quality.py)" in proc.stdout
    assert f"Model: the checkpoint `{tiny_phi3}` (--model)" in proc.stdout
    assert "on the same 4 held-out rows" in proc.stdout
    assert "(1 runs of 4 tokens after a 32-token prompt)" in proc.stdout
    for name, r in rows.items():
        assert f"| {name} | {r['perplexity']:.3f} | {r['accuracy']:.3f} |" in proc.stdout
    assert "| AWQ int4 | not run |" in proc.stdout and "GGUF" not in proc.stdout.split("## int4 quality")[1]
    # the section renders again from results.json alone
    again = _script("quality.py", "--render", work / "results.json", "--no-write", timeout=120)
    assert again.returncode == 0 and again.stdout.strip() == quality.render(res).strip()
    assert again.stdout.strip() in proc.stdout
    assert (BENCH / "RESULTS.md").read_text() == before


def test_quality_side_phase_and_model_refusals(tmp_path: Path) -> None:
    import importlib.util

    assert importlib.util.find_spec("llmcompressor") is None  # else the side phase would run here: test it then
    proc = _script("quality.py", "side", "gptq", tmp_path / "w", timeout=120)
    assert proc.returncode == 2
    why = f"quality.py side: {quality.SIDE_NEEDS}; this environment has no llmcompressor"
    assert _no_traceback_one_line(proc) == why
    assert not (tmp_path / "w").exists()
    proc = _script("quality.py", "side", "rtn", timeout=120)
    assert proc.returncode == 2 and "argument algo: invalid choice: 'rtn'" in proc.stderr
    proc = _script("quality.py", "--model", tmp_path, "--work", tmp_path / "w", "--no-write", timeout=120)
    assert proc.returncode == 2 and f"--model: {tmp_path} is not a Hugging Face checkpoint folder" in proc.stderr
    proc = _script("quality.py", "--max-samples", 0, "--no-write", timeout=120)
    assert proc.returncode == 2 and "--max-samples: at least 1, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------------------------------------------
# bench/gpu_quantize.py


def test_gpu_quantize_run_refuses_in_one_line(tmp_path: Path) -> None:
    """No CUDA here: `run` says so (before building or writing anything); `--device cpu` goes past that and
    then needs llm-compressor, which this venv lacks."""
    proc = _script("gpu_quantize.py", "run", "--out", tmp_path / "out", "--work", tmp_path / "work", timeout=300)
    assert proc.returncode == 2 and _no_traceback_one_line(proc) == gpu_quantize.NO_CUDA
    cpu = ["--device", "cpu", "--out", tmp_path / "out", "--work", tmp_path / "work"]
    proc = _script("gpu_quantize.py", "run", *cpu, timeout=300)
    assert proc.returncode == 2 and _no_traceback_one_line(proc) == gpu_quantize.NO_LLMCOMPRESSOR
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_gpu_quantize_archives_split_and_join(tiny_phi3: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """pack (GPU side) -> unpack (here) of a checkpoint larger than one part: the files that come back."""
    monkeypatch.setattr(gpu_quantize, "PART_BYTES", 100_000)
    (tmp_path / "out").mkdir()
    names = gpu_quantize.pack(tiny_phi3, tmp_path / "out", "gptq")
    assert len(names) > 2 and names[0] == "gptq.tgz.00" and not (tmp_path / "out" / "gptq.tgz").exists()
    (tmp_path / "work").mkdir()
    back = gpu_quantize.unpack(tmp_path / "out", names, tmp_path / "work", "gptq")
    assert sorted(p.name for p in back.iterdir()) == sorted(p.name for p in tiny_phi3.iterdir())
    assert (back / "model.safetensors").read_bytes() == (tiny_phi3 / "model.safetensors").read_bytes()


def test_gpu_quantize_finish_exports_and_checks_the_returned_checkpoints(tiny_phi3: Path, tmp_path: Path) -> None:
    """`finish --no-write` on what `run` returns (results.json + one archive per algorithm; a GPTQ (symmetric) and
    an AWQ (zero points) checkpoint of the tiny Phi-3, and a failed row): ModelBuilder int4 on each, MatMulNBits
    counted, onnxruntime-genai generating, ONNX vs dequantized logits; the section printed with those numbers."""
    back = tmp_path / "quant"  # what the device tool brings back
    back.mkdir()
    rows = {}
    for algo, symmetric in (("gptq", True), ("awq", False)):
        ckpt = gptq_checkpoint(tiny_phi3, tmp_path / f"job_{algo}" / "model", symmetric=symmetric)
        rows[algo] = {"algorithm": algo, "ok": True, "quantize_s": 3.5, "peak_gpu_alloc_gib": 0.25,
                      "peak_gpu_reserved_gib": 0.5, "checkpoint_mb": gpu_quantize.folder_bytes(ckpt) / 1e6,
                      "checkpoint_path": str(ckpt), "archive": gpu_quantize.pack(ckpt, back, algo),
                      "int4_vs_fp": {"rel_l2": 0.125, "greedy_agree": 0.75}}  # fmt: skip
    rows["awq_bad"] = {"algorithm": "awq", "ok": False, "quantize_s": 30.0, "error": "TimeoutError: stopped"}
    sizes = {"vocab_size": 1000, "hidden_size": 128, "intermediate_size": 352, "num_layers": 1}
    results = {"bench": "gpu_quantize", "date": "2026-12-06 12:00:00", "device": "cuda", "device_name": "NVIDIA H100",
               "torch_cuda": "13.0", "gpu_memory_gib": 79.2, "versions": gpu_quantize.versions(), "sizes": sizes,
               "n_params": 1.3e6, "model_mb_fp32": 5.2, "setup": {"import_s": 4.0},
               "calibration": {"samples": 8, "tokens": 900, "min_tokens": 60, "max_tokens": 160}, "rows": rows,
               "rtn_vs_fp": {k: {"rel_l2": 0.2, "greedy_agree": 0.5, "n_tokens": 80.0}
                             for k in ("rtn_sym", "rtn_asym")}}  # fmt: skip
    (back / "results.json").write_text(json.dumps(results))
    before = (BENCH / "RESULTS.md").read_text()
    work = tmp_path / "finish"
    proc = _script("gpu_quantize.py", "finish", back, "--work", work, "--no-write")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fin = json.loads((work / "finish.json").read_text())["finish"]
    assert set(fin["rows"]) == {"gptq", "awq"}  # the failed row has nothing to export
    for ex in fin["rows"].values():
        assert ex["export_ok"], ex
        # 1 layer: 5 from the checkpoint's codes (block 32; the builder splits gate_up) + the LM head it rounds
        assert ex["matmulnbits"] == 6 and ex["matmulnbits_block_sizes"] == [GS] and ex["matmul_left"] == 0, ex
        assert ex["generation_ok"] and ex["generated_tokens"] > 0
        par = ex["onnx_vs_dequantized"]
        assert par["n_tokens"] > 10 and par["greedy_agree"] >= 0.5 and par["max_abs_diff"] < 1.0, par
    section = proc.stdout[proc.stdout.index("Run 2026-12-06 12:00:00") :]
    assert "(hidden 128, 1 layers, intermediate 352, vocab 1000)" in section
    for algo, ex in fin["rows"].items():
        par = ex["onnx_vs_dequantized"]
        gen = ex["generated_tokens"]
        export = f"| ok ({ex['export_s']:.0f} s, {ex['onnx_mb']:.0f} MB) | 6 (32) | ok, {gen} tokens |"
        parity = f"{par['max_abs_diff']:.3g} / {par['mean_abs_diff']:.3g} ({par['greedy_agree']:.0%}) | 0.125 (75%) |"
        assert f"| {algo.upper()} | NVIDIA H100 | 1.3 M | 8 | 3.5 | 0.25 / 0.50 |" in section
        assert export in section and parity in section
    assert "| AWQ_BAD | NVIDIA H100 | 1.3 M | 8 | failed (30.0 s) |" in section
    assert "- AWQ_BAD failed: TimeoutError: stopped" in section and "rel. L2 error 0.200" in section
    # rendered again from finish.json: the same section
    again = _script("gpu_quantize.py", "render", work / "finish.json", "--no-write", timeout=120)
    assert again.returncode == 0 and again.stdout.strip() == section.strip()
    assert (BENCH / "RESULTS.md").read_text() == before
