"""The code folder every Azure ML job carries: the orchestrator package + the job's own files (job.json, or the
driver's workflow.json), built deterministically under <cache>/aml-code/<hash>/ so the SDK, which looks its
content hash up first, uploads each distinct snapshot once."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

ORCH_PACKAGE = Path(__file__).resolve().parents[2]  # .../orchestrator (this file: orchestrator/systems/azureml/)
SNAPSHOT_SUFFIXES = (".py", ".typed", ".json", ".yaml", ".yml", ".txt")


def _package_files() -> list[tuple[str, bytes]]:
    files = []
    for p in sorted(ORCH_PACKAGE.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts and p.suffix in SNAPSHOT_SUFFIXES:
            files.append((f"orchestrator/{p.relative_to(ORCH_PACKAGE).as_posix()}", p.read_bytes()))
    return files


def code_snapshot(cache_dir: Path, extra: dict[str, bytes]) -> Path:
    """A folder holding the orchestrator package + `extra` files, named by its content hash; built once.

    Deterministic (sorted, no caches, fixed mtimes), so the SDK's content hash finds the earlier upload."""
    files = sorted(_package_files() + list(extra.items()))
    h = hashlib.sha256()
    for name, data in files:
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    digest = h.hexdigest()[:24]
    root = Path(cache_dir) / "aml-code"
    final = root / digest
    if (final / ".complete").exists():
        return final
    tmp = root / f".tmp-{digest}-{uuid.uuid4().hex[:6]}"
    for name, data in files:
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        os.utime(target, (0, 0))
    (tmp / ".complete").write_text("")
    os.utime(tmp / ".complete", (0, 0))
    (tmp / ".amlignore").write_text(".complete\n.amlignore\n")
    try:
        os.replace(tmp, final)
    except OSError:  # a concurrent builder won; same content
        shutil.rmtree(tmp, ignore_errors=True)
    return final
