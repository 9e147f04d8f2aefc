"""The checkpoint contract: how a pass that can resume lays out its checkpoints in `Job.checkpoint_dir`.

    <checkpoint_dir>/checkpoint-<step>/          one complete training state (HF Trainer's own folder layout)
    <checkpoint_dir>/checkpoint-<step>/.orch-complete   written LAST, atomically: {"step": N, "completed_at": t}

A folder without the marker is a save that was interrupted (kill -9, preemption mid-write): it is never read and
is deleted by the next writer. Readers (the pass on its next attempt, a syncer uploading to a workspace) take only
complete checkpoints; the newest complete one is where a restarted attempt resumes. The folder lives under the
cache key (`<cache>/partial/<key>/checkpoints`), so a checkpoint never applies to another key, and it is removed
when the pass's entry commits.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from orchestrator.core.fs import atomic_write_text

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = ".orch-complete"
DEFAULT_KEEP = 2
_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    """N for a folder named checkpoint-N, else None."""
    m = _NAME.match(path.name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).is_file()


def checkpoints(root: Path | str | None) -> list[tuple[int, Path, bool]]:
    """(step, folder, complete) of every checkpoint-N folder under root, oldest step first."""
    if root is None or not Path(root).is_dir():
        return []
    found = []
    for path in Path(root).iterdir():
        step = checkpoint_step(path)
        if step is not None and path.is_dir():
            found.append((step, path, is_complete(path)))
    return sorted(found, key=lambda item: item[0])


def complete_checkpoints(root: Path | str | None) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints, oldest first: the only ones anything may read or upload."""
    return [(step, path) for step, path, done in checkpoints(root) if done]


def latest_complete(root: Path | str | None) -> tuple[int, Path] | None:
    """The newest complete checkpoint (where a restarted attempt resumes), or None."""
    done = complete_checkpoints(root)
    return done[-1] if done else None


def mark_complete(path: Path, step: int) -> Path:
    """Declare a checkpoint folder whole: call after every file of it is written (atomic: a reader sees the
    marker with its content or no marker)."""
    return atomic_write_text(
        path / COMPLETE_MARKER, json.dumps({"step": step, "completed_at": time.time()}, separators=(",", ":"))
    )


def remove_incomplete(root: Path | str | None) -> list[Path]:
    """Delete interrupted saves (folders without the marker); only the one writer of a key may call it."""
    removed = []
    for _, path, done in checkpoints(root):
        if not done:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def prune(root: Path | str | None, keep: int = DEFAULT_KEEP, protect: Path | str | None = None) -> list[Path]:
    """Keep the newest `keep` complete checkpoints (and `protect`, e.g. the best one); delete older complete
    ones and every incomplete one older than the newest complete one."""
    keep = max(1, keep)
    done = complete_checkpoints(root)
    if not done:
        return []
    newest = done[-1][0]
    kept = {path for _, path in done[-keep:]}
    protected = Path(protect).resolve() if protect else None
    removed = []
    for step, path, complete in checkpoints(root):
        if path in kept or (protected is not None and path.resolve() == protected):
            continue
        if complete or step < newest:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
