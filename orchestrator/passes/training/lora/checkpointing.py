"""Resumable training for the LoRA / QLoRA passes: when to checkpoint, where, and how an attempt resumes.

The HF Trainer does the saving and the restoring (adapter, optimizer, scheduler, RNG states, trainer state with
the data position); this module decides when it saves, marks each checkpoint complete once the Trainer has
written all of it (the contract in orchestrator.core.checkpoints), keeps the newest K, and on start picks the
newest complete checkpoint of `Job.checkpoint_dir` to resume from.

When: the training args' own `save_strategy` / `save_steps` (HF's and Olive's words) when they give one; else
orch's keys `checkpoint_every_minutes` (default 10) and `checkpoint_every_steps`. Every checkpoint is taken at a
logging step (a save forces a log first), so the loss accumulated since the last log is never lost with the
process: a resumed run logs the same loss curve and reports the whole run's train_loss.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.checkpoints import (
    DEFAULT_KEEP,
    latest_complete,
    mark_complete,
    prune,
    remove_incomplete,
)

# Trainer log keys -> the metric names the pass reports (metrics_callback uses the same table)
LOG_METRICS = {
    "loss": "train_loss",
    "eval_loss": "eval_loss",
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
}
# Settings that decide when and how checkpoints are written, never what is trained: kept out of the cache key
# (changing them must neither miss the cache nor orphan the checkpoints of a killed run of the same pass).
ORCH_CHECKPOINT_KEYS = ("checkpoint_every_minutes", "checkpoint_every_steps", "checkpoints_kept")
TRAINER_SAVE_KEYS = ("save_strategy", "save_steps", "save_total_limit", "save_only_model", "save_on_each_node")


@dataclass(frozen=True)
class CheckpointPolicy:
    """Where checkpoints go and when orch (rather than the Trainer's save_strategy) asks for one."""

    root: Path
    durable: bool  # root outlives the attempt (Job.checkpoint_dir): resume is possible
    every_minutes: float | None
    every_steps: int | None
    keep: int

    @property
    def orch_driven(self) -> bool:
        return self.every_minutes is not None or self.every_steps is not None


def key_training_args(training_args: dict[str, Any]) -> dict[str, Any]:
    """training_args as they enter the cache key: without the save settings, unless load_best_model_at_end makes
    them choose which checkpoint becomes the adapter."""
    if training_args.get("load_best_model_at_end"):
        return dict(training_args)
    return {k: v for k, v in training_args.items() if k not in (*TRAINER_SAVE_KEYS, "resume_from_checkpoint")}


def checkpoint_policy(
    config: Any, args: dict[str, Any], checkpoint_dir: str | None, out_dir: Path
) -> tuple[CheckpointPolicy, list[str]]:
    """Adjust the SFTConfig kwargs `args` (user's training args, normalized) for resumable checkpoints; return the
    policy and notes for the log. The Trainer keeps every checkpoint (save_total_limit None): orch prunes only
    after the newest one is marked complete, so a kill mid-save never leaves zero complete checkpoints."""
    notes: list[str] = []
    durable = checkpoint_dir is not None
    root = Path(checkpoint_dir) if durable else out_dir / "checkpoints"
    if "save_steps" in args and "save_strategy" not in args:
        args["save_strategy"] = "steps"  # transformers' own default strategy for a given save_steps
    user_strategy = args.get("save_strategy")
    limit = args.pop("save_total_limit", None)
    keep = max(1, int(limit)) if limit is not None else int(getattr(config, "checkpoints_kept", DEFAULT_KEEP))
    args["save_total_limit"] = None
    if args.pop("save_only_model", False):
        notes.append("training_args.save_only_model ignored: a resume needs the optimizer, scheduler and RNG state")
    args.pop("save_on_each_node", None)  # one shared folder: rank 0 writes it
    args["output_dir"] = str(root)
    set_fields = getattr(config, "model_fields_set", set())
    every_minutes = getattr(config, "checkpoint_every_minutes", None)
    every_steps = getattr(config, "checkpoint_every_steps", None)
    if user_strategy is not None:
        # the training args decide; orch's keys add saves only where the user set them too
        every_minutes = every_minutes if "checkpoint_every_minutes" in set_fields else None
        every_steps = every_steps if "checkpoint_every_steps" in set_fields else None
        if str(user_strategy) == "no" and durable and every_minutes is None and every_steps is None:
            notes.append("training_args.save_strategy 'no': no checkpoints, a killed run starts again at step 0")
    else:
        args["save_strategy"] = "no"  # orch asks for each save (CheckpointCallback)
    if not durable:
        every_minutes = every_steps = None  # nothing would outlive the attempt: no saves of orch's own
    return CheckpointPolicy(root, durable, every_minutes, every_steps, keep), notes


def find_resume_point(policy: CheckpointPolicy, *, writer: bool) -> tuple[int, Path] | None:
    """The newest complete checkpoint to resume from (None: start at step 0). The writer (rank 0, the key's one
    process holding its lock) first deletes interrupted saves, which are never read."""
    if not policy.durable:
        return None
    if writer:
        remove_incomplete(policy.root)
    return latest_complete(policy.root)


def logged_history(checkpoint: Path) -> list[tuple[str, float, int]]:
    """(metric, value, step) the run logged up to the checkpoint (its trainer_state.json log_history)."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return []
    out = []
    for entry in state.get("log_history", []):
        step = entry.get("step")
        if not isinstance(step, int):
            continue
        for key, name in LOG_METRICS.items():
            value = entry.get(key)
            if isinstance(value, (int, float)) and value == value and abs(value) != float("inf"):
                out.append((name, float(value), step))
    return out


def loss_sum_before(history: list[tuple[str, float, int]]) -> float:
    """Sum of per-step training losses up to the checkpoint, from the logged window means (each checkpoint is
    at a logging step, so the windows cover every step up to it)."""
    total, last = 0.0, 0
    for _name, value, step in sorted((h for h in history if h[0] == "train_loss"), key=lambda h: h[2]):
        total += value * (step - last)
        last = step
    return total


def _agree(flag: bool) -> bool:
    """Rank 0's decision on every rank (a time-based save must happen on all ranks or none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [flag]
        dist.broadcast_object_list(box, src=0)
        return bool(box[0])
    return flag


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def checkpoint_callback(policy: CheckpointPolicy, info: Any) -> Any:
    """A TrainerCallback: asks for orch's timed / every-N-steps saves, puts every save on a logging step, marks
    each checkpoint complete after the Trainer wrote all of it, and keeps the newest `policy.keep`."""
    from transformers import TrainerCallback

    class CheckpointCallback(TrainerCallback):
        def __init__(self) -> None:
            self.last_save = time.monotonic()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.last_save = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if policy.orch_driven and state.global_step < state.max_steps:  # the last step's result is saved anyway
                due = bool(policy.every_steps) and state.global_step % int(policy.every_steps or 1) == 0
                if policy.every_minutes is not None:
                    due = _agree(due or time.monotonic() - self.last_save >= policy.every_minutes * 60)
                if due:
                    control.should_save = True
            if control.should_save:
                control.should_log = True  # drain the loss accumulated since the last log into the history

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if control.should_save:
                control.should_log = True

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _barrier()  # every rank has written its part (rng_state_<rank>.pth) before the marker says "whole"
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    mark_complete(folder, state.global_step)
                    prune(policy.root, policy.keep, protect=state.best_model_checkpoint)
                    if policy.durable:
                        info(f"checkpoint at step {state.global_step}: {folder.name} (a rerun resumes here)")
            self.last_save = time.monotonic()

    return CheckpointCallback()
