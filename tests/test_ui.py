"""`orch ui`: the MLflow UI on a workflow's run, looked at by a real browser (headless Chromium, Debian package)
against a real local `mlflow server`. Screenshots are kept in build/test-artifacts/ui/ (gitignored)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from orchestrator.cli import render as ui
from orchestrator.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "build" / "test-artifacts" / "ui"


@pytest.fixture(scope="module")
def chromium() -> str:
    """No skip: a machine without Chromium fails here with the install hint."""
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.fail(f"chromium is not installed: {ui.CHROMIUM_HINT}")
    return ui.chromium_binary()


@pytest.fixture
def lora_run(tmp_path: Path) -> tuple[Path, str]:
    """A run recorded the way the engine records a LoRA pass (orch's Tracker: the loss per logging step, the
    pass's final metrics) in its own sqlite store, and the manifest's mlflow section that points at it. A whole
    `orch run` took 70 s on 2 busy cores, past this test's budget; tests/test_engine.py covers what it logs."""
    import json

    from orchestrator.engine.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracker = Tracker(uri, "orch", "tone-classification")
    for step, loss in zip((5, 10, 15, 20), (5.1, 3.2, 2.0, 1.4), strict=True):
        tracker.log_metric("lora/train_loss", loss, step)
    tracker.log_metric("lora/eval_loss", 2.4, 10)
    for name, value in {"train_loss": 2.9, "eval_loss": 1.6, "tokens_per_s": 88.0, "train_steps": 20}.items():
        tracker.log_metric(f"lora/{name}", value)
    tracker.end("FINISHED")
    manifest = tmp_path / "out" / "manifest.json"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"mlflow": {"tracking_uri": uri, "run_id": tracker.run_id, "model_uri": None}}))
    return manifest, uri


def test_ui_shows_the_loss_chart_and_the_metrics(
    chromium: str, lora_run: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run looked at in two pages: the loss chart and the run overview with its metrics."""
    manifest, uri = lora_run
    recorded_uri, run_id = ui.mlflow_run_ref(manifest)
    assert recorded_uri == uri
    experiment = ui.experiment_of(uri, run_id)
    keys = ui.loss_metric_keys(uri, run_id)
    assert keys == ["lora/eval_loss", "lora/train_loss"]  # found in the store, whatever the pass is called
    proc, base = ui.start_mlflow_ui(uri, log_path=tmp_path / "mlflow-ui.log", screenshot=True)
    try:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        chart_png = ARTIFACTS / "loss-chart.png"
        dom = ui.capture_page(ui.metric_page_url(base, experiment, run_id, keys), chart_png)
        assert "js-plotly-plot" in dom, "no chart was rendered"
        assert "lora/train_loss" in dom and "lora/eval_loss" in dom
        # MLflow's assistant panel (it opens itself over a quarter of the page on localhost) is not in the picture
        assert "mlflow assistant" not in dom.lower() and "ask a question" not in dom.lower()
        # the curve: plotly draws one trace line with a point per logged step (5, 10, 15, 20)
        lines = re.findall(r"<path[^>]*js-line[^>]*>", dom)
        paths = [m.group(1) for tag in lines if (m := re.search(r'\bd="([^"]+)"', tag))]
        assert paths and max(p.count("L") for p in paths) >= 3, "the loss chart has no line of several steps"
        assert chart_png.stat().st_size > 20_000

        page_png = ARTIFACTS / "run-overview.png"
        page = ui.run_page_url(base, experiment, run_id, tab="overview")
        dom = ui.capture_page(page, page_png, size="1400,2400")  # tall: the metrics table is not virtualized away
        for name in ("lora/train_loss", "lora/eval_loss", "lora/tokens_per_s"):
            assert f">{name}<" in dom, f"metric {name} is not on the run page"
        assert run_id in dom and "Finished" in dom
    finally:
        ui.stop_mlflow_ui(proc)
    assert proc.poll() is not None

    # the command's errors are one line (`orch ui --screenshot PNG` runs the same functions as above)
    assert run_cli(["ui", "--manifest", str(tmp_path / "nothing.json")]) == 2
    err = capsys.readouterr().err
    assert "orch: error: ui:" in err and "run the workflow first" in err and "Traceback" not in err


def test_screenshot_without_chromium_says_so_before_starting_a_server(lora_run: tuple[Path, str], tmp_path: Path):
    """Chromium is optional: without it, one line naming it (and --plot), exit 2, no server started."""
    import os
    import subprocess
    import sys

    manifest, _ = lora_run
    empty_path, tmp = tmp_path / "bin", tmp_path / "tmp"
    empty_path.mkdir()  # no chromium on PATH
    tmp.mkdir()  # where a started MLflow server would write its log (orch-mlflow-ui-<port>.log)
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "ui", "--manifest", str(manifest), "--screenshot", "x.png"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PATH": str(empty_path), "TMPDIR": str(tmp), "PYTHONPATH": str(REPO), "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "chromium is not installed" in proc.stderr and "--plot" in proc.stderr
    assert not (tmp_path / "x.png").exists()
    assert not list(tmp.glob("orch-mlflow-ui-*.log"))  # said before any server was started
