"""Content-addressed cache of pass outputs.

Layout under cache_dir:
    runs/<key>/          a finished pass: result.json, events.jsonl, job.log, the pass's output files, meta.json
    tmp/<key>/           the staging folder of a pass in progress (renamed to runs/<key> only on success)
    partial/<key>/       what a pass in progress keeps across attempts (checkpoints/: core/checkpoints.py); it
                         survives a killed run so the next attempt resumes, and is removed when <key> commits
    locks/<key>.lock     held while a pass with that key runs, so two runs sharing a cache never collide
    hashes.json          memo of folder content hashes keyed by (path, size, mtime) so big models hash once

A run killed mid-pass (kill -9) leaves tmp/<key>, which the next run holding the lock deletes, and partial/<key>,
from which that run resumes: a cache entry exists only if the pass completed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from orchestrator.core.fs import atomic_write_text, shareable
from orchestrator.core.job import RESULT_FILE, JobResult, JobState

META_FILE = "meta.json"


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-normalized object (sorted keys): equal configs give equal keys whatever their order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stat_sig(path: Path) -> list[Any]:
    """Size and mtime of every file under path: cheap change detection for the hash memo."""
    if path.is_file():
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    sig = []
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            sig.append([str(p.relative_to(path)), st.st_size, st.st_mtime_ns])
    return sig


@dataclass
class CacheEntry:
    key: str
    path: Path
    result: JobResult
    meta: dict[str, Any]


class Cache:
    """Pass outputs keyed by the hash of everything that determines them."""

    def __init__(self, root: Path | str) -> None:
        # Folders are made on the first write, not here: a run refused by the pre-flight checks writes nothing.
        self.root = Path(root).resolve()
        self._made = False

    def ensure(self) -> Path:
        """Create runs/, tmp/, locks/ (once per instance); returns the root."""
        if not self._made:
            for sub in ("runs", "tmp", "locks", "logs"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            self._made = True
        return self.root

    # ---- keys -------------------------------------------------------------------------------------------
    def content_hash(self, path: Path | str) -> str:
        """sha256 over (relative path, file sha256) of a file or folder; memoized by size+mtime."""
        path = Path(path).resolve()
        self.ensure()
        memo_path = self.root / "hashes.json"
        with FileLock(str(self.root / "locks" / "hashes.lock")):
            memo = json.loads(memo_path.read_text()) if memo_path.exists() else {}
        sig = stable_hash(_stat_sig(path))
        hit = memo.get(str(path))
        if hit and hit["sig"] == sig:
            return hit["sha256"]
        if path.is_file():
            digest = _file_sha256(path)
        else:
            h = hashlib.sha256()
            for p in sorted(path.rglob("*")):
                if p.is_file():
                    h.update(str(p.relative_to(path)).encode() + b"\0" + _file_sha256(p).encode() + b"\n")
            digest = h.hexdigest()
        with FileLock(str(self.root / "locks" / "hashes.lock")):
            memo = json.loads(memo_path.read_text()) if memo_path.exists() else {}
            memo[str(path)] = {"sig": sig, "sha256": digest}
            atomic_write_text(memo_path, json.dumps(memo, indent=1))
        return digest

    # ---- entries ----------------------------------------------------------------------------------------
    def entry_dir(self, key: str) -> Path:
        return self.root / "runs" / key

    def partial_dir(self, key: str) -> Path:
        """The key's folder for state that outlives an attempt (checkpoints); not created here."""
        return self.root / "partial" / key

    def get(self, key: str) -> CacheEntry | None:
        path = self.entry_dir(key)
        try:
            result = JobResult.read(path)
            meta = json.loads((path / META_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return None
        if result.status != JobState.COMPLETED:
            return None
        return CacheEntry(key, path, result, meta)

    @contextmanager
    def staging(self, key: str, timeout: float = -1) -> Iterator[Path]:
        """Hold the key's lock and yield an empty staging folder. Leftovers of a killed run are removed here."""
        self.ensure()
        lock = FileLock(str(self.root / "locks" / f"{key}.lock"))
        with lock.acquire(timeout=timeout):
            stage = self.root / "tmp" / key
            if stage.exists():
                shutil.rmtree(stage)
            stage.mkdir(parents=True)
            try:
                yield stage
            finally:
                if stage.exists():
                    shutil.rmtree(stage, ignore_errors=True)

    def commit(self, key: str, stage: Path, meta: dict[str, Any]) -> CacheEntry:
        """Move a completed staging folder into runs/<key> atomically (call while holding the key's lock)."""
        result = JobResult.read(stage)
        if result.status != JobState.COMPLETED:
            raise ValueError(f"refusing to cache a {result.status.value} pass")
        atomic_write_text(stage / META_FILE, json.dumps({**meta, "committed_at": time.time()}, indent=2))
        final = self.entry_dir(key)
        shareable(stage)  # what passes wrote privately (mkdtemp 0700, safetensors 0600) is an ordinary entry
        if final.exists():  # another run finished the same key first: keep theirs
            shutil.rmtree(stage)
        else:
            os.replace(stage, final)
        self._remove_partial(key)  # the entry is in runs/<key>: its checkpoints have served
        entry = self.get(key)
        assert entry is not None
        return entry

    @contextmanager
    def lock(self, key: str, timeout: float = -1) -> Iterator[None]:
        self.ensure()
        with FileLock(str(self.root / "locks" / f"{key}.lock")).acquire(timeout=timeout):
            yield

    def entries(self) -> list[CacheEntry]:
        out = []
        if not (self.root / "runs").is_dir():
            return out
        for path in sorted((self.root / "runs").iterdir()):
            if (path / RESULT_FILE).exists():
                entry = self.get(path.name)
                if entry:
                    out.append(entry)
        return out

    def remove(self, key: str) -> bool:
        path = self.entry_dir(key)
        if not path.exists():
            return False
        with self.lock(key):
            trash = self.root / "tmp" / f".trash-{key}-{os.getpid()}"
            os.replace(path, trash)  # atomic: readers see the entry or nothing
            shutil.rmtree(trash, ignore_errors=True)
        return True

    def _remove_partial(self, key: str) -> None:
        """Delete partial/<key> (renamed aside first, so no reader sees a half-deleted checkpoint folder)."""
        partial = self.partial_dir(key)
        if not partial.exists():
            return
        trash = self.root / "tmp" / f".trash-partial-{key}-{os.getpid()}"
        try:
            os.replace(partial, trash)
        except OSError:
            trash = partial
        shutil.rmtree(trash, ignore_errors=True)

    def clean(self) -> int:
        """Remove every entry, and the staging and partial (checkpoint) folders of runs no longer alive."""
        n = 0
        for entry in self.entries():
            n += self.remove(entry.key)
        for sub in ("tmp", "partial"):
            if not (self.root / sub).is_dir():
                continue
            for stale in (self.root / sub).iterdir():
                lock = FileLock(str(self.root / "locks" / f"{stale.name}.lock"))
                try:
                    with lock.acquire(timeout=0):  # a folder whose run is alive is not ours to delete
                        shutil.rmtree(stale, ignore_errors=True)
                except Timeout:
                    continue
        return n


def folder_size(path: Path | str) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
