"""Data-parallel LoRA: the torchrun launch (2 ranks, gloo on CPU) trains the same adapter as one process.

Both runs go through LocalSystem and the one entry point; the 2-rank run uses half the per-device batch, so the
global batches are identical (sequential sampler, dropout 0, same seed): the adapters must agree to float32
round-off. Measured on the tiny Phi-3, 4 AdamW steps at lr 1e-2: max |diff| ~1e-6 (weights move ~6e-2).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from orchestrator.core.job import Job, JobResult, JobState, ModelArtifact
from orchestrator.core.launch import resolve_processes, runner_command
from orchestrator.passes.training.lora.train import LoRAPass
from orchestrator.passes.training.merge import MergeAdapterWeightsPass
from orchestrator.schema.systems import LocalSystemConfig
from orchestrator.systems.local import LocalSystem
from tests.conftest import tone_data_config

TOLERANCE = 1e-4  # max |w_1rank - w_2rank| over every adapter tensor; measured ~1e-6
STEPS = 4


def dp_job(out: Path, tiny_model: Path, tone_data: Path, processes: int) -> Job:
    return Job(
        job_id=f"dp-{processes}",
        pass_name="lora",
        pass_type="LoRA",
        pass_config={
            "train_data_config": "tone",
            "target_modules": ["qkv_proj"],
            "lora_r": 4,
            "lora_dropout": 0.0,
            "training_args": {
                "max_steps": STEPS,
                "logging_steps": 1,
                "per_device_train_batch_size": 4 // processes,  # global batch 4 either way
                "gradient_accumulation_steps": 1,
                "learning_rate": 1e-2,
                "train_sampling_strategy": "sequential",
            },
        },
        model=ModelArtifact(format="hf", path=str(tiny_model)),
        data_configs={"tone": tone_data_config(tone_data)},
        output_dir=str(out),
        processes_per_node=processes,
    )


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, tone_data: Path) -> dict[int, Path]:
    """The same LoRA job with 1 and with 2 processes, each through LocalSystem (processes_per_node from it)."""
    root = tmp_path_factory.mktemp("dp")
    outs = {}
    for setting in (1, 2):
        system = LocalSystem(processes_per_node=setting)
        processes = system.processes_for(LoRAPass)
        assert processes == setting
        out = root / f"n{processes}"
        started = time.monotonic()
        handle = system.submit(dp_job(out, tiny_model, tone_data, processes))
        state = handle.wait(timeout=300)
        print(f"{processes} process(es): {state.value} in {time.monotonic() - started:.1f}s", file=sys.stderr)
        assert state == JobState.COMPLETED, handle.log_tail()
        outs[processes] = out
    return outs


def test_two_ranks_train_the_same_adapter_as_one(runs: dict[int, Path]) -> None:
    import torch
    from safetensors.torch import load_file

    one = load_file(runs[1] / "adapter" / "adapter_model.safetensors")
    two = load_file(runs[2] / "adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys() and len(one) == 4  # lora_A / lora_B of qkv_proj in both layers
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    moved = max(one[k].abs().max().item() for k in one if "lora_B" in k)  # B starts at zero
    print(f"adapter max |diff| = {diff:.3g} (B weights reach {moved:.3g})", file=sys.stderr)
    assert moved > 100 * TOLERANCE  # the comparison means something: training moved the weights
    assert diff <= TOLERANCE
    r1, r2 = JobResult.read(runs[1]), JobResult.read(runs[2])
    assert r1.status == r2.status == JobState.COMPLETED
    assert r1.metrics["world_size"] == 1.0 and r2.metrics["world_size"] == 2.0
    assert r1.metrics["train_steps"] == r2.metrics["train_steps"] == STEPS
    assert r1.metrics["train_tokens"] == r2.metrics["train_tokens"]  # the same global batches were seen
    assert r2.metrics["train_loss"] == pytest.approx(r1.metrics["train_loss"], rel=1e-5)
    assert torch.isfinite(torch.tensor(r2.metrics["train_loss"]))


def test_rank_zero_alone_writes_result_and_events(runs: dict[int, Path]) -> None:
    out1, out2 = runs[1], runs[2]
    # the same files as a one-process run: no per-rank result, event stream or checkpoint left behind
    assert sorted(p.name for p in out2.iterdir()) == sorted(p.name for p in out1.iterdir())
    ev1, ev2 = events(out1), events(out2)
    statuses = [e["status"] for e in ev2 if e["type"] == "status"]
    assert statuses == ["Running", "Completed"]  # one stream: a second rank would double these
    assert [e for e in ev2 if e["type"] == "param" and e["name"] == "world_size"][0]["value"] == "2"
    for kind in ("progress", "metric"):
        assert sum(e["type"] == kind for e in ev2) == sum(e["type"] == kind for e in ev1)
    assert "world_size=2" in (out2 / "job.log").read_text()
    assert not [e for e in ev1 if e["type"] == "param" and e["name"] == "world_size"]


def test_a_pass_without_data_parallel_refuses_ranks_and_fails_once(tmp_path: Path, tiny_model: Path) -> None:
    """Systems never give such a pass N > 1; if a job says so anyway, rank 0 reports why and torchrun fails."""
    job = Job(
        job_id="merge-dp",
        pass_name="merge",
        pass_type="MergeAdapterWeights",
        model=ModelArtifact(format="hf_adapter", path=str(tiny_model), adapter_path=str(tiny_model)),
        output_dir=str(tmp_path / "out"),
        processes_per_node=2,
    )
    handle = LocalSystem().submit(job)
    assert handle.wait(timeout=120) == JobState.FAILED
    result = JobResult.read(tmp_path / "out")
    assert result.status == JobState.FAILED and "does not run data-parallel" in (result.error or "")


def test_runner_command_one_code_path() -> None:
    job = Job(job_id="j", pass_name="p", pass_type="LoRA", output_dir="/o")
    assert runner_command(job, "py") == ["py", "-m", "orchestrator.runner", "--job", "/o/job.json"]
    two = runner_command(job.model_copy(update={"processes_per_node": 2}), "py", "/c/job.docker.json")
    assert two[:8] == ["py", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1", "--standalone"]
    assert two[-6:] == ["--max_restarts", "0", "-m", "orchestrator.runner", "--job", "/c/job.docker.json"]
    multi = job.model_copy(update={"processes_per_node": 4, "nodes": 2})
    with pytest.raises(ValueError, match="rendezvous"):
        runner_command(multi, "py")
    cmd = runner_command(multi, "py", rdzv_endpoint="node0:29400")
    assert "--standalone" not in cmd and cmd[cmd.index("--rdzv_endpoint") + 1] == "node0:29400"


def test_processes_per_node_setting() -> None:
    assert LocalSystemConfig().processes_per_node == "auto"
    assert LocalSystemConfig(processes_per_node=2).processes_per_node == 2
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        LocalSystemConfig(processes_per_node=0)
    assert LocalSystem(processes_per_node=3).processes_for(MergeAdapterWeightsPass) == 1  # not data-parallel
    assert LocalSystem(processes_per_node="auto").processes_for(LoRAPass) == 1  # cpu accelerators
    assert resolve_processes("auto", [{"device": "cpu"}], data_parallel=True) == 1
