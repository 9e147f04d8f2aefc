"""Real Olive configs and CLI lines (tests/olive_corpus/, sources and forced rewrites in corpus.json), each run
as written in a workspace of its own: hub ids and hub data sets load from the hub stand-in (tests/hub_standin,
HF_ENDPOINT; tiny models and small data sets under the real names, a token as a user of gated Llama repos has);
what remains rewritten is what this machine forces (./tiny-model for placeholders and non-hub sources, fewer
steps). Each entry must end as corpus.json says: with its artifacts on disk, or with a one-line error that names
the unsupported pass/key and what to use. Nothing ends silently.

`python -m tests.test_olive_corpus [ID ...]` prints every entry's outcome and the corpus figure without asserting.
"""

from __future__ import annotations

import gzip
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.passes.common.onnx_tools import matmulnbits_count
from orchestrator.passes.quantization.quantize import genai_provider

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "olive_corpus"
ENTRIES: list[dict[str, Any]] = json.loads((CORPUS / "corpus.json").read_text())


def _rows(n: int = 120) -> list[dict[str, str]]:
    sys.path.insert(0, str(REPO / "jobs" / "tone-classification"))
    from make_dataset import make_rows

    return make_rows(n, seed=7)


# Local stand-ins for the hub data sets: the same columns as the real ones, rows made from the tone phrases.
def _data(kind: str) -> list[dict[str, str]]:
    rows = _rows()
    if kind == "tone":  # xxyyzzz/phrase_classification
        return [{"phrase": r["phrase"], "tone": r["tone"]} for r in rows]
    if kind == "tiny_codes":  # nampdn-ai/tiny-codes
        return [{"programming_language": "Python", "prompt": r["phrase"], "response": r["tone"]} for r in rows]
    if kind == "text":  # wikitext, c4, openassistant-guanaco: one "text" column
        return [{"text": f"### Human: {r['phrase']} ### Assistant: {r['tone']}"} for r in rows]
    if kind == "qa":  # the workshop's teacher-generated train_data.jsonl
        return [{"Question": r["phrase"], "Answer": r["tone"]} for r in rows]
    if kind == "prompts":  # the blog post's data/ folder
        return [{"system_prompt": "Name the tone.", "prompt": r["phrase"], "ground_truth": r["tone"]} for r in rows]
    raise KeyError(kind)


def _hub_readme(folder: Path) -> str:
    """A hub data repo's README front matter: one config per sub-folder (wikitext's "wikitext-2-raw-v1", ...),
    so `load_dataset(folder, subset)` reads a local copy laid out as the hub repo is."""
    lines = ["---", "configs:"]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        lines += [f"- config_name: {sub.name}", "  data_files:"]
        for f in sorted(sub.glob("*.jsonl")):
            lines += [f"  - split: {f.stem}", f"    path: {sub.name}/{f.name}"]
    return "\n".join([*lines, "---", ""])


def write_data(root: Path, spec: dict[str, str]) -> None:
    for rel, kind in sorted(spec.items(), key=lambda kv: kv[1] == "hf_configs"):  # data files before the README
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "hf_configs":
            path.write_text(_hub_readme(path.parent))
            continue
        text = "".join(json.dumps(r) + "\n" for r in _data(kind))
        if path.suffix == ".gz":
            path.write_bytes(gzip.compress(text.encode()))
        else:
            path.write_text(text)


def commands(entry: dict[str, Any]) -> list[list[str]]:
    """The orch command lines of an entry: `olive run --config FILE`, or the .cli file's olive commands."""
    file = entry["file"]
    if not file.endswith(".cli"):
        return [["run", "--config", file]]
    text = (CORPUS / file).read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip():
            argv = shlex.split(line)
            assert argv[0] == "olive", line
            out.append(argv[1:])
    return out


@dataclass
class Outcome:
    kind: str  # "runs" | "refused" | "failed"
    detail: str
    seconds: float


def on_this_machine(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry as this machine must end it: a config that needs CUDA says under "on_cuda" what it must do
    where a GPU is (runs, with its outputs); without one it is refused in one line naming CUDA."""
    import torch

    return {**entry, **entry["on_cuda"]} if "on_cuda" in entry and torch.cuda.is_available() else entry


# Stand-ins for properties of the real model a config relies on (Qwen3-0.6B ties lm_head to the embedding;
# Phi-3.5's widths divide by AWQ/GPTQ's default group of 128): the hub stand-in serves them under those ids; an
# entry's "model" key gives ./tiny-model the same property.
from tests.hub_standin.content import MODEL_VARIANTS, model_variant  # noqa: E402, F401


def run_entry(
    entry: dict[str, Any], work: Path, tiny_model: Path, tracking_db: Path | None = None, hub: Any = None,
    hf_home: Path | None = None,
) -> Outcome:  # fmt: skip
    """Run an entry's commands in `work`; one MLflow store for all entries (its schema is created once); hub ids
    load from `hub` (the stand-in) into the HF cache `hf_home`."""
    entry = on_this_machine(entry)
    work.mkdir(parents=True, exist_ok=True)
    if entry.get("model"):  # a property of the real model the config relies on (MODEL_VARIANTS)
        tiny_model = model_variant(tiny_model, entry["model"])
    (work / "tiny-model").symlink_to(tiny_model, target_is_directory=True)
    write_data(work, entry.get("data", {}))
    for dest, src in entry.get("files", {}).items():  # files the config reads beside it: a user_script, data
        (work / dest).parent.mkdir(parents=True, exist_ok=True)
        (work / dest).write_bytes((CORPUS / src).read_bytes())
    if not entry["file"].endswith(".cli"):
        (work / entry["file"]).write_text((CORPUS / entry["file"]).read_text())
    db = tracking_db or work / "ml.db"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    if hub is not None:  # a user of these configs has the hub, and a token (Llama repos are gated)
        from tests.conftest import HUB_TOKEN, hub_env

        env.update(hub_env(hub, hf_home or work / "hf", token=HUB_TOKEN), COLUMNS="200")
    t0 = time.perf_counter()
    for argv in commands(entry):
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", *argv],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
        if proc.returncode != 0:
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("orch: error:")]
            clean = bool(errors) and "Traceback" not in proc.stderr
            detail = "\n".join(errors) if clean else proc.stderr[-3000:]
            return Outcome("refused" if clean else "failed", detail, time.perf_counter() - t0)
    missing = [p for p in entry.get("outputs", []) if not list(work.glob(p))]  # a glob: no output_dir = the cache
    if missing:
        return Outcome("failed", f"exit 0 but missing {missing}", time.perf_counter() - t0)
    for rel, provider in entry.get("providers", {}).items():  # the model was built for the EP the config asks
        got = genai_provider(work / rel)
        if got != provider:
            return Outcome("failed", f"exit 0 but {rel} targets {got}, not {provider}", time.perf_counter() - t0)
    for rel, names in entry.get("metrics", {}).items():  # the evaluator's metrics reached the manifest
        got = json.loads((work / rel).read_text()).get("metrics", {})
        absent = [n for n in names if not isinstance(got.get(n), int | float)]
        if absent:
            return Outcome("failed", f"exit 0 but {rel} lacks metrics {absent}", time.perf_counter() - t0)
    for rel in entry.get("int4", []):  # a quantizer pass really quantized
        if not matmulnbits_count(work / rel):
            return Outcome("failed", f"exit 0 but {rel} has no MatMulNBits", time.perf_counter() - t0)
    return Outcome("runs", "", time.perf_counter() - t0)


@pytest.fixture(scope="module")
def tracking_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlflow") / "corpus.db"


@pytest.fixture(scope="module")
def corpus_hf_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf")  # one HF cache for the corpus, as on one user's machine


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["id"] for e in ENTRIES])
def test_corpus_entry(
    entry: dict[str, Any], tmp_path: Path, tiny_model: Path, tracking_db: Path, hub: Any, corpus_hf_home: Path
) -> None:
    outcome = run_entry(entry, tmp_path / "work", tiny_model, tracking_db, hub, corpus_hf_home)
    entry = on_this_machine(entry)
    expect = entry["expect"]
    assert outcome.kind == expect, f"{entry['id']}: expected {expect}, got {outcome.kind}: {outcome.detail}"
    if expect == "refused":  # one line per problem, each naming the pass/key and what to use
        assert all(line.startswith("orch: error: ") for line in outcome.detail.splitlines()), outcome.detail
        for part in entry["error"]:
            assert part in outcome.detail, f"{part!r} not in {outcome.detail!r}"


def test_corpus_records_source_and_rewrites() -> None:
    for e in ENTRIES:
        assert e["source"]["path"] and e["source"]["repo"], e["id"]
        text = (CORPUS / e["file"]).read_text()
        for rw in e["rewrites"]:
            assert rw["to"] in text, (e["id"], rw)
        assert e["expect"] in ("runs", "refused"), e["id"]
        assert e["expect"] == "refused" or e.get("outputs"), f"{e['id']}: a run names the artifacts it must leave"


if __name__ == "__main__":
    import tempfile

    from orchestrator.passes.models.tiny_model import build_tiny_phi3
    from tests.conftest import HUB_TOKEN
    from tests.hub_standin import serve_defaults, start_hub

    wanted = set(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp, start_hub() as hub:
        rows = _rows(240)
        model = build_tiny_phi3(Path(tmp) / "tiny-phi3", texts=[f"{r['phrase']} {r['tone']}" for r in rows])
        hub.tokens.add(HUB_TOKEN)
        serve_defaults(hub, model)
        counts: dict[str, int] = {}
        for e in ENTRIES:
            if wanted and e["id"] not in wanted:
                continue
            o = run_entry(e, Path(tmp) / e["id"], model, Path(tmp) / "corpus.db", hub, Path(tmp) / "hf")
            counts[o.kind] = counts.get(o.kind, 0) + 1
            print(f"{e['id']:40s} {o.kind:8s} {o.seconds:6.1f}s  {o.detail.splitlines()[0] if o.detail else ''}")
            if o.kind == "failed":
                print(o.detail[-1500:])
        print(counts)


# ---- the pieces the corpus needs, one by one (fast) ----------------------------------------------------------


def _wf(**extra: Any) -> dict[str, Any]:
    return {
        "input_model": {"type": "HfModel", "model_path": "./m"},
        "passes": {"a": {"type": "ModelBuilder", "precision": "int4"}, "b": {"type": "OnnxMatMul4Quantizer"}},
        **extra,
    }


def test_execution_providers_come_from_the_target_systems_accelerators(tmp_path: Path) -> None:
    from orchestrator.olive import load_workflow

    eps = ["CPUExecutionProvider", "CUDAExecutionProvider"]
    systems = {
        "gpu": {"type": "LocalSystem", "accelerators": [{"device": "gpu", "execution_providers": eps}]},
        "bare": {"type": "LocalSystem", "accelerators": ["gpu"]},
    }
    wf = load_workflow(_wf(systems=systems, target="gpu"), base_dir=tmp_path)
    assert wf.engine.execution_providers == ["CPUExecutionProvider", "CUDAExecutionProvider"]
    assert any("systems.gpu.accelerators" in n for n in wf.notes)
    assert load_workflow(_wf(systems=systems, target="bare"), base_dir=tmp_path).engine.execution_providers == [
        "CUDAExecutionProvider"
    ]
    explicit = _wf(systems=systems, target="gpu", execution_providers=["CPUExecutionProvider"])
    assert load_workflow(explicit, base_dir=tmp_path).engine.execution_providers == ["CPUExecutionProvider"]


def test_olive_only_keys_are_honoured_refused_or_noted(tmp_path: Path) -> None:
    from orchestrator.olive import load_workflow
    from orchestrator.schema import ConfigError

    wf = load_workflow(
        _wf(**{"$schema": "x", "no_artifacts": True, "pass_flows": [["b", "a"]], "clean_cache": True,
               "packaging_config": {"type": "Zipfile", "name": "Out"}}),
        base_dir=tmp_path,
    )  # fmt: skip
    assert list(wf.passes) == ["b", "a"]  # the one flow's order
    assert wf.engine.clean_cache and wf.engine.packaging_config[0].name == "Out"
    assert any(n.startswith("$schema: accepted, changes nothing") for n in wf.notes)
    assert any(n.startswith("no_artifacts: accepted") for n in wf.notes)
    two = load_workflow(_wf(pass_flows=[["a"], ["a", "b"]], output_dir="out"), base_dir=tmp_path)
    runs = two.flow_workflows()  # one run (and output folder) per flow, named by its last pass
    assert [(name, list(w.passes), w.engine.output_dir) for name, w in runs] == [
        ("a", ["a"], tmp_path / "out" / "a"),
        ("b", ["a", "b"], tmp_path / "out" / "b"),
    ]
    assert any(n.startswith("pass_flows: 2 flows") for n in two.notes)
    with pytest.raises(ConfigError) as exc:
        load_workflow(_wf(pass_flows=[["a"], ["zz"]]), base_dir=tmp_path)
    assert "names no pass in 'passes': zz" in str(exc.value)
    bad = _wf(evaluators={"e": {"type": "LMEvaluator", "tasks": ["hellaswag"]}})
    bad["passes"]["c"] = {"type": "SelectiveMixedPrecision", "algorithm": "k_quant_mixed"}
    with pytest.raises(ConfigError) as exc:
        load_workflow(bad, base_dir=tmp_path)
    text = str(exc.value)
    assert "LMEvaluator" in text


def test_olive_current_quantizer_names_resolve() -> None:
    from orchestrator.passes.quantization.awq_gptq import GptqQuantizerPass
    from orchestrator.passes.quantization.olive_gptq import OliveGptqPass
    from orchestrator.passes.quantization.onnx_hqq import OnnxHqqQuantizationPass
    from orchestrator.passes.registry import load_pass

    assert load_pass("Gptq") is OliveGptqPass  # Olive >= 0.10's Gptq writes its own quantized checkpoint
    assert load_pass("GptqQuantizer") is GptqQuantizerPass  # the llm-compressor one
    assert load_pass("OnnxHqqQuantization") is OnnxHqqQuantizationPass


def test_phi3_target_modules_map_to_the_fused_projections(tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    from orchestrator.olive.finetune import fused_target_modules

    asked = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert fused_target_modules(asked, str(tiny_model)) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    note = capsys.readouterr().err.strip()
    assert len(note.splitlines()) == 1 and "fuses" in note
    assert fused_target_modules(["q_proj"], "/nonexistent") == ["q_proj"]  # not a Phi-3 folder: unchanged


def test_hqq_int4_parity_with_transformers(tmp_path: Path, tiny_model: Path) -> None:
    from orchestrator.core.job import Job, ModelArtifact
    from orchestrator.passes.base import PassContext
    from orchestrator.passes.common import onnx_tools
    from orchestrator.passes.onnx.model_builder import ModelBuilderPass
    from orchestrator.passes.quantization.onnx_hqq import OnnxHqqQuantizationPass

    def run(p: Any, out: Path, model: ModelArtifact, **cfg: Any) -> Any:
        job = Job(job_id="j", pass_name="p", pass_type=p.type_name, output_dir=str(out))
        return p.run(p.Config(**cfg), model, PassContext(job=job, out_dir=out, emit=lambda e: None))

    run(ModelBuilderPass(), tmp_path / "fp32", ModelArtifact(format="hf", path=str(tiny_model)), precision="fp32")
    fp32 = tmp_path / "fp32" / "model"
    res = run(OnnxHqqQuantizationPass(), tmp_path / "hqq", ModelArtifact(format="onnx_genai", path=str(fp32)))
    out = tmp_path / "hqq" / "model"
    assert res.model is not None and res.model.quantized and onnx_tools.matmulnbits_count(out) > 0
    ref = onnx_tools.logits_parity(tiny_model, fp32)
    got = onnx_tools.logits_parity(tiny_model, out)
    assert ref["max_abs_diff"] < 1e-4  # the fp32 export matches transformers
    assert 0 < got["max_abs_diff"] < 1.0 and got["greedy_agree"] > 0.5  # int4 HQQ stays close


def test_olive_data_config_forms(tmp_path: Path) -> None:
    """params_config, col_filters, {split: file} data_files (relative to a data folder), the default text column."""
    from orchestrator.olive import load_workflow
    from orchestrator.passes.common.data import load_splits

    rows = [{"text": f"row {i}", "lang": "Python" if i % 2 else "C"} for i in range(10)]
    (tmp_path / "d" / "en").mkdir(parents=True)
    (tmp_path / "d" / "en" / "part.json.gz").write_bytes(
        gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    )  # noqa: E501
    old_form = {"name": "old", "type": "HuggingfaceContainer", "params_config": {
        "data_name": "./d", "split": "train", "data_files": {"train": "en/part.json.gz"},
        "component_kwargs": {"load_dataset": {"col_filters": {"lang": "Python"}}, "pre_process_data": {
            "text_cols": ["text"], "source_max_len": 64}}}}  # fmt: skip
    wf = load_workflow(_wf(data_configs=[old_form]), base_dir=tmp_path)
    assert any("params_config read as" in n for n in wf.notes)
    dc = wf.data_config("old").model_dump(mode="json")
    train, _ = load_splits(dc, base_dir=tmp_path)
    assert len(train) == 5 and train[0]["text"] == "row 1"  # only the Python rows
    default_col = {"name": "plain", "load_dataset_config": {"data_name": "./d", "data_files": ["en/part.json.gz"]},
                   "pre_process_data_config": {"max_samples": 3}}  # fmt: skip
    wf = load_workflow(_wf(data_configs=[default_col]), base_dir=tmp_path)
    train, _ = load_splits(wf.data_config("plain").model_dump(mode="json"), base_dir=tmp_path)
    assert list(train["text"]) == ["row 0", "row 1", "row 2"]  # Olive's default text column


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_conversion_optimization_dynamic_quant_parity(tmp_path: Path, tiny_model: Path, dynamo: bool) -> None:
    """OnnxConversion (torch.onnx, both exporters) -> OrtTransformersOptimization -> OnnxDynamicQuantization,
    each against the transformers logits of the tiny Phi-3."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from orchestrator.core.job import Job, ModelArtifact
    from orchestrator.passes.base import PassContext
    from orchestrator.passes.common import onnx_tools
    from orchestrator.passes.onnx.onnx_conversion import OnnxConversionPass
    from orchestrator.passes.onnx.ort_optimize import OrtTransformersOptimizationPass
    from orchestrator.passes.quantization.onnx_dynamic_quant import OnnxDynamicQuantizationPass

    def run(p: Any, out: Path, model: ModelArtifact, **cfg: Any) -> Any:
        job = Job(job_id="j", pass_name="p", pass_type=p.type_name, output_dir=str(out))
        res = p.run(p.Config(**cfg), model, PassContext(job=job, out_dir=out, emit=lambda e: None))
        return res, res.model.with_root(out)

    ids = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43, 38, 32, 79, 50]
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids]), use_cache=False).logits[0].numpy()
    _, onnx_fp32 = run(
        OnnxConversionPass(), tmp_path / "c", ModelArtifact(format="hf", path=str(tiny_model)),
        use_dynamo_exporter=dynamo, save_metadata_for_token_generation=True,
    )  # fmt: skip
    assert (Path(onnx_fp32.path) / "tokenizer.json").is_file()
    assert np.abs(onnx_tools.ort_logits(onnx_fp32.path, ids) - ref).max() < 1e-4
    res, optimized = run(OrtTransformersOptimizationPass(), tmp_path / "o", onnx_fp32, model_type="gpt2", opt_level=0)
    assert np.abs(onnx_tools.ort_logits(optimized.path, ids) - ref).max() < 1e-3
    res, q = run(OnnxDynamicQuantizationPass(), tmp_path / "q", optimized)
    got = onnx_tools.ort_logits(q.path, ids)
    assert q.quantized and res.metrics["size_after_bytes"] < res.metrics["size_before_bytes"]
    assert np.abs(got - ref).max() < 1.0 and (got.argmax(-1) == ref.argmax(-1)).mean() > 0.5


def test_capture_onnx_graph_then_tune_session_params(tmp_path: Path, tiny_model: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/ml.db"}

    def orch(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "orchestrator.cli", *args]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)

    cap = orch("capture-onnx-graph", "-m", str(tiny_model), "-o", "cap", "--no-tracking")
    assert cap.returncode == 0, cap.stderr[-2000:]
    assert (tmp_path / "cap/model/model.onnx").is_file() and (tmp_path / "cap/model/tokenizer.json").is_file()
    # Olive's flags and list syntax; the captured graph has a KV cache, so the token-with-past dummy inputs
    tune = orch("tune-session-params", "-m", "cap/model", "-o", "tuned", "--predict_with_kv_cache",
                "--intra_thread_num_list", "1", "2", "--execution_mode_list", "0")  # fmt: skip
    assert tune.returncode == 0, tune.stderr[-2000:]
    settings = json.loads((tmp_path / "tuned/cpu-cpu.json").read_text())
    assert settings["execution_provider"] == ["CPUExecutionProvider"]
    assert settings["session_options"] == {} or settings["session_options"]["intra_op_num_threads"] in (1, 2)
    manifest = json.loads((tmp_path / "tuned/manifest.json").read_text())
    assert manifest["metrics"]["session_params_tuning/settings_tried"] == 3  # defaults + sequential x {1, 2}
    bad = orch("tune-session-params", "-m", "cap/model", "--intra_thread_num_list", "two")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and lines == ["orch: error: tune-session-params: argument --intra_thread_num_list: "
                                             "invalid int value: 'two'"], bad.stderr  # fmt: skip


def test_cli_data_files_comma_list() -> None:
    from orchestrator.olive.finetune import finetune_workflow

    wf = finetune_workflow(
        model_name_or_path="m", output_path="o", data_name="json", data_files="a.jsonl, b.jsonl", text_field="t"
    )
    assert wf["data_configs"][0]["load_dataset_config"]["data_files"] == ["a.jsonl", "b.jsonl"]


def _ev_wf(metrics: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return _wf(
        data_configs=[{"name": "d", "load_dataset_config": {"data_name": "json", "data_files": ["x.jsonl"]}}],
        evaluators={"e": {"metrics": metrics}}, evaluator="e", **extra,
    )  # fmt: skip


def test_evaluator_metric_config_and_backend_honoured_or_refused_at_load(tmp_path: Path) -> None:
    from orchestrator.olive import load_workflow
    from orchestrator.passes.evaluation.evaluate import EvaluateConfig
    from orchestrator.schema import ConfigError

    ok = [
        {"name": "lat", "type": "latency", "backend": "torch_metrics",
         "sub_types": [{"name": "avg", "metric_config": {"warmup_num": 1, "repeat_test_num": 3, "sleep_num": 0.5}}]},
        {"name": "acc", "type": "accuracy", "data_config": "d", "user_config": {"batch_size": 4},
         "sub_types": [{"name": "accuracy_score", "metric_config": {"task": "multiclass", "num_classes": 4}}]},
    ]  # fmt: skip
    wf = load_workflow(_ev_wf(ok), base_dir=tmp_path)
    assert any("backend torch_metrics accepted" in n for n in wf.notes)
    assert any("batch_size 4 accepted, changes no value" in n for n in wf.notes)
    dumped = [m.model_dump(mode="json", exclude_none=True) for m in wf.evaluators["e"].metrics]
    lat, acc = EvaluateConfig.model_validate({"metrics": dumped}).metrics
    assert (lat.user_config.warmup_num, lat.user_config.repeat_test_num, lat.user_config.sleep_num) == (1, 3, 0.5)
    assert acc.user_config.num_classes == 4
    bad = {
        "backend 'huggingface_metrics' is not supported": {"backend": "huggingface_metrics"},
        "metric_config task='multilabel' is not supported": {
            "sub_types": [{"name": "accuracy", "metric_config": {"task": "multilabel"}}]},
        "disagrees with user_config.num_classes": {"user_config": {"num_classes": 3},
            "sub_types": [{"name": "accuracy", "metric_config": {"num_classes": 4}}]},
    }  # fmt: skip
    for msg, change in bad.items():
        metric = {"name": "x", "type": "accuracy", "data_config": "d", "sub_types": [{"name": "accuracy"}], **change}
        with pytest.raises(ConfigError, match=msg):
            load_workflow(_ev_wf([metric]), base_dir=tmp_path)
    with pytest.raises(ConfigError, match="batch_size 2 is not supported for latency"):
        load_workflow(_ev_wf([{"name": "l", "type": "latency", "user_config": {"batch_size": 2}}]), base_dir=tmp_path)


def test_cuda_evaluator_without_gpu_runs_on_cpu_and_awq_without_data_reads_the_default(
    tmp_path: Path, tiny_model: Path
) -> None:
    import torch

    from orchestrator.engine import Engine
    from orchestrator.engine.preflight_error import PreflightError
    from orchestrator.olive import load_workflow
    from orchestrator.schema import ConfigError

    gpu = {"gpu": {"type": "LocalSystem", "accelerators": [{"device": "gpu"}]}}
    raw = _ev_wf([{"name": "l", "type": "latency"}], systems=gpu, target="gpu")
    raw["input_model"]["model_path"] = str(tiny_model)
    (tmp_path / "x.jsonl").write_text('{"text": "a b"}\n')

    notes_seen: list[str] = []
    reporter = type("Notes", (), {"note": staticmethod(notes_seen.append)})()
    engine = Engine(load_workflow(raw, base_dir=tmp_path), tracking=False, reporter=reporter)
    if not torch.cuda.is_available():  # CUDA asked of a host without it: the evaluation runs on the CPU, said
        engine.preflight(tracking=False)
        assert any("evaluation runs on CPUExecutionProvider" in n for n in notes_seen), notes_seen
        evals = [s for s in engine.plan() if s.role == "target"]
        assert evals and all(engine.devices.step_providers(s) == ["CPUExecutionProvider"] for s in evals)
        builds = [s for s in engine.plan() if s.role == "host"]  # the builds keep the asked provider
        assert builds and all(engine.devices.step_providers(s) == ["CUDAExecutionProvider"] for s in builds)
        tuned = {**raw, "passes": {"t": {"type": "OrtSessionParamsTuning"}}}  # a timing pass times on the CPU
        engine = Engine(load_workflow(tuned, base_dir=tmp_path), tracking=False, reporter=reporter)
        engine.preflight(tracking=False)
        assert any("passes.t (OrtSessionParamsTuning) times the model" in n for n in notes_seen), notes_seen
        assert engine.devices.step_providers(engine.plan()[0]) == ["CPUExecutionProvider"]
    dml = {"gpu": {"type": "LocalSystem", "accelerators": [{"device": "gpu", "execution_providers": [
        "DmlExecutionProvider"]}]}}  # fmt: skip
    with pytest.raises(PreflightError, match="evaluates with DmlExecutionProvider .* no DmlExecutionProvider runtime"):
        Engine(load_workflow({**raw, "systems": dml}, base_dir=tmp_path), tracking=False).preflight(tracking=False)
    raw["systems"]["gpu"]["accelerators"] = [{"device": "gpu", "execution_providers": [
        "CPUExecutionProvider", "CUDAExecutionProvider"]}]  # fmt: skip
    Engine(load_workflow(raw, base_dir=tmp_path), tracking=False).preflight(tracking=False)
    awq = _wf()
    awq["passes"] = {"q": {"type": "AutoAWQQuantizer", "w_bit": 3}}
    with pytest.raises(ConfigError) as exc:
        load_workflow(awq, base_dir=tmp_path)
    assert "bits=3" in str(exc.value) and "calibration" not in str(exc.value)  # no data: Olive's default, below
    awq["passes"]["q"] = {"type": "AutoAWQQuantizer"}
    notes = load_workflow(awq, base_dir=tmp_path).notes
    assert any("no data_config: Olive's default calibration data, mit-han-lab/pile-val-backup" in n for n in notes)
    awq["passes"]["q"] = {"type": "AutoAWQQuantizer", "data_config": "d", "version": "GEMM"}
    awq["data_configs"] = [{"name": "d", "load_dataset_config": {"data_name": "json", "data_files": ["x.jsonl"]}}]
    notes = load_workflow(awq, base_dir=tmp_path).notes
    assert any(n.startswith("passes.q: version: accepted, no effect") for n in notes), notes


def _run_pass(p: Any, out: Path, model: Any, data_configs: dict[str, Any] | None = None, **cfg: Any) -> Any:
    from orchestrator.core.job import Job
    from orchestrator.passes.base import PassContext

    job = Job(job_id="j", pass_name="p", pass_type=p.type_name, output_dir=str(out), data_configs=data_configs or {})
    return p.run(p.Config(**cfg), model, PassContext(job=job, out_dir=out, emit=lambda e: None))


def test_onnx_conversion_graph_has_a_kv_cache_and_dummy_latency_times_it(tmp_path: Path, tiny_model: Path) -> None:
    """Olive's decoder export: one graph for the prompt (empty past) and for cached decode steps, checked against
    transformers both ways; the dummy containers feed it with Olive's default shapes, and Evaluate times it."""
    import onnxruntime as ort

    from orchestrator.core.job import ModelArtifact
    from orchestrator.passes.base import PassError
    from orchestrator.passes.common.dummy_data import dummy_inputs, session_inputs
    from orchestrator.passes.evaluation.evaluate import EvaluatePass
    from orchestrator.passes.onnx.onnx_conversion import OnnxConversionPass

    res = _run_pass(OnnxConversionPass(), tmp_path / "c", ModelArtifact(format="hf", path=str(tiny_model)),
                    save_metadata_for_token_generation=True)  # fmt: skip
    assert res.metrics["parity_max_abs_diff"] < 1e-4  # max of the prompt and the cached-step diffs
    model_dir = tmp_path / "c" / "model"
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and "past_key_values.0.key" in names
    assert "present.0.key" in [o.name for o in sess.get_outputs()]

    token = {"name": "tok", "type": "TransformersTokenDummyDataContainer", "load_dataset_config": {}}
    feed = dummy_inputs(token, session_inputs(sess), model_dir)[0]
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert feed["input_ids"].shape == (1, 1) and feed["attention_mask"].shape == (1, 9)
    assert feed["past_key_values.0.key"].shape == (1, cfg["num_key_value_heads"], 8, head_dim)
    assert feed["position_ids"].tolist() == [[8]]
    logits = sess.run(["logits"], feed)[0]
    assert logits.shape == (1, 1, cfg["vocab_size"])

    prompt = {"name": "prompt", "type": "TransformersPromptDummyDataContainer", "load_dataset_config": {}}
    inputs_no_kv = [i for i in session_inputs(sess) if not i.name.startswith("past")]
    with pytest.raises(PassError, match="past_seq_len 0"):
        dummy_inputs(token, inputs_no_kv, model_dir)
    assert dummy_inputs(prompt, inputs_no_kv, model_dir)[0]["input_ids"].shape == (1, 8)
    with pytest.raises(PassError, match="input_names"):
        dummy_inputs({"name": "d", "type": "DummyDataContainer", "load_dataset_config": {"input_names": ["x"],
                      "input_shapes": [[1]]}}, session_inputs(sess), model_dir)  # fmt: skip

    subs = [{"name": "avg"}, {"name": "p90"}]
    metrics = [{"name": "lat", "type": "latency", "data_config": "tok", "sub_types": subs}]
    ev = _run_pass(EvaluatePass(), tmp_path / "e", ModelArtifact(format="onnx", path=str(model_dir)),
                   data_configs={"tok": token}, metrics=metrics)  # fmt: skip
    assert ev.metrics["lat-avg"] > 0 and ev.metrics["lat-p90"] >= ev.metrics["lat-avg"] * 0.5
    bad = [{"name": "ppl", "type": "perplexity", "data_config": "tok"}]
    with pytest.raises(PassError, match="random token ids only serve latency"):
        _run_pass(EvaluatePass(), tmp_path / "e2", ModelArtifact(format="onnx", path=str(model_dir)),
                  data_configs={"tok": token}, metrics=bad)  # fmt: skip


def test_dummy_containers_are_refused_where_text_is_needed(tmp_path: Path) -> None:
    from orchestrator.olive import load_workflow
    from orchestrator.passes.common.data import DataError, load_splits
    from orchestrator.schema import ConfigError

    dummy = {"name": "tok", "type": "TransformersTokenDummyDataContainer", "load_dataset_config": {"model_name": "x"}}
    wf = load_workflow(_wf(data_configs=[dummy]), base_dir=tmp_path)
    assert any("model_name accepted, changes nothing" in n for n in wf.notes)
    with pytest.raises(DataError, match="no text to train or score on"):
        load_splits(wf.data_config("tok").model_dump(mode="json"), base_dir=tmp_path)
    with pytest.raises(ConfigError, match="shared_kv"):
        load_workflow(_wf(data_configs=[{**dummy, "load_dataset_config": {"shared_kv": True}}]), base_dir=tmp_path)


def test_model_builder_metadata_only_makes_the_exported_graph_a_genai_model(tmp_path: Path, tiny_model: Path) -> None:
    """OnnxConversion -> OrtTransformersOptimization -> ModelBuilder metadata_only (Olive's LLM chain): the same
    graph, now with genai_config.json; onnxruntime-genai's logits equal the graph's, cached decoding agrees."""
    from orchestrator.core.job import ModelArtifact
    from orchestrator.passes.base import PassError
    from orchestrator.passes.common import onnx_tools
    from orchestrator.passes.onnx.model_builder import ModelBuilderPass
    from orchestrator.passes.onnx.onnx_conversion import OnnxConversionPass
    from orchestrator.passes.onnx.ort_optimize import OrtTransformersOptimizationPass

    hf = ModelArtifact(format="hf", path=str(tiny_model))

    def onnx(folder: str) -> ModelArtifact:
        return ModelArtifact(format="onnx", path=str(tmp_path / folder / "model"))

    _run_pass(OnnxConversionPass(), tmp_path / "bare", hf)  # no tokenizer beside the graph
    with pytest.raises(PassError, match="save_metadata_for_token_generation"):
        _run_pass(ModelBuilderPass(), tmp_path / "m0", onnx("bare"), metadata_only=True)
    _run_pass(OnnxConversionPass(), tmp_path / "c", hf, save_metadata_for_token_generation=True)
    _run_pass(OrtTransformersOptimizationPass(), tmp_path / "o", onnx("c"), opt_level=0, keep_io_types=False)
    res = _run_pass(ModelBuilderPass(), tmp_path / "m", onnx("o"), metadata_only=True, precision="fp16")
    out = tmp_path / "m" / "model"
    assert res.model.format == "onnx_genai" and (out / "genai_config.json").is_file()
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["filename"] == "model.onnx"
    assert genai["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert res.metrics["genai_vs_graph_max_abs_diff"] < 1e-3 and res.metrics["cached_decode_agreement"] == 1.0
    assert onnx_tools.generate(out, "hello", 4).n_tokens > 0


def test_cache_key_code_covers_the_helpers_a_pass_imports() -> None:
    from orchestrator.core.code_identity import _closure, _source_path, code_hash

    files = {n for n in _closure("orchestrator.passes.onnx.model_builder") if _source_path(n)}
    assert {
        "orchestrator.passes.onnx.genai_metadata", "orchestrator.passes.common.onnx_tools", "orchestrator.passes.base"
    } <= files
    assert code_hash("orchestrator.passes.onnx.model_builder") != code_hash("orchestrator.passes.quantization.quantize")


def test_split_model_makes_a_genai_pipeline_that_generates_like_the_whole(tmp_path: Path, tiny_model: Path) -> None:
    """Olive's CaptureSplitInfo + SplitModel (auto-opt --num-splits): parts in sequence == the whole graph, and
    onnxruntime-genai's decoder-pipeline generates the same tokens; CaptureSplitInfo's plan moves into SplitModel."""
    from orchestrator.core.job import ModelArtifact
    from orchestrator.olive import load_workflow
    from orchestrator.passes.onnx.model_builder import ModelBuilderPass
    from orchestrator.passes.onnx.split_model import SplitModelPass
    from orchestrator.schema import ConfigError

    wf = load_workflow({"input_model": {"type": "HfModel", "model_path": "./m"}, "passes": {
        "cap": {"type": "CaptureSplitInfo", "num_splits": 2, "unique_embeds_lm_head_splits": True},
        "mb": {"type": "ModelBuilder"}, "split": {"type": "SplitModel"}}}, base_dir=tmp_path)  # fmt: skip
    assert list(wf.passes) == ["mb", "split"]
    assert wf.passes["split"].config == {"num_splits": 2, "unique_embeds_lm_head_splits": True}
    alone = {"input_model": {"type": "HfModel", "model_path": "./m"},
             "passes": {"cap": {"type": "CaptureSplitInfo", "num_splits": 2}}}  # fmt: skip
    with pytest.raises(ConfigError, match="no SplitModel pass after it"):
        load_workflow(alone, base_dir=tmp_path)

    _run_pass(ModelBuilderPass(), tmp_path / "mb", ModelArtifact(format="hf", path=str(tiny_model)), precision="int4")
    built = ModelArtifact(format="onnx_genai", path=str(tmp_path / "mb" / "model"))
    res = _run_pass(SplitModelPass(), tmp_path / "s", built, num_splits=2)
    out = tmp_path / "s" / "model"
    genai = json.loads((out / "genai_config.json").read_text())
    stages = genai["model"]["decoder"]["pipeline"][0]
    assert genai["model"]["type"] == "decoder-pipeline" and list(stages) == ["split_0", "split_1"]
    assert "past_key_values.0.key" in stages["split_0"]["inputs"]
    assert "past_key_values.1.key" in stages["split_1"]["inputs"]
    assert res.metrics["parts_vs_whole_max_abs_diff"] < 1e-4 and res.metrics["pipeline_generated_tokens"] == 8
    assert not (out / "model.onnx").exists() and (out / "model_split_1.onnx.data").is_file()
