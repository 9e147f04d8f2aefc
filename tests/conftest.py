"""Shared fixtures: the tiny Phi-3 model and the tone data set, built once per test session."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "tone-classification"
sys.path.insert(0, str(DEMO))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tone_rows() -> list[dict[str, str]]:
    from make_dataset import make_rows

    return make_rows(240, seed=42)


@pytest.fixture(scope="session")
def tone_data(tmp_path_factory: pytest.TempPathFactory, tone_rows: list[dict[str, str]]) -> Path:
    from make_dataset import write_jsonl

    return write_jsonl(tone_rows, tmp_path_factory.mktemp("data") / "tone.jsonl")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, tone_rows: list[dict[str, str]]) -> Path:
    """A tiny Phi-3 (random weights, BPE trained on the tone phrases). Tests must not modify it."""
    from orchestrator.passes.tiny_model import build_tiny_phi3

    texts = [f"{r['phrase']} {r['tone']}" for r in tone_rows]
    return build_tiny_phi3(tmp_path_factory.mktemp("models") / "tiny-phi3", texts=texts)


def tone_data_config(tone_data: Path, name: str = "tone") -> dict[str, Any]:
    """The json form of a data config over the tone file, as the engine puts it into a Job."""
    return {
        "name": name,
        "type": "HuggingfaceContainer",
        "load_dataset_config": {"data_name": "json", "data_files": str(tone_data), "split": "train"},
        "pre_process_data_config": {"text_template": "### Text: {phrase}\n### The tone is:\n{tone}"},
    }


def demo_workflow() -> dict[str, Any]:
    """The embedded default workflow (jobs/tone-classification/config.json) as a dict."""
    return copy.deepcopy(json.loads((DEMO / "config.json").read_text()))


@pytest.fixture
def workflow_factory(tiny_model: Path, tone_data: Path, tmp_path: Path):
    """Build a runnable copy of the demo workflow in tmp_path: (overrides) -> path of config.json."""

    def make(max_steps: int = 20, evaluator: bool = False, passes: list[str] | None = None, **engine: Any) -> Path:
        wf = demo_workflow()
        wf["input_model"]["config"]["hf_config"]["model_name"] = str(tiny_model)
        wf["data_configs"][0]["load_dataset_config"]["params"]["data_files"] = str(tone_data)
        wf["passes"]["lora"]["config"]["training_args"].update(max_steps=max_steps, logging_steps=5, eval_steps=10)
        if passes is not None:
            wf["passes"] = {k: v for k, v in wf["passes"].items() if k in passes}
        if not evaluator:
            wf["engine"].pop("evaluator", None)
        wf["engine"].update(cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "out"), **engine)
        path = tmp_path / "config.json"
        path.write_text(json.dumps(wf, indent=2))
        return path

    return make
