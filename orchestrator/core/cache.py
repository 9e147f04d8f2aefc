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

A *shared* cache (`SharedCache`: on Azure ML the workspace's blob datastore, systems/azureml/blobcache.py) holds the
same keys where the work runs, so every submit, every attempt of a preempted job and every client see one set of
entries. Its entries carry their manifest (`folder_manifest`: every file's size and sha256) and a result whose model
paths are portable (`portable_result`): relative to the entry, or `@input:<field>` for a pass-through input.
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
from typing import Any, Protocol

from filelock import FileLock, Timeout

from orchestrator.core.fs import atomic_write_text, shareable
from orchestrator.core.job import RESULT_FILE, JobResult, JobState, ModelArtifact, is_uri

META_FILE = "meta.json"
MANIFEST_FILE = "orch-files.json"  # a pass output's files (name -> size, sha256), written where the files are
INPUT_REF = "@input:"  # a portable result's model path that is the pass's own input (path / adapter_path)


def stable_hash(obj: Any) -> str:
    """sha256 of a JSON-normalized object (sorted keys): equal configs give equal keys whatever their order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_sha256(path: Path) -> str:
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


def folder_manifest(root: Path | str, *, exclude: tuple[str, ...] = (MANIFEST_FILE,)) -> dict[str, dict[str, Any]]:
    """{relative posix name: {"size", "sha256"}} of every file under root: what a reader checks an entry against."""
    root = Path(root)
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            name = p.relative_to(root).as_posix()
            if name in exclude:
                continue
            out[name] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    return out


def portable_result(result: JobResult, input_model: ModelArtifact | None, base: str | None = None) -> dict | None:
    """The result as a shared cache stores it: model paths relative to the entry (a URI under `base`, the
    entry's location, is made relative too) or `@input:<field>` where the pass handed its input through.
    None when a path is neither (an absolute path elsewhere cannot be shared)."""
    doc = json.loads(result.model_dump_json())
    model = doc.get("model")
    if not model:
        return doc
    inputs: dict[str, str] = {}
    for fld in ("adapter_path", "path") if input_model is not None else ():
        given = getattr(input_model, fld)
        if given:
            inputs[given] = fld
            if not is_uri(given):
                inputs[os.path.realpath(given)] = fld  # a pass records its input resolved
    for fld in ("path", "adapter_path"):
        value = model.get(fld)
        if value is None:
            continue
        if value in inputs or (not is_uri(value) and os.path.realpath(value) in inputs):
            value = value if value in inputs else os.path.realpath(value)
            model[fld] = INPUT_REF + inputs[value]
        elif base is not None and is_uri(value) and value.startswith(base.rstrip("/") + "/"):
            model[fld] = value[len(base.rstrip("/")) + 1 :].rstrip("/") or "."
        elif os.path.isabs(value) or is_uri(value):
            return None
    return doc


def result_from_portable(doc: dict[str, Any], input_model: ModelArtifact | None, root: str | None = None) -> JobResult:
    """A shared entry's result for this run: `@input:<field>` -> this run's input; relative paths kept (the local
    entry roots them) or, with `root` (an entry used where it is), joined to it."""
    doc = json.loads(json.dumps(doc))
    model = doc.get("model")
    for fld in ("path", "adapter_path") if model else ():
        value = model.get(fld)
        if isinstance(value, str) and value.startswith(INPUT_REF):
            if input_model is None:
                raise ValueError(f"shared entry names its input's {value[len(INPUT_REF):]} but the step has no input")
            model[fld] = getattr(input_model, value[len(INPUT_REF) :])
        elif isinstance(value, str) and root is not None and not os.path.isabs(value) and not is_uri(value):
            model[fld] = root.rstrip("/") + "/" + value.removeprefix("./")
    return JobResult.model_validate(doc)


@dataclass
class SharedEntry:
    """A committed entry of a shared cache, as its commit marker describes it."""

    key: str
    uri: str  # where its files are (on Azure ML: azureml://datastores/<ds>/paths/<prefix>/)
    files: dict[str, dict[str, Any]]  # the manifest: name -> size, sha256
    result: dict[str, Any]  # portable_result form
    meta: dict[str, Any]


class SharedCache(Protocol):
    """Cache entries kept where the work runs (Azure ML: the workspace's default datastore), beside the local
    cache. Writers upload an entry's files first and its commit marker last; readers trust committed entries
    only, checked against the marker's manifest; two writers of one key both end with a valid entry.

    by_reference: hits are used where they are (their model paths become URIs: a client submitting jobs to the
    same workspace); else they are downloaded (`materialize`) into the local cache first (a job on the compute)."""

    where: str
    by_reference: bool

    def lookup(self, key: str) -> SharedEntry | None: ...
    def materialize(self, entry: SharedEntry, dest: Path) -> None: ...
    def publish(self, key: str, folder: Path, *, meta: dict[str, Any], input_model: ModelArtifact | None) -> Any: ...
    def checkpoints(self, key: str, folder: Path, log: Any) -> Any: ...
    def drop_partial(self, key: str) -> None: ...


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
            digest = file_sha256(path)
        else:
            h = hashlib.sha256()
            for p in sorted(path.rglob("*")):
                if p.is_file():
                    h.update(str(p.relative_to(path)).encode() + b"\0" + file_sha256(p).encode() + b"\n")
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
