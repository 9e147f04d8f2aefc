"""The tiny workflow with `--host docker --target docker` on a real Docker engine, run twice: the second run
builds no image and reruns no pass. Outputs belong to the caller."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker
REPO = Path(__file__).resolve().parents[1]


def env_images() -> set[str]:
    from orchestrator.systems.docker.images import list_environments

    return {row["id"] for row in list_environments()}


def test_workflow_in_containers_twice(tmp_path: Path, workflow_factory) -> None:
    cfg = workflow_factory(max_steps=4, evaluator=True)
    wf = json.loads(cfg.read_text())
    wf["evaluators"]["tone_eval"]["metrics"] = wf["evaluators"]["tone_eval"]["metrics"][:2]  # keep it short
    cfg.write_text(json.dumps(wf))
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "--config", str(cfg), "--host", "docker", "--target",
           "docker", "--no-tracking"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=1800)
    assert first.returncode == 0, first.stderr[-4000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [p["system"] for p in manifest["passes"]] == ["docker"] * 4
    assert not any(p["cached"] for p in manifest["passes"])
    assert manifest["final_model"]["format"] == "onnx_genai"
    assert 0.0 <= manifest["passes"][-1]["metrics"]["accuracy-accuracy"] <= 1.0
    # every file the containers wrote is owned by the caller, not root-in-a-container
    for entry in (tmp_path / "cache" / "runs").iterdir():
        for f in entry.rglob("*"):
            assert f.stat().st_uid == os.getuid(), f

    images_before = env_images()
    second = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert all(p["cached"] for p in manifest["passes"])  # no pass reran
    assert env_images() == images_before  # no image was built
    assert "Step " not in second.stderr  # no docker build output either
