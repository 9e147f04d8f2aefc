"""Evaluate pass on tiny models: perplexity, label log-likelihood accuracy, latency/throughput; hf and onnx agree."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from orchestrator.core.job import Job, ModelArtifact
from orchestrator.passes.base import PassContext, PassError, PassOutput
from orchestrator.passes.evaluation.evaluate import EvaluatePass
from orchestrator.passes.evaluation.quality import prompt_prefix
from orchestrator.passes.models.tiny_model import build_tiny_phi3
from orchestrator.passes.onnx.model_builder import ModelBuilderPass

TONES = ["Sad", "Joy", "Fear", "Surprise"]
PHRASES = {
    "Sad": "I lost the family dog and cried all night.",
    "Joy": "We won the lottery and could not stop smiling!",
    "Fear": "She heard footsteps behind the dark basement and shook with terror.",
    "Surprise": "He opened the door to a surprise party, wow, out of nowhere!",
}
TEMPLATE = "### Text: {phrase}\n### The tone is:\n{tone}"


def data_config(path: Path) -> dict[str, Any]:
    """The tone workflow's data config (Olive nested form), pointing at a local jsonl."""
    return {
        "name": "tone",
        "type": "HuggingfaceContainer",
        "load_dataset_config": {"params": {"data_name": "json", "data_files": str(path), "split": "train"}},
        "pre_process_data_config": {"params": {"dataset_type": "corpus", "text_template": TEMPLATE}},
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("eval")
    rows = [{"phrase": f"{PHRASES[t]} ({i})", "tone": t} for i in range(5) for t in TONES]
    data = root / "tone.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [TEMPLATE.format(**r) for r in rows]
    hf = build_tiny_phi3(root / "hf", texts=texts)
    models = {"hf": ModelArtifact(format="hf", path=str(hf))}
    for precision in ("fp32", "int4"):
        job = Job(job_id="b", pass_name="b", pass_type="ModelBuilder", output_dir=str(root / precision))
        p = ModelBuilderPass()
        p.run(
            p.Config(precision=precision, check_generation=False),
            models["hf"],
            PassContext(job=job, out_dir=root / precision, emit=lambda e: None),
        )
        models[precision] = ModelArtifact(format="onnx_genai", path=str(root / precision / "model"))
    return {"root": root, "data": data, "models": models, "n_rows": len(rows)}


METRICS = [
    {"name": "perplexity", "type": "perplexity", "data_config": "tone", "user_config": {"max_samples": 12}},
    {
        "name": "accuracy",
        "type": "accuracy",
        "data_config": "tone",
        "sub_types": [{"name": "accuracy_score"}, {"name": "n_samples"}],
        "user_config": {"max_samples": 12, "label_col": "tone", "labels": TONES},
    },
    {"name": "latency", "type": "latency", "user_config": {"runs": 5, "max_new_tokens": 16}},
    {"name": "throughput", "type": "throughput", "user_config": {"repeat_test_num": 5, "max_new_tokens": 16}},
]


def evaluate(setup: dict[str, Any], model: ModelArtifact, metrics: list[dict[str, Any]], **cfg: Any) -> tuple:
    out = setup["root"] / f"ev-{len(list(setup['root'].iterdir()))}"
    events: list[dict[str, Any]] = []
    job = Job(
        job_id="e",
        pass_name="evaluate",
        pass_type="Evaluate",
        output_dir=str(out),
        data_configs={"tone": data_config(setup["data"])},
    )
    p = EvaluatePass()
    result: PassOutput = p.run(
        p.Config(metrics=metrics, **cfg), model, PassContext(job=job, out_dir=out, emit=events.append)
    )
    return result, events


def test_onnx_int4_all_metrics(setup: dict[str, Any]) -> None:
    model = setup["models"]["int4"]
    result, events = evaluate(setup, model, METRICS)
    m = result.metrics
    print("int4 evaluate", m)
    assert m["perplexity-perplexity"] > 1 and m["perplexity-eval_loss"] > 0 and m["perplexity-n_tokens"] > 0
    assert 0.0 <= m["accuracy-accuracy_score"] <= 1.0 and m["accuracy-n_samples"] == 12
    assert m["latency-prefill_p50_ms"] > 0 and m["latency-prefill_p90_ms"] >= m["latency-prefill_p50_ms"]
    assert m["latency-decode_ms_per_token"] > 0
    assert m["throughput-decode_tokens_per_s"] > 0 and m["throughput-e2e_tokens_per_s"] > 0
    logged = {e["name"]: e["value"] for e in events if e["type"] == "metric"}
    assert logged == pytest.approx(m)
    assert result.model == model  # pass-through, paths absolute


def test_hf_and_fp32_onnx_agree(setup: dict[str, Any]) -> None:
    """The same numbers from transformers and from the fp32 ONNX graph: the two scorers measure alike."""
    metrics = METRICS[:2]
    hf, _ = evaluate(setup, setup["models"]["hf"], metrics, eval_dataset_size=0.4)
    onnx, _ = evaluate(setup, setup["models"]["fp32"], metrics, eval_dataset_size=0.4)
    print("hf", hf.metrics, "fp32 onnx", onnx.metrics)
    assert hf.metrics["accuracy-n_samples"] == 8  # 40% of 20 rows carved off, as LoRA's eval split
    assert math.isclose(hf.metrics["perplexity-perplexity"], onnx.metrics["perplexity-perplexity"], rel_tol=1e-4)
    assert hf.metrics["accuracy-accuracy_score"] == onnx.metrics["accuracy-accuracy_score"]


def test_generate_method_and_prompt_prefix(setup: dict[str, Any]) -> None:
    assert prompt_prefix(TEMPLATE, "tone") == "### Text: {phrase}\n### The tone is:\n"
    metric = {**METRICS[1], "user_config": {"max_samples": 4, "label_col": "tone", "method": "generate"}}
    result, _ = evaluate(setup, setup["models"]["int4"], [metric])
    assert 0.0 <= result.metrics["accuracy-accuracy_score"] <= 1.0


def test_threshold_goals_are_compared_as_soon_as_measured(setup: dict[str, Any]) -> None:
    """Olive's threshold goals: each sub-type's direction (its own higher_is_better, else Olive's default) decides
    met or not, reported as <metric>-<sub>-goal_met and one log line each."""
    subs = [
        {"name": "perplexity", "goal": {"type": "threshold", "value": 1.0}},  # lower is better: > 1 is NOT met
        {"name": "eval_loss", "higher_is_better": True, "goal": {"type": "threshold", "value": 0.0}},  # > 0: met
        {"name": "n_tokens", "goal": {"type": "threshold", "value": 1}},  # higher is better: met
    ]
    result, events = evaluate(setup, setup["models"]["hf"], [{**METRICS[0], "sub_types": subs}])
    m = result.metrics
    assert m["perplexity-perplexity"] > 1 and m["perplexity-eval_loss"] > 0 and m["perplexity-n_tokens"] > 1
    goals = {k: v for k, v in m.items() if k.endswith("goal_met")}
    assert goals == {
        "perplexity-perplexity-goal_met": 0.0,
        "perplexity-eval_loss-goal_met": 1.0,
        "perplexity-n_tokens-goal_met": 1.0,
    }
    lines = [e["message"] for e in events if e["type"] == "log" and e["message"].startswith("goal ")]
    assert lines[0].startswith("goal perplexity-perplexity <= 1: ") and lines[0].endswith("-> NOT met"), lines
    assert lines[1].startswith("goal perplexity-eval_loss >= 0: ") and lines[1].endswith("-> met"), lines
    assert len(lines) == 3


def test_errors_are_one_line_and_actionable(setup: dict[str, Any]) -> None:
    int4 = setup["models"]["int4"]
    with pytest.raises(PassError, match="unknown sub_types"):
        evaluate(setup, int4, [{**METRICS[0], "sub_types": [{"name": "bleu"}]}])
    with pytest.raises(PassError, match="not in the workflow's data_configs"):
        evaluate(setup, int4, [{**METRICS[0], "data_config": "nope"}])
    with pytest.raises(PassError, match="no \\{label\\} placeholder"):
        evaluate(setup, int4, [{**METRICS[1], "user_config": {"label_col": "label"}}])
    with pytest.raises(PassError, match="onnx_genai"):
        evaluate(setup, setup["models"]["hf"], [METRICS[2]])
