"""Training that resumes: a real `orch run` killed with SIGKILL mid-LoRA continues from its last complete
checkpoint, ends with the adapter an uninterrupted run trains, and logs every step once (real torch / peft / trl
on the tiny Phi-3, real MLflow on sqlite)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from safetensors.torch import load_file

from orchestrator.core.cache import Cache
from orchestrator.core.checkpoints import COMPLETE_MARKER, complete_checkpoints, latest_complete, mark_complete
from orchestrator.core.job import Job, ModelArtifact
from orchestrator.passes.base import PassContext
from orchestrator.passes.training.lora.train import LoRAConfig, LoRAPass

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "### Text: {phrase}\n### The tone is:\n{tone}"


def orch_cmd(cfg: Path, uri: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "run", "--config", str(cfg), "--tracking-uri", uri]


def orch_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}


def resumable_workflow(workflow_factory, folder: Path) -> Path:
    """The demo's LoRA alone, 40 steps with dropout and a decaying LR (RNG and scheduler state both matter), a
    checkpoint every 5 steps (orch's key), in a folder of its own (cache, output)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = workflow_factory(max_steps=40, passes=["lora"])
    wf = json.loads(cfg.read_text())
    lora = wf["passes"]["lora"]["config"]
    lora.update(lora_dropout=0.1, checkpoint_every_steps=5)
    lora["training_args"].update(lr_scheduler_type="linear", eval_steps=20)
    wf["engine"].update(cache_dir=str(folder / "cache"), output_dir=str(folder / "out"))
    path = folder / "config.json"
    path.write_text(json.dumps(wf, indent=2))
    return path


def adapter_tensors(out: Path) -> dict:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def mlflow_run_id(stdout: str) -> str:
    m = re.search(r"mlflow: run ([0-9a-f]{32})", stdout)
    assert m, stdout[-2000:]
    return m.group(1)


def test_kill_9_mid_lora_resumes_from_the_last_checkpoint(tmp_path: Path, workflow_factory) -> None:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    killed = resumable_workflow(workflow_factory, tmp_path / "killed")
    partial_root = tmp_path / "killed" / "cache" / "partial"
    proc = subprocess.Popen(
        orch_cmd(killed, uri), cwd=killed.parent, env=orch_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 600  # a guard against a hang, not a timing assert
    while time.time() < deadline and not list(partial_root.glob(f"*/checkpoints/checkpoint-*/{COMPLETE_MARKER}")):
        assert proc.poll() is None, "orch run ended before its first checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the CLI only: its job dies with it (PR_SET_PDEATHSIG), as after kill -9
    proc.wait()
    cache = Cache(tmp_path / "killed" / "cache")
    assert cache.entries() == []  # killed mid-LoRA: no entry
    [partial] = list(partial_root.iterdir())
    first = latest_complete(partial / "checkpoints")
    assert first is not None and first[0] >= 5

    rerun = subprocess.run(orch_cmd(killed, uri), cwd=killed.parent, env=orch_env(), capture_output=True,
                           text=True, timeout=900)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    m = re.search(r"lora: resumed from step (\d+)", rerun.stderr)  # the progress console (stderr)
    assert m, rerun.stderr[-3000:]
    resumed = int(m.group(1))
    assert resumed >= first[0] > 0  # the newest complete checkpoint when the rerun started
    [entry] = cache.entries()
    assert entry.key == partial.name and not partial.exists()  # committed: its checkpoints are gone
    assert entry.meta["resumed_from_step"] == resumed and entry.result.metrics["resumed_from_step"] == resumed
    manifest = json.loads((tmp_path / "killed" / "out" / "manifest.json").read_text())
    assert manifest["passes"][0]["resumed_from_step"] == resumed

    straight = resumable_workflow(workflow_factory, tmp_path / "straight")
    plain = subprocess.run(orch_cmd(straight, uri), cwd=straight.parent, env=orch_env(), capture_output=True,
                           text=True, timeout=900)  # fmt: skip
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "resumed from step" not in plain.stdout + plain.stderr
    [plain_entry] = Cache(tmp_path / "straight" / "cache").entries()
    assert plain_entry.key == entry.key  # same pass, same key: the checkpoint settings are not in it
    assert plain_entry.meta["resumed_from_step"] is None

    # the adapter equals the uninterrupted run's: data order, dropout RNG, optimizer and LR schedule restored
    a, b = adapter_tensors(tmp_path / "killed" / "out"), adapter_tensors(tmp_path / "straight" / "out")
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-5, name
    assert entry.result.metrics["train_loss"] == pytest.approx(plain_entry.result.metrics["train_loss"], rel=1e-5)

    # MLflow: the resumed run's loss history is whole, each step once, equal to the uninterrupted run's
    client = mlflow.MlflowClient(uri)
    resumed_hist = client.get_metric_history(mlflow_run_id(rerun.stdout), "lora/train_loss")
    plain_hist = client.get_metric_history(mlflow_run_id(plain.stdout), "lora/train_loss")
    steps = [h.step for h in resumed_hist]
    assert len(steps) == len(set(steps))
    assert sorted(steps) == sorted(h.step for h in plain_hist) and min(steps) == 1 and max(steps) == 40
    by_step = {h.step: h.value for h in plain_hist}
    for h in resumed_hist:
        assert h.value == pytest.approx(by_step[h.step], rel=1e-5), h.step
    # the entry's own record (events.jsonl, read for training.png) is whole too
    events = [json.loads(line) for line in (entry.path / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "resume"] == [resumed]
    logged = [e["step"] for e in events if e["type"] == "metric" and e["name"] == "train_loss"]
    assert sorted(logged) == sorted(steps)


# ---- the pass on its own: what it reads and writes in Job.checkpoint_dir -----------------------------------


def tone_texts() -> list[str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_dataset", REPO / "jobs/tone-classification/make_dataset.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return [TEMPLATE.format(**r) for r in mod.make_rows(48)]


def train(out: Path, ckpt: Path, model: Path, **config) -> tuple[list[dict], object]:
    from datasets import Dataset

    training_args = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 5e-3,
                     "logging_steps": 2, "max_steps": 10,
                     **config.pop("training_args", {})}  # fmt: skip
    cfg = LoRAConfig(train_data_config="tone", lora_r=4, training_args=training_args, **config)
    job = Job(job_id="t", pass_name="lora", pass_type="LoRA", model=ModelArtifact(format="hf", path=str(model)),
              output_dir=str(out), checkpoint_dir=str(ckpt))  # fmt: skip
    spec = SimpleNamespace(max_len=64, pad_to_max_len=False, corpus_join=False, use_attention_mask=False,
                           strategy="line-by-line", max_samples=None, random_seed=None, stride=None)  # fmt: skip
    texts = tone_texts()
    result = LoRAPass().train(cfg, ModelArtifact(format="hf", path=str(model)), PassContext(job=job, out_dir=out),
                              Dataset.from_dict({"text": texts}), None, spec)  # fmt: skip
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    return events, result


def test_an_incomplete_checkpoint_is_ignored_and_removed(tmp_path: Path, tiny_model: Path) -> None:
    ckpt = tmp_path / "ckpt"
    broken = ckpt / "checkpoint-6"  # a save killed half-way: files, but no marker
    broken.mkdir(parents=True)
    (broken / "trainer_state.json").write_text('{"global_step": 6, "log_his')
    events, result = train(tmp_path / "out", ckpt, tiny_model, checkpoint_every_steps=4)
    assert not [e for e in events if e["type"] == "resume"]  # started at step 0
    assert "resumed_from_step" not in result.metrics
    assert not broken.exists()
    # orch's every-4-steps saves, each complete, the newest 2 kept (the last step is saved as the adapter)
    assert [step for step, _ in complete_checkpoints(ckpt)] == [4, 8]

    # a complete one is taken; an incomplete newer one beside it is not
    newer = ckpt / "checkpoint-9"
    newer.mkdir()
    events, result = train(tmp_path / "out2", ckpt, tiny_model, checkpoint_every_steps=4)
    assert [e["step"] for e in events if e["type"] == "resume"] == [8]
    assert result.metrics["resumed_from_step"] == 8 and not newer.exists()
    losses = [e["step"] for e in events if e["type"] == "metric" and e["name"] == "train_loss"]
    assert sorted(losses) == sorted(set(losses)) and losses[-1] == 10  # replayed 1..8, then trained 9..10


def test_save_strategy_and_save_steps_of_the_training_args_are_honoured(tmp_path: Path, tiny_model: Path) -> None:
    ckpt = tmp_path / "a"
    train(tmp_path / "out-a", ckpt, tiny_model, training_args={"save_steps": 3})  # save_strategy: steps implied
    # every 3 steps and at the end (transformers' rule for a save strategy), the newest 2 kept
    assert [step for step, _ in complete_checkpoints(ckpt)] == [9, 10]
    for _, folder in complete_checkpoints(ckpt):
        assert (folder / "optimizer.pt").is_file() and (folder / "rng_state.pth").is_file()

    ckpt = tmp_path / "b"
    train(tmp_path / "out-b", ckpt, tiny_model, training_args={"save_strategy": "steps", "save_steps": 4,
                                                               "save_total_limit": 1})  # fmt: skip
    assert [step for step, _ in complete_checkpoints(ckpt)] == [10]

    ckpt = tmp_path / "c"  # the user's "no" wins over orch's default timer...
    events, _ = train(tmp_path / "out-c", ckpt, tiny_model, training_args={"save_strategy": "no"})
    assert complete_checkpoints(ckpt) == []
    assert any("save_strategy 'no': no checkpoints" in e.get("message", "") for e in events)

    ckpt = tmp_path / "d"  # ...unless they also set orch's own key
    train(tmp_path / "out-d", ckpt, tiny_model, checkpoint_every_steps=2, training_args={"save_strategy": "no"})
    assert [step for step, _ in complete_checkpoints(ckpt)] == [6, 8]


def test_checkpoint_settings_stay_out_of_the_cache_key(tmp_path: Path, workflow_factory) -> None:
    from orchestrator.engine import Engine
    from orchestrator.olive import load_workflow

    def key(**change) -> str:
        wf = json.loads(workflow_factory(max_steps=40, passes=["lora"]).read_text())
        lora = wf["passes"]["lora"]["config"]
        lora["training_args"].update(change.pop("training_args", {}))
        lora.update(change)
        return Engine(load_workflow(wf, base_dir=tmp_path), tracking=False).plan()[0].key

    base = key()
    assert key(checkpoint_every_minutes=1, checkpoint_every_steps=3, checkpoints_kept=5) == base
    assert key(training_args={"save_strategy": "steps", "save_steps": 7, "save_total_limit": 1}) == base
    assert key(training_args={"learning_rate": 0.001}) != base
    # with load_best_model_at_end the save steps choose which checkpoint becomes the adapter: they count
    best = {"load_best_model_at_end": True, "eval_steps": 5}
    assert key(training_args={**best, "save_steps": 5}) != key(training_args={**best, "save_steps": 10})


def test_a_resumed_attempt_in_the_same_mlflow_run_logs_no_step_twice(tmp_path: Path) -> None:
    """An Azure ML requeue keeps its MLflow run: the replayed history and the steps redone after the checkpoint
    reach the run once (the engine's forwarding of events.jsonl)."""
    from orchestrator.engine.execute import _on_event
    from orchestrator.engine.steps import QuietReporter, Step
    from orchestrator.engine.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    step = Step("lora", "LoRA", {}, "host", "local")
    first = Tracker(uri, "resume", "wf")
    for s in range(1, 8):  # attempt 1 logged steps 1..7, its last checkpoint was at step 5
        _on_event(step, {"type": "metric", "name": "train_loss", "value": 10.0 - s, "step": s}, first, QuietReporter())
    second = Tracker(uri, "resume", "wf")
    second.run_id = first.run_id  # the requeued attempt writes into the same run
    _on_event(step, {"type": "resume", "step": 5}, second, QuietReporter())
    for s in range(1, 11):
        _on_event(step, {"type": "metric", "name": "train_loss", "value": 10.0 - s, "step": s}, second, QuietReporter())
    history = mlflow.MlflowClient(uri).get_metric_history(first.run_id, "lora/train_loss")
    assert sorted(h.step for h in history) == list(range(1, 11))
    assert step.resumed_from_step == 5


def test_marker_contract(tmp_path: Path) -> None:
    for n in (3, 6, 9):
        (tmp_path / f"checkpoint-{n}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name
    mark_complete(tmp_path / "checkpoint-3", 3)
    mark_complete(tmp_path / "checkpoint-6", 6)
    assert latest_complete(tmp_path) == (6, tmp_path / "checkpoint-6")
    assert json.loads((tmp_path / "checkpoint-6" / COMPLETE_MARKER).read_text())["step"] == 6
    assert latest_complete(tmp_path / "missing") is None


@pytest.mark.docker
def test_lora_in_a_container_checkpoints_into_the_mounted_folder_and_resumes(tmp_path: Path, tiny_model: Path) -> None:
    """DockerSystem mounts Job.checkpoint_dir read-write: a LoRA job's checkpoints land on the host, owned by the
    caller, and a second container of the same job resumes from them (the cpu-train image, built once by tag)."""
    from orchestrator.core.job import JobState
    from orchestrator.systems.docker.images import DEFAULT_BASE_IMAGE, build_base_image, build_environment
    from orchestrator.systems.docker.system import DockerSystem

    build_base_image(DEFAULT_BASE_IMAGE)
    build_environment("cpu-train", base_image=DEFAULT_BASE_IMAGE, on_line=lambda line: None)
    data = tmp_path / "tone.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in tone_texts()))
    ckpt = tmp_path / "partial" / "checkpoints"

    def job(n: int, max_steps: int) -> Job:
        return Job(
            job_id=f"resume-{n}", pass_name="lora", pass_type="LoRA",
            pass_config={"train_data_config": "tone", "lora_r": 4, "checkpoint_every_steps": 2,
                         "training_args": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                                           "max_steps": max_steps, "logging_steps": 2}},
            model=ModelArtifact(format="hf", path=str(tiny_model)),
            data_configs={"tone": {"name": "tone", "type": "HuggingfaceContainer",
                                   "load_dataset_config": {"data_name": "json", "data_files": str(data),
                                                           "split": "train"}}},
            data_files={"tone": str(data)},
            output_dir=str(tmp_path / f"out{n}"),
            checkpoint_dir=str(ckpt),
        )  # fmt: skip

    system = DockerSystem({"environment": "cpu-train"})
    first = system.submit(job(1, 5))
    assert first.wait(timeout=900) == JobState.COMPLETED, (tmp_path / "out1" / "job.log").read_text()[-3000:]
    assert [step for step, _ in complete_checkpoints(ckpt)] == [2, 4]  # written in the container, on the host
    assert all(p.stat().st_uid == os.getuid() for p in ckpt.rglob("*"))
    # a job of the same key whose first attempt stopped at step 4: the next container continues from there
    second = system.submit(job(2, 5))
    assert second.wait(timeout=900) == JobState.COMPLETED, (tmp_path / "out2" / "job.log").read_text()[-3000:]
    events = [json.loads(line) for line in (tmp_path / "out2" / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "resume"] == [4]
    assert "resumed from step 4" in (tmp_path / "out2" / "job.log").read_text()


def test_partial_folders_go_at_commit_and_at_clean_unless_their_run_is_alive(tmp_path: Path) -> None:
    from orchestrator.core.job import JobResult, JobState

    cache = Cache(tmp_path / "cache")
    with cache.staging("done") as stage:
        (cache.partial_dir("done") / "checkpoints" / "checkpoint-5").mkdir(parents=True)
        JobResult(job_id="j", pass_type="LoRA", status=JobState.COMPLETED).write(stage)
        cache.commit("done", stage, {})
    assert cache.get("done") is not None and not cache.partial_dir("done").exists()

    (cache.partial_dir("killed") / "checkpoints").mkdir(parents=True)  # a kill -9 left it: nobody holds the lock
    (cache.partial_dir("running") / "checkpoints").mkdir(parents=True)
    with cache.lock("running"):  # a live run of that key
        cache.clean()
        assert not cache.partial_dir("killed").exists()
        assert cache.partial_dir("running").exists()
