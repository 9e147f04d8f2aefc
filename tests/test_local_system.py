"""LocalSystem on real jobs: another interpreter, cancel of the whole process group, a failure's cause."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from orchestrator.core.job import Job, JobResult, JobState, ModelArtifact
from orchestrator.systems.base import SystemFailure
from orchestrator.systems.local import LocalSystem
from tests.conftest import tone_data_config


def lora_job(tmp_path: Path, tiny_model: Path, tone_data: Path, max_steps: int) -> Job:
    return Job(
        job_id="lora-test",
        pass_name="lora",
        pass_type="LoRA",
        pass_config={
            "train_data_config": "tone",
            "target_modules": ["qkv_proj"],
            "lora_r": 4,
            "training_args": {"max_steps": max_steps, "logging_steps": 1, "per_device_train_batch_size": 2},
        },
        model=ModelArtifact(format="hf", path=str(tiny_model)),
        data_configs={"tone": tone_data_config(tone_data)},
        output_dir=str(tmp_path / "out"),
    )


def test_python_environment_path_runs_the_job_under_that_interpreter(tmp_path, tiny_model, tone_data):
    venv = Path(sys.executable).parent.parent  # a venv folder, as a user would give it
    system = LocalSystem(python_environment_path=str(venv))
    assert system.python == str(venv / "bin" / "python")
    handle = system.submit(lora_job(tmp_path, tiny_model, tone_data, max_steps=2))
    assert handle.wait(timeout=600) == JobState.COMPLETED
    result = JobResult.read(tmp_path / "out")
    assert result.model is not None and result.model.format == "hf_adapter"
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()


def test_bad_python_environment_path_is_a_clear_error(tmp_path):
    with pytest.raises(SystemFailure, match="python_environment_path"):
        LocalSystem(python_environment_path=str(tmp_path / "nope"))


def test_cancel_kills_the_process_group(tmp_path, tiny_model, tone_data):
    handle = LocalSystem().submit(lora_job(tmp_path, tiny_model, tone_data, max_steps=5000))
    events = tmp_path / "out" / "events.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (events.exists() and '"train_loss"' in events.read_text()):  # training
        time.sleep(0.2)
    pid = handle._pid()
    assert handle.cancel() is True
    assert handle.status() == JobState.CANCELED
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # no process of the job's group is left
    assert handle.cancel() is False  # idempotent


def test_a_failing_job_reports_its_cause(tmp_path, tone_data):
    job = lora_job(tmp_path, tmp_path / "missing-model", tone_data, max_steps=2)
    handle = LocalSystem().submit(job)
    assert handle.wait(timeout=300) == JobState.FAILED
    result = JobResult.read(tmp_path / "out")
    assert result.status == JobState.FAILED and result.error
    assert any("error" in line.lower() for line in handle.logs())
