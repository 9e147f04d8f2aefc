"""bench/ runs, tiny, on CPU: code that no test runs rots (the GPU benchmark's orch rows once failed for weeks).

- bench/gpu_finetune.py: every row's code path for 2 steps on a tiny Phi-3 through the real orchestration (one
  process per row): the transformers+peft baseline, orch's LoRA pass at dropout 0.05 and 0, orch QLoRA's and
  Unsloth's one-line refusals without CUDA; its row specs; the RESULTS.md section is the rendering of the committed
  per-row JSON files; the targets it checks.
- bench/baseline_peft.py and bench/unsloth_runner.py as command lines (the Unsloth runner: its arguments, built
  against the installed TRL, and its refusal; unsloth itself needs a GPU).
- bench/gpu_wheels.py: the repacked wheels install and keep a true RECORD.
- bench/harness.py (every benchmark's rows, JSON and RESULTS.md): one section rewritten, the rest kept; a row in its
  own process, its time limit and its log; every bench script uses it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import gpu_finetune  # noqa: E402
import gpu_wheels  # noqa: E402
import harness  # noqa: E402
import unsloth_runner  # noqa: E402

TINY = {"max_len": 128, "batch_size": 2}
ROWS = "baseline:fixed,orch:fixed,orch:fixed:dropout=0,qlora:fixed,unsloth:fixed,unsloth_qlora:fixed"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), BENCH_SETTINGS=json.dumps(TINY), TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of the benchmark on the tiny shape: model + data prepared, every row in its own process."""
    root = tmp_path_factory.mktemp("bench")
    out = root / "out"
    cmd = [sys.executable, str(BENCH / "gpu_finetune.py"), "--shape", "tiny", "--work", str(root / "ob_tiny")]
    cmd += ["--out", str(out), "--steps", "2", "--warmup", "0", "--rows", ROWS, "--row-timeout-s", "600"]
    subprocess.run(cmd, env=_env(), check=True, timeout=1500, capture_output=True)
    return out


def _rows(out: Path) -> dict[str, dict]:
    run = json.loads((out / "run.json").read_text())
    return {r["row"]: r for r in (json.loads((out / name).read_text()) for name in run["row_files"])}


def test_every_row_runs_tiny_on_cpu(tiny_run: Path) -> None:
    from orchestrator.passes.training.lora.train import QLORA_NO_CUDA

    rows = _rows(tiny_run)
    assert list(rows) == ROWS.split(",")
    base, orch, orch0 = rows["baseline:fixed"], rows["orch:fixed"], rows["orch:fixed:dropout=0"]
    for r in (base, orch, orch0):
        assert r["ok"] and r["device"] == "cpu" and r["steps"] == 2
        assert r["step_tokens"] == [2 * 128, 2 * 128]  # fixed data: every sample exactly max_len tokens
        assert set(r["losses"]) == {"1", "2"} and r["tokens_per_s_median"] > 0
    # the same samples in the same order and the same model: at step 1 (lora_B = 0) the losses agree
    assert orch["losses"]["1"] == pytest.approx(base["losses"]["1"], rel=1e-5)
    assert orch0["losses"]["1"] == pytest.approx(base["losses"]["1"], rel=1e-5)
    assert (orch["lora_dropout"], orch0["lora_dropout"], base["lora_dropout"]) == (0.05, 0.0, 0.05)
    # the row's setting reached the pass: the last orch row (dropout 0) wrote this adapter
    adapter = json.loads((tiny_run / "lora_out" / "adapter" / "adapter_config.json").read_text())
    assert adapter["lora_dropout"] == 0.0 and adapter["r"] == 64
    assert any("64 train / 0 eval sequences of <= 128 tokens" in line for line in orch["pass_log"])
    # machines without CUDA: one line each, the row marked failed, the run goes on
    assert not rows["qlora:fixed"]["ok"] and rows["qlora:fixed"]["error"] == f"rc=2 qlora: {QLORA_NO_CUDA}"
    why = unsloth_runner.refusal(cuda=False, installed=False)
    for name in ("unsloth:fixed", "unsloth_qlora:fixed"):
        assert not rows[name]["ok"] and rows[name]["error"] == f"rc=2 {why}"
    md = (tiny_run / "RESULTS_gpu.md").read_text()
    assert "| orch LoRA | 0.05 |" in md and "| orch LoRA | 0 |" in md and "| unsloth:fixed | | failed: rc=2" in md


def test_profiled_row_writes_gpu_and_host_profiles(tiny_run: Path, tmp_path: Path) -> None:
    """--profile on a row: the torch profiler's table for its last two steps and cProfile's for two earlier ones;
    those steps and the one between them left out of the median (6 steps: step 1 is the only one measured)."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(BENCH / "gpu_finetune.py"), "--shape", "tiny"]
    cmd += ["--work", str(tiny_run.parent / "ob_tiny"), "--out", str(out), "--steps", "6", "--warmup", "0"]
    cmd += ["--rows", "orch:fixed:dropout=0"]
    cmd += ["--profile", "orch:fixed:dropout=0", "--row-timeout-s", "600"]
    subprocess.run(cmd, env=_env(), check=True, timeout=900, capture_output=True)
    row = _rows(out)["orch:fixed:dropout=0"]
    assert row["ok"] and row["steps"] == 6 and row["profiled_steps"] == [2, 3, 4, 5, 6]
    assert row["tokens_per_s_median"] == pytest.approx(row["step_tokens"][0] / row["step_times"][0])
    assert (out / "profile_0" / "profile.txt").read_text().startswith("GPU kernel time per step")
    host = (out / "profile_0" / "host_profile.txt").read_text()
    assert host.startswith("host Python time per step under cProfile") and "training_step" in host


def test_profiled_window_covers_the_steps_a_profile_perturbs() -> None:
    """cProfile on steps 16-17 and torch.profiler on 19-20 of 20: 16-20 leave the median (step 18 starts on a GPU
    whose queue drained while the profiled host fell behind); a window ending before the last step takes the next."""
    import baseline_peft

    assert baseline_peft.profiled_window([{"first": 19, "last": 20}, {"first": 16, "last": 17}], 20) == {
        16, 17, 18, 19, 20
    }  # fmt: skip
    assert baseline_peft.profiled_window([{"first": 3, "last": 4}], 10) == {3, 4, 5}
    assert baseline_peft.profiled_window([], 10) == set()


def test_kernel_categories_of_an_h100_profile() -> None:
    """Kernel names from an H100 profile of an orch row land in the category that does the work: Liger's add +
    RMSNorm kernels are not the LM head's loss, PyTorch's reduce / elementwise kernels are not Triton's."""
    import baseline_peft

    expected = {
        "_fused_add_rms_norm_backward_kernel": "Liger / orch Triton",
        "_rms_norm_forward_kernel": "Liger / orch Triton",
        "swiglu_bwd_kernel": "Liger / orch Triton",
        "qkv_rope_fwd_kernel": "Liger / orch Triton",
        "liger_cross_entropy_kernel": "LM head loss (Triton)",
        "element_mul_kernel": "LM head loss (Triton)",
        "nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_NNT": "GEMM (cuBLAS / CUTLASS)",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>": "GEMM (cuBLAS / CUTLASS)",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26": "attention (flash / cudnn)",
        "void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*)": "attention (flash / cudnn)",
        "void at::native::reduce_kernel<128, 4, at::native::ReduceOp<c10::BFloat16>>": "reductions",
        "void at::native::lpnorm_cleanup<float, (at::native::NormType)1, float, true>": "reductions",
        "void at::native::vectorized_elementwise_kernel<8, at::native::bfloat16_copy_kernel_cuda>": "copies / casts",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "elementwise",
        "Memset (Device)": "elementwise",
        "Memcpy DtoD (Device -> Device)": "copies / casts",
        "void at::native::(anonymous namespace)::fused_dropout_kernel_vec<c10::BFloat16>": "dropout (PyTorch)",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>>": (
            "optimizer"
        ),
    }
    assert {name: baseline_peft.kernel_category(name) for name in expected} == expected


def test_baseline_runner_command_line(tiny_run: Path, tmp_path: Path) -> None:
    work = tiny_run.parent / "ob_tiny"
    out = tmp_path / "baseline.json"
    cmd = [sys.executable, str(BENCH / "baseline_peft.py"), "--model", str(work / "model")]
    cmd += ["--data", str(work / "data_var.jsonl"), "--steps", "2", "--warmup", "1", "--json", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, check=True)
    r = json.loads(out.read_text())
    assert r["system"] == "transformers+peft (baseline)" and len(r["step_times"]) == 2
    assert all(0 < n <= 2 * 128 for n in r["step_tokens"])  # var data: real tokens of padded batches
    assert json.loads(proc.stdout.strip().splitlines()[-1])["steps"] == 2


def test_row_specs() -> None:
    spec = gpu_finetune.parse_row("orch:fixed:dropout=0/-flce/+compile")
    assert spec["system"] == "orch" and spec["data"] == "fixed"
    assert spec["settings"] == {"lora_dropout": 0} and spec["fastpath"] == "-flce,+compile"
    assert spec["slug"] == "orch_fixed_dropout_0_-flce__compile"  # file names the device tool returns: no "+"
    assert gpu_finetune.parse_row("unsloth_qlora:var")["settings"] == {}
    for bad, match in (
        ("orc:fixed", "unknown system 'orc'"),
        ("orch:fixd", "data must be var or fixed"),
        ("orch:fixed/-k_concat", r"options go after a second colon: orch:fixed:-k_concat"),  # run 12's typo
        ("orch:fixed:dropuot=0", "unknown setting 'dropuot'"),
        ("orch:fixed:flce", "neither"),
        ("orch:fixed:+philox_dropuot", "unknown option 'philox_dropuot'"),  # the pass would refuse it on the GPU
    ):
        with pytest.raises(ValueError, match=match):
            gpu_finetune.parse_row(bad)
    assert all(gpu_finetune.parse_row(r) for r in gpu_finetune.DEFAULT_ROWS.split(","))


def test_every_gpu_call_in_bench_readme_parses() -> None:
    """The GPU calls bench/README.md plans are typed into the device tool as written: every `rows@SHAPE@ROWS[@PROFILE]`
    and `kernels@PARTS` phase in them must name a known shape, row specs that parse (systems, data, settings,
    fast-path options) and a profiled row among them, and known kernel parts: a typo found on a lent GPU costs
    minutes of a 30-minute budget."""
    import re

    import gpu_kernels

    text = (BENCH / "README.md").read_text()
    calls = [block for block in re.findall(r"```\n(.*?)```", text, re.S) if "gpu_call.sh" in block]
    rows_phases = [p for c in calls for p in re.findall(r"rows@[^\s\"';]+", c)]
    kernel_phases = [p for c in calls for p in re.findall(r"kernels@[^\s\"';]+", c)]
    assert len(rows_phases) >= 3 and kernel_phases  # the planned calls are there to check
    for phase in rows_phases:
        _, shape, rows, *profile = phase.split("@")
        assert shape in gpu_finetune.SHAPES, phase
        specs = rows.split("%")
        for spec in specs:
            gpu_finetune.parse_row(spec)  # raises naming the spec and what is wrong
        assert all(p in specs for p in profile), f"{phase}: the profiled row is not one of its rows"
    for phase in kernel_phases:
        parts = phase.split("@", 1)[1].split("+")
        assert set(parts) <= set(gpu_kernels.STEPS), phase


def test_unsloth_runner_builds_the_benchmark_settings(tmp_path: Path) -> None:
    from trl import SFTConfig

    settings = {**gpu_finetune.SETTINGS, "lora_dropout": 0.0}
    load = unsloth_runner.load_kwargs(tmp_path, qlora=True, settings=settings)
    assert load["model_name"] == str(tmp_path) and load["load_in_4bit"] is True and load["fix_tokenizer"] is False
    assert load["max_seq_length"] == settings["max_len"] and load["use_gradient_checkpointing"] == "unsloth"
    lora = unsloth_runner.peft_kwargs(qlora=False, settings=settings)
    assert lora["r"] == 64 and lora["lora_alpha"] == 16 and lora["lora_dropout"] == 0.0
    assert lora["target_modules"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert lora["use_gradient_checkpointing"] is False and lora["random_state"] == settings["seed"]
    # every SFTConfig argument exists in the installed TRL and keeps its value
    cfg = SFTConfig(**{**unsloth_runner.sft_kwargs(tmp_path, 20, settings), "use_cpu": True, "bf16": False})
    assert (cfg.max_steps, cfg.per_device_train_batch_size, cfg.learning_rate) == (20, 8, 2e-4)
    assert cfg.logging_steps == 10 and cfg.lr_scheduler_type == "constant"
    assert cfg.dataset_kwargs["skip_prepare_dataset"] and cfg.max_length == 1024


def test_unsloth_runner_tokenizes_as_the_baseline(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from orchestrator.passes.models.tiny_model import build_tiny_phi3

    tok = AutoTokenizer.from_pretrained(build_tiny_phi3(tmp_path / "m", num_layers=1, seed=0))
    texts = ["a short text", " ".join(["word"] * 300)]
    ids = unsloth_runner.token_ids(tok, texts, 64)
    assert ids[0][-1] == tok.eos_token_id and len(ids[1]) == 64
    assert ids[0][:-1] == tok(texts[0], add_special_tokens=True)["input_ids"]


def test_unsloth_runner_refuses_in_one_line_without_cuda(tmp_path: Path) -> None:
    cmd = [sys.executable, str(BENCH / "unsloth_runner.py"), "--model", str(tmp_path), "--data", str(tmp_path / "d")]
    proc = subprocess.run([*cmd, "--json", str(tmp_path / "o.json")], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == unsloth_runner.refusal(cuda=False, installed=False)
    assert "Traceback" not in proc.stderr and not (tmp_path / "o.json").exists()
    assert "not installed: pip install unsloth==2026.10.9" in unsloth_runner.refusal(cuda=True, installed=False)
    assert unsloth_runner.refusal(cuda=True, installed=True) is None


def test_results_md_gpu_section_is_the_rendering_of_the_committed_json() -> None:
    runs = gpu_finetune.load_runs([BENCH / "results" / "gpu_finetune"])
    assert runs and all(r["rows"] for r in runs)
    assert gpu_finetune.section_of(BENCH / "RESULTS.md") == gpu_finetune.render(runs)


def _row(system: str, tps: float, mem: float, dropout: float = 0.05, **extra: object) -> dict:
    losses = {"1": 10.0, "2": 9.5}
    return {"row": system, "system_id": system, "data": "fixed", "ok": True, "tokens_per_s_median": tps,
            "peak_mem_allocated_gib": mem, "peak_mem_reserved_gib": mem, "lora_dropout": dropout, "losses": losses,
            "step_times": [1.0, 0.5], "device": "NVIDIA H100 80GB HBM3", **extra}  # fmt: skip


def test_targets_are_checked_on_the_rows(tmp_path: Path) -> None:
    meta = {"shape": "phi3-mini", "n_params": 3.8e9, "lengths": {"fixed": [1024] * 4},
            "config": {"num_hidden_layers": 32, "hidden_size": 3072, "num_attention_heads": 32,
                       "num_key_value_heads": 32, "vocab_size": 32064}}  # fmt: skip
    rows = [
        _row("baseline", 14000, 51.0),
        _row("orch", 29000, 35.0),
        _row("unsloth", 26000, 42.0),
        _row("orch", 28000, 30.0, dropout=0.0),
        _row("unsloth", 27000, 29.0, dropout=0.0),
        _row("qlora", 15000, 5.6),
        _row("unsloth_qlora", 17000, 5.3),
    ]
    run = {"name": "r", "meta": meta, "rows": rows, "steps": 2, "warmup": 0}
    lines = gpu_finetune.target_lines(run)
    d0, d05, q = lines
    assert d05.startswith("orch LoRA, dropout 0.05: 2.07x HF+peft (met: >= 2.0x); 1.12x Unsloth (met: >= 1.05x)")
    assert "peak 35.0 vs Unsloth 42.0 GiB (met: no higher)" in d05 and "MFU 46.3% (NOT met: >= 50%)" in d05
    assert d0.startswith("orch LoRA, dropout 0: 2.00x HF+peft's row (its dropout 0.05); 1.04x Unsloth (NOT met")
    assert "peak 30.0 vs Unsloth 29.0 GiB (NOT met: no higher)" in d0
    assert q == "orch QLoRA: 0.88x Unsloth QLoRA (NOT met: >= 1.05x); peak 5.6 vs 5.3 GiB (NOT met: no more)"
    # a profiled row first and a repeat of it after: the targets read the repeat (a profile perturbs its neighbours)
    profiled = {**_row("orch", 26000, 30.0, dropout=0.0), "profiled_steps": [16, 17, 18, 19, 20]}
    repeat = _row("orch", 28500, 30.0, dropout=0.0)
    d0 = gpu_finetune.target_lines({**run, "rows": [profiled, *rows[:3], rows[4], repeat]})[0]
    assert d0.startswith("orch LoRA, dropout 0: 2.04x HF+peft's row (its dropout 0.05); 1.06x Unsloth (met")
    assert gpu_finetune.target_lines({**run, "rows": [profiled, rows[4]]})[0].startswith(
        "orch LoRA, dropout 0: 0.96x Unsloth"
    )  # only the profiled row: it is read
    # a run folder renders: the table, the targets, the notes
    folder = tmp_path / "2026-01-01-x"
    folder.mkdir()
    names = []
    for i, r in enumerate(rows):
        (folder / f"row_{i}.json").write_text(json.dumps(r))
        names.append(f"row_{i}.json")
    (folder / "run.json").write_text(json.dumps({**run, "rows": None, "row_files": names, "device": "H100"}))
    (folder / "notes.json").write_text(json.dumps(["a note"]))
    md = gpu_finetune.render(gpu_finetune.load_runs([tmp_path]))
    assert "| orch LoRA | 0.05 | 29,000 | 2.07x | 1.12x |" in md and "- a note" in md
    assert "- `2026-01-01-x`: orch QLoRA: 0.88x" in md


def test_runs_render_in_the_order_they_ran() -> None:
    names = ["2026-12-07-h100-10-phi3-mini", "2026-12-07-h100-9-phi3-mini", "2026-12-06-h100-2b-phi4-mini",
             "2026-12-07-h100-12-phi3-mini", "2026-12-06-h100-2a-phi3-mini"]  # fmt: skip
    assert sorted(names, key=gpu_finetune.run_order) == [
        "2026-12-06-h100-2a-phi3-mini", "2026-12-06-h100-2b-phi4-mini", "2026-12-07-h100-9-phi3-mini",
        "2026-12-07-h100-10-phi3-mini", "2026-12-07-h100-12-phi3-mini",
    ]  # fmt: skip


def test_results_md_writes_only_its_section(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    harness.write_section(path, "a", "first")
    harness.write_section(path, "b", "second")
    harness.write_section(path, "a", "again")
    text = path.read_text()
    assert "<!-- a:start -->\nagain\n<!-- a:end -->" in text and "<!-- b:start -->\nsecond\n<!-- b:end -->" in text
    assert "first" not in text and text.startswith("# Benchmark results")
    assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]  # the temp file was renamed into place


def test_harness_runs_a_row_in_its_own_process(tmp_path: Path) -> None:
    """A row's exit status, wall time and log; a row past its time limit is killed and reads -9; JSON and tables."""
    code = "import sys; print('measured'); sys.exit(3)"
    done = harness.run_row([sys.executable, "-c", code], tmp_path / "a.log")
    assert (done.rc, done.tail()) == (3, ["measured"]) and done.wall_s > 0
    slow = harness.run_row([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "b.log", timeout=1)
    assert slow.rc == -9
    harness.write_json(tmp_path / "row.json", {"row": "x", "path": tmp_path})
    assert harness.read_json(tmp_path / "row.json") == {"row": "x", "path": str(tmp_path)}
    assert harness.table(["a", "b"], "lr", [["1", ""]]) == ["| a | b |", "|---|---:|", "| 1 | |"]
    assert harness.section_of(BENCH / "RESULTS.md", "gpu").startswith("## GPU fine-tuning")


def test_every_bench_script_uses_the_harness() -> None:
    scripts = sorted(p.name for p in BENCH.glob("*.py") if p.name != "harness.py")
    without = [name for name in scripts if "import harness" not in (BENCH / name).read_text()]
    assert without == ["gpu_wheels.py"], without  # gpu_wheels repacks wheels: no rows, no results


def test_gpu_wheels_repack_drops_members_and_keeps_a_true_record(tmp_path: Path) -> None:
    wheel = tmp_path / "unsloth-2026.10.9-py3-none-any.whl"
    files = {
        "unsloth/__init__.py": "VERSION = 1\n",
        "studio/backend/app.py": "x = 1\n" * 100,
        "studio/frontend/index.html": "<html></html>\n",
    }
    dist = "unsloth-2026.10.9.dist-info"
    meta = {
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: unsloth\nVersion: 2026.10.9\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in [*files, *meta]) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in {**files, **meta, f"{dist}/RECORD": record}.items():
            z.writestr(name, text)
    dropped, _ = gpu_wheels.repack(wheel, gpu_wheels.DROP["unsloth"])
    assert dropped == 2
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        kept_record = z.read(f"{dist}/RECORD").decode()
    assert not any(n.startswith("studio/") for n in names) and "unsloth/__init__.py" in names
    assert "studio/" not in kept_record and "unsloth/__init__.py" in kept_record
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target), str(wheel)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    assert (target / "unsloth" / "__init__.py").exists() and not (target / "studio").exists()
    keep_cuda13 = gpu_wheels.DROP["bitsandbytes"]
    assert keep_cuda13("bitsandbytes/libbitsandbytes_cuda128.so")
    assert not keep_cuda13("bitsandbytes/libbitsandbytes_cuda130.so")
    assert not keep_cuda13("bitsandbytes/libbitsandbytes_cpu.so")


def test_gpu_call_sh_runs_rows_and_bundles_them(tiny_run: Path, tmp_path: Path) -> None:
    """The GPU machine's driver script on CPU: a rows phase (its gpu_finetune.py call on the tiny run's prepared
    model and data, and the summary it prints), then the bundle the device tool brings back."""
    import tarfile

    env = _env(
        PYTHON=sys.executable, OUT=str(tmp_path / "out"), BOUT=str(tmp_path / "bout"), WORK=str(tiny_run.parent),
        SITE=str(tmp_path / "site"), STEPS="2", WARMUP="0", BUDGET_S="600", ROW_TIMEOUT_S="600",
    )  # fmt: skip
    proc = subprocess.run(
        ["bash", str(BENCH / "gpu_call.sh"), "rows@tiny@orch:fixed:dropout=0", "bundle"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "orch:fixed:dropout=0" in proc.stdout and "tok/s" in proc.stdout and "FAILED" not in proc.stdout
    with tarfile.open(tmp_path / "out" / "bundle.tgz") as tar:
        names = tar.getnames()
    assert "./tiny/run.json" in names and "./tiny/row_0_orch_fixed_dropout_0.json" in names
    assert not any(n.endswith(".safetensors") for n in names)  # the adapter and model stay on the machine


def test_gpu_kernels_refuses_in_one_line_without_cuda(tmp_path: Path) -> None:
    cmd = [sys.executable, str(BENCH / "gpu_kernels.py"), "--out", str(tmp_path / "k")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stdout.strip() == (
        "gpu_kernels: needs a CUDA GPU (it checks and times orch's CUDA kernels); this machine has none"
    )
    assert not (tmp_path / "k").exists()


def test_gpu_kernels_fold_forms_equal_todays_lora_first_result() -> None:
    """The `fold` step's GEMM forms (merged weight, K-concatenated forward and backward) compute what the LoRA-first
    order computes: run small on CPU in fp32 (its timings need CUDA and record their error here)."""
    import gpu_kernels
    import torch

    res: dict[str, Any] = {}
    gpu_kernels.fold(res, device="cpu", tokens=32, dtype=torch.float32)
    checks = res["correctness_rel_err"]
    assert len(checks) == 12  # 3 forms x 4 projections
    assert all(v < 1e-4 for v in checks.values()), checks
    # every form was handed to the timer (without CUDA each records its error instead of a time)
    assert len(res["timings_ms"]) + len(res.get("errors", {})) == 28


def test_gpu_kernels_tune_sweeps_every_launch_shape_and_restores_the_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `tune` step runs every kernel mode at every candidate launch shape beside its baseline, picks one shape per
    kernel and leaves philox_dropout.LAUNCH as it found it (small on CPU: the torch references stand in for the
    kernels)."""
    import gpu_kernels

    from orchestrator.passes.training.lora import philox_dropout as pd

    before = dict(pd.LAUNCH)
    candidates = {k: v[:2] for k, v in gpu_kernels.tune_candidates().items()}
    res: dict[str, Any] = {"copy_gbs": 1000.0}
    gpu_kernels.tune(res, device="cpu", tokens=32, widths=(300,), candidates=candidates)
    assert before == pd.LAUNCH
    tune = res["tune"]
    assert not tune.get("errors"), tune.get("errors")
    assert set(tune["runs"]) == {f"{k} {m} 32x300" for k in ("lora_a", "wgrad", "grad") for m in ("bits", "p0")}
    for name, row in tune["runs"].items():
        shapes = [str(c) for c in candidates[name.split()[0]]]
        assert all(row[c] > 0 for c in shapes) and row["baseline_ms"] > 0 and row["default_ms"] > 0
        assert row["floor_ms"] == pytest.approx(2.125 * 32 * 300 / 1000.0 / 1e6)
    assert {k: v["launch"] in [str(c) for c in candidates[k]] for k, v in tune["picks"].items()} == {
        "lora_a": True,
        "wgrad": True,
        "grad": True,
    }
    # the picks reach the rows: gpu_finetune --launch reads them, each orch row's process applies them
    import gpu_finetune

    kernels_json = tmp_path / "kernels.json"
    kernels_json.write_text(json.dumps(res))
    picks = gpu_finetune.tuned_launch(kernels_json)
    assert picks == {k: v["fields"] for k, v in tune["picks"].items()}
    monkeypatch.setenv("BENCH_LAUNCH", json.dumps(picks))
    try:
        assert gpu_finetune.apply_launch() == picks
        assert pd.LAUNCH["lora_a"] == pd.Launch(**picks["lora_a"])
    finally:
        pd.LAUNCH.update(before)
    (tmp_path / "none.json").write_text(json.dumps({"device": "x"}))
    with pytest.raises(SystemExit, match="has no tune picks"):
        gpu_finetune.tuned_launch(tmp_path / "none.json")
    # run 8: a kernel mode that does not compile fails every shape; then no kernel gets a pick, each failure is
    # recorded, and the rows refuse to start on the file
    def does_not_compile(fn: Any) -> float:
        raise RuntimeError("CompilationError (a stand-in: the timer is where a launch compiles)")

    monkeypatch.setattr(gpu_kernels, "_cpu_ms", does_not_compile)
    res_broken: dict[str, Any] = {}
    gpu_kernels.tune(res_broken, device="cpu", tokens=32, widths=(300,), candidates=candidates)
    assert before == pd.LAUNCH
    assert all(v["fields"] is None for v in res_broken["tune"]["picks"].values())
    # six kernel modes, each timed as its baseline, two candidate shapes and the default
    assert len(res_broken["tune"]["errors"]) == 6 * 4
    (tmp_path / "broken.json").write_text(json.dumps(res_broken))
    with pytest.raises(SystemExit, match="the tune picked nothing for grad, lora_a, wgrad"):
        gpu_finetune.tuned_launch(tmp_path / "broken.json")


def test_olive_runner_argv_and_refusal(tmp_path: Path) -> None:
    import olive_runner

    argv = olive_runner.olive_argv(tmp_path / "m", tmp_path / "d.jsonl", 20, tmp_path / "o", cuda=False)
    flags = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert argv[0] == "finetune" and flags["--lora_r"] == "64" and flags["--lora_alpha"] == "16"
    assert flags["--max_samples"] == str(20 * gpu_finetune.SETTINGS["batch_size"]) and "float32" in argv
    cmd = [sys.executable, str(BENCH / "olive_runner.py"), "--model", str(tmp_path), "--data", str(tmp_path / "d")]
    proc = subprocess.run([*cmd, "--json", str(tmp_path / "o.json")], env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:  # olive-ai is not one of orch's dependencies: without it, one line
        assert proc.stderr.strip() == olive_runner.NOT_INSTALLED and proc.returncode == 1


def test_cpu_inference_runs_tiny(tmp_path: Path) -> None:
    before = (BENCH / "RESULTS.md").read_text()
    cmd = [sys.executable, str(BENCH / "cpu_inference.py"), "--tiny", "--work", str(tmp_path), "--prompt-tokens", "8"]
    proc = subprocess.run([*cmd, "--new-tokens", "4", "--repeats", "1"], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((tmp_path / "results.json").read_text())
    assert r["config"]["num_hidden_layers"] == 2 and set(r["rows"]) == {
        "transformers fp32", "onnxruntime-genai fp32", "onnxruntime-genai int4",
    }  # fmt: skip
    assert r["rows"]["onnxruntime-genai fp32"]["parity"]["max_abs_diff"] < 1e-3
    assert "| onnxruntime-genai int4 |" in proc.stdout
    assert (BENCH / "RESULTS.md").read_text() == before  # no --write-results: the committed section stays


def test_gpu_cli_finetune_runs_orch_finetune_tiny(tmp_path: Path) -> None:
    """The CLI benchmark's run on CPU (2 steps instead of the demo's 60): `orch finetune` as a user types it, its
    exit status, metrics and outputs recorded; the section rendered from that record."""
    cmd = [sys.executable, str(BENCH / "gpu_cli_finetune.py"), "run", "--out", str(tmp_path / "out")]
    cmd += ["--work", str(tmp_path / "work"), "--max-steps", "2"]
    subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900, check=True)
    res = json.loads((tmp_path / "out" / "cli.json").read_text())
    assert res["rc"] == 0 and res["device"] == "cpu" and "--max_steps 2" in res["command"]
    assert any(o.endswith("adapter/adapter_config.json") for o in res["outputs"]) and res["cuda_lines"] == []
    render = [sys.executable, str(BENCH / "gpu_cli_finetune.py"), "render", str(tmp_path / "out" / "cli.json")]
    proc = subprocess.run([*render, "--no-write"], env=_env(), capture_output=True, text=True, timeout=120, check=True)
    assert "exit status 0" in proc.stdout and "train_steps: 2" in proc.stdout


def test_profile_reports_gpu_gaps_and_host_calls(tmp_path: Path) -> None:
    """The profile says where the GPU waits: merged kernel intervals give busy vs span and the largest gaps (with
    the kernels around them); on CPU the timeline is empty and the host table still comes out."""
    import baseline_peft
    import torch

    busy, span, gaps = baseline_peft.gpu_gaps([(0, 10, "a"), (5, 20, "b"), (50, 60, "c"), (61, 70, "d")])
    assert (busy, span) == (39 / 1e6, 70 / 1e6)  # 0-20, 50-60, 61-70: 39 ns busy of 70
    assert gaps == [(30, "b", "c"), (1, "c", "d")]
    assert baseline_peft.gpu_gaps([]) == (0.0, 0.0, [])

    class _Event:  # stands for a CUDA event (none on CPU): its GPU time in ms since the first
        def __init__(self, at_ms: float) -> None:
            self.at_ms = at_ms

        def elapsed_time(self, other: _Event) -> float:
            return other.at_ms - self.at_ms

    # the host recorded step ends at 10 and 20 ms; the GPU reached them at 40 ms (host ahead) and 20 ms (waiting)
    leads = baseline_peft.host_lead_ms([_Event(0), _Event(40), _Event(20)], [1.0, 1.010, 1.020])
    assert [round(x, 6) for x in leads] == [30.0, 0.0]
    assert baseline_peft.host_lead_ms([_Event(0)], [1.0]) == []
    import cProfile

    host = cProfile.Profile()
    host.enable()
    sorted(range(1000), key=lambda i: -i)
    host.disable()
    baseline_peft.write_host_profile(host, tmp_path / "p", 2)
    host_text = (tmp_path / "p" / "host_profile.txt").read_text()
    assert host_text.startswith("host Python time per step under cProfile:") and "<lambda>" in host_text
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ones(64, 64) @ torch.ones(64, 64)
    baseline_peft.write_profile(prof, tmp_path / "p", 1)
    text = (tmp_path / "p" / "profile.txt").read_text()
    assert "GPU timeline of the profiled steps: 0.0 ms/step span" in text
    assert "CUDA runtime call" in text
    assert "GEMMs by shape" in text  # empty on CPU (no device time); the FLOP count per call:
    assert baseline_peft.gemm_flops("aten::mm", [[64, 32], [32, 16]]) == 2 * 64 * 32 * 16
    assert baseline_peft.gemm_flops("aten::addmm", [[16], [64, 32], [32, 16], [], []]) == 2 * 64 * 32 * 16
    assert baseline_peft.gemm_flops("aten::addmm_", [[64, 16], [64, 32], [32, 16], [], []]) == 2 * 64 * 32 * 16
    assert baseline_peft.gemm_flops("aten::bmm", [[4, 64, 32], [4, 32, 16]]) == 2 * 4 * 64 * 32 * 16
    assert baseline_peft.gemm_flops("aten::mm", [[64, 32], [31, 16]]) == 0.0  # shapes that do not chain
