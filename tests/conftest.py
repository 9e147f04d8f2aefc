"""Shared fixtures: the tiny Phi-3 model and the tone data set, built once per test session."""

from __future__ import annotations

import atexit
import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "tone-classification"
sys.path.insert(0, str(DEMO))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# No test may reach the real hub: the default endpoint is a closed loopback port (connection refused at once);
# tests that load from a hub start tests/hub_standin and point HF_ENDPOINT at it (hub_env).
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="orch-tests-hf-")  # never the developer's own HF cache
atexit.register(shutil.rmtree, os.environ["HF_HOME"], True)
# orch's machine-level memos (config-vs-weights checks, Docker image probes) for this session only: shared by the
# session's in-process and subprocess runs, never the developer's ~/.cache/orch.
os.environ["ORCH_HOME"] = tempfile.mkdtemp(prefix="orch-tests-home-")
atexit.register(shutil.rmtree, os.environ["ORCH_HOME"], True)
HUB_TOKEN = "hf_standin_private_token_7c1e"  # a fake value the stand-in accepts for its private repos


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
    from orchestrator.passes.models.tiny_model import build_tiny_phi3

    texts = [f"{r['phrase']} {r['tone']}" for r in tone_rows]
    return build_tiny_phi3(tmp_path_factory.mktemp("models") / "tiny-phi3", texts=texts)


def run_triton_interpreted(script: str, out: Path, timeout: int) -> dict[str, Any]:
    """Run tests/`script` in a subprocess under Triton's interpreter (TRITON_INTERPRET=1 must be set before triton is
    imported; the pinned Triton lives in .cache/triton-interpret, not in the venv) and load what it saved to `out`."""
    import subprocess

    import torch

    site = REPO / ".cache" / "triton-interpret"
    if not (site / ".orch-version").is_file():
        pytest.fail(f"{site} is missing: run `make setup` (scripts/setup-triton-interpret.sh installs it)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(site)]),
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    proc = subprocess.run([sys.executable, str(REPO / "tests" / script), str(out)], env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = torch.load(out, weights_only=False)
    assert res["triton"] == (site / ".orch-version").read_text().strip()
    return res


def saved_activation_bytes(forward: Any, exclude: Any = ()) -> int:
    """Bytes of the distinct storages autograd keeps for the backward while `forward()` runs, the storages of the
    tensors in `exclude` (a model's parameters: they exist anyway) left out, as they are after the forward (a
    fused layer's first forward may give a frozen weight new storage: k_concat's wide buffer)."""
    import torch

    params = list(exclude)
    seen: dict[int, int] = {}

    def pack(t: Any) -> Any:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    skip = {t.untyped_storage().data_ptr() for t in params}
    return sum(n for ptr, n in seen.items() if ptr not in skip)


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


@pytest.fixture(scope="session")
def hub(tiny_model: Path) -> Any:
    """The hub stand-in serving every model and dataset the corpus and tests name (tests/hub_standin), plus a
    private repo; fails the session's tests on any route the clients called that it does not serve."""
    from tests.hub_standin import serve_defaults, start_hub
    from tests.hub_standin.repos import folder_files

    with start_hub() as h:
        h.tokens.add(HUB_TOKEN)
        h.shas = serve_defaults(h, tiny_model)
        h.add_repo("acme-corp/private-phi3", folder_files(tiny_model), private=True)
        yield h
        assert h.unknown_requests == [], f"clients called routes the hub stand-in does not serve: {h.unknown_requests}"


def hub_env(hub: Any, hf_home: Path, *, token: str | None = None, offline: bool = False) -> dict[str, str]:
    """The environment of a subprocess that reads the hub stand-in with its own HF cache (HF_HOME)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1" if offline else "0",
               PYTHONPATH=str(REPO), HF_HUB_DISABLE_TELEMETRY="1")  # fmt: skip
    if token:
        env["HF_TOKEN"] = token
    return env
