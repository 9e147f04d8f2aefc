"""Content-addressed cache of pass outputs.

Layout under cache_dir:
    runs/<key>/          a finished pass: result.json, events.jsonl, job.log, the pass's output files, meta.json
                         (meta.json lists every file with its size and sha256, recorded at commit)
    tmp/<key>/           the staging folder of a pass in progress (renamed to runs/<key> only on success)
    quarantine/<key>-<t>/ an entry that failed its own checks (a truncated result.json, a file missing or changed),
                         moved aside once, with damage.json saying why: the pass is a miss and runs again
    partial/<key>/       what a pass in progress keeps across attempts (checkpoints/: core/checkpoints.py); it
                         survives a killed run so the next attempt resumes, and is removed when <key> commits
    locks/<key>.lock     held while a pass with that key runs, so two runs sharing a cache never collide
    hashes.json          memo of folder content hashes keyed by (path, size, mtime) so big models hash once

A run killed mid-pass (kill -9) leaves tmp/<key>, which the next run holding the lock deletes, and partial/<key>,
from which that run resumes: a cache entry exists only if the pass completed. An entry damaged later (a disk
error, a hand edit, a truncated copy) is found by `get` (cheap checks: result.json, meta.json, every file present
at its recorded size) or `verify` (every file's sha256), quarantined and reported once, never served.

A *shared* cache (`SharedCache`: on Azure ML the workspace's blob datastore, systems/azureml/workspace_cache.py)
holds the same keys where the work runs, so every submit, every attempt of a preempted job and every client see one
set of entries. Its entries carry their manifest (`folder_manifest`: every file's size and sha256) and a result whose
model paths are portable (`portable_result`): relative to the entry, or `@input:<field>` for a pass-through input.
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

from orchestrator.core.errors import RunFailure
from orchestrator.core.fs import atomic_write_text, shareable
from orchestrator.core.job import RESULT_FILE, JobResult, JobState, ModelArtifact, is_uri
from orchestrator.core.links import real

META_FILE = "meta.json"
DAMAGE_FILE = "damage.json"  # in a quarantined entry: why it was moved aside
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


@dataclass
class DamagedEntry:
    """An entry that failed its own checks: where it is now (runs/ until quarantined) and why."""

    key: str
    path: Path
    reason: str
    meta: dict[str, Any]


def file_manifest(folder: Path) -> dict[str, list[Any]]:
    """relative path -> [size, sha256] of every file under folder (links are not followed into folders)."""
    out: dict[str, list[Any]] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.name != META_FILE:
            out[str(p.relative_to(folder))] = [p.stat().st_size, file_sha256(p)]
    return out


class Cache:
    """Pass outputs keyed by the hash of everything that determines them."""

    def __init__(self, root: Path | str) -> None:
        # Folders are made on the first write, not here: a run refused by the pre-flight checks writes nothing.
        self.root = real(root)  # a link loop does not raise here: the pre-flight names it
        self._made = False
        self.damaged: list[DamagedEntry] = []  # entries this instance quarantined (the engine reports them once)
        self._locks: dict[str, FileLock] = {}

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
            memo = _read_memo(memo_path)
        sig = stable_hash(_stat_sig(path))
        hit = memo.get(str(path))
        if isinstance(hit, dict) and hit.get("sig") == sig and isinstance(hit.get("sha256"), str):
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
            memo = _read_memo(memo_path)
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
        """The committed entry of `key`, or None. An entry that fails its own checks is a miss: it is moved to
        quarantine/ (once, under the key's lock) and listed in `self.damaged` for the caller to report."""
        path = self.entry_dir(key)
        if not path.is_dir():
            return None
        entry, problem = self._read_entry(key, path)
        if problem is None:
            return entry
        self._quarantine_if_damaged(key)
        return None

    def _read_entry(self, key: str, path: Path, *, deep: bool = False) -> tuple[CacheEntry | None, str | None]:
        """(entry, None) when the entry passes its checks, else (None, what is wrong). `deep`: every file's
        sha256 against the one recorded at commit (else present at its recorded size)."""
        try:
            data = json.loads((path / RESULT_FILE).read_bytes())
        except FileNotFoundError:
            return None, f"{RESULT_FILE} is missing"
        except (ValueError, OSError) as exc:
            return None, f"{RESULT_FILE} is not valid JSON, truncated or overwritten ({_first_line(exc)})"
        try:
            result = JobResult.model_validate(data)
        except ValueError as exc:
            return None, f"{RESULT_FILE} is not a pass result ({_first_line(exc)})"
        try:
            meta = json.loads((path / META_FILE).read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            return None, f"{META_FILE} is missing"
        except (ValueError, OSError) as exc:
            return None, f"{META_FILE} is unreadable ({_first_line(exc)})"
        if result.status != JobState.COMPLETED:
            return None, f"{RESULT_FILE} says {result.status.value}, not Completed"
        for rel, (size, digest) in (meta.get("files") or {}).items():
            p = path / rel
            try:
                st = p.stat()
            except OSError:
                return None, f"{rel} is missing"
            if st.st_size != size:
                return None, f"{rel} is {st.st_size} bytes, {size} when it was cached"
            if deep and file_sha256(p) != digest:
                return None, f"{rel} changed since it was cached (sha256 differs)"
        model = result.model.with_root(path) if result.model else None
        for ref in (model.path, model.adapter_path) if model else ():
            if ref and not is_uri(ref) and Path(ref).is_relative_to(path) and not Path(ref).exists():
                return None, f"the model it records ({Path(ref).relative_to(path)}) is missing"
        return CacheEntry(key, path, result, meta), None

    def _quarantine_if_damaged(self, key: str, *, deep: bool = False) -> DamagedEntry | None:
        """Under the key's lock (a concurrent run may have replaced the entry meanwhile), check again and move a
        damaged entry to quarantine/<key>-<time>/ with damage.json; returns it (also kept in `self.damaged`)."""
        with self.lock(key):
            path = self.entry_dir(key)
            if not path.is_dir():
                return None
            _, problem = self._read_entry(key, path, deep=deep)
            if problem is None:
                return None
            meta = _read_meta(path)
            dest = self.root / "quarantine" / f"{key}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)  # atomic: readers see the entry or nothing
            atomic_write_text(dest / DAMAGE_FILE, json.dumps({"key": key, "reason": problem, "at": time.time()}))
        found = DamagedEntry(key, dest, problem, meta)
        self.damaged.append(found)
        return found

    @contextmanager
    def staging(self, key: str, timeout: float = -1) -> Iterator[Path]:
        """Hold the key's lock and yield an empty staging folder. Leftovers of a killed run are removed here."""
        self.ensure()
        with self._lock_for(key).acquire(timeout=timeout):
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
        record = {**meta, "committed_at": time.time(), "files": file_manifest(stage)}  # checked by get / verify
        atomic_write_text(stage / META_FILE, json.dumps(record, indent=2))
        final = self.entry_dir(key)
        shareable(stage)  # what passes wrote privately (mkdtemp 0700, safetensors 0600) is an ordinary entry
        if final.exists() and self._read_entry(key, final)[1] is not None:
            self._quarantine_if_damaged(key)  # a damaged entry under this key: ours replaces it
        if final.exists():  # another run finished the same key first: keep theirs
            shutil.rmtree(stage)
        else:
            os.replace(stage, final)
        self._remove_partial(key)  # the entry is in runs/<key>: its checkpoints have served
        entry, problem = self._read_entry(key, final)
        if entry is None:
            raise CacheDamaged(f"cache entry {key} failed its checks right after it was written: {problem}")
        return entry

    @contextmanager
    def lock(self, key: str, timeout: float = -1) -> Iterator[None]:
        self.ensure()
        with self._lock_for(key).acquire(timeout=timeout):
            yield

    def _lock_for(self, key: str) -> FileLock:
        """One FileLock object per key in this instance: re-entrant, so a check inside `staging` can take it."""
        if key not in self._locks:
            self._locks[key] = FileLock(str(self.root / "locks" / f"{key}.lock"))
        return self._locks[key]

    def entries(self) -> list[CacheEntry]:
        """Committed entries that pass their checks (read-only: nothing is moved)."""
        out = []
        if not (self.root / "runs").is_dir():
            return out
        for path in sorted((self.root / "runs").iterdir()):
            if path.is_dir():
                entry, _ = self._read_entry(path.name, path)
                if entry:
                    out.append(entry)
        return out

    def damaged_entries(self) -> list[DamagedEntry]:
        """Entries that failed their checks: those quarantined, and those in runs/ not yet found (read-only)."""
        out: list[DamagedEntry] = []
        runs, quarantine = self.root / "runs", self.root / "quarantine"
        for path in sorted(runs.iterdir()) if runs.is_dir() else []:
            if path.is_dir():
                _, problem = self._read_entry(path.name, path)
                if problem is not None:
                    out.append(DamagedEntry(path.name, path, problem, _read_meta(path)))
        for path in sorted(quarantine.iterdir()) if quarantine.is_dir() else []:
            try:
                damage = json.loads((path / DAMAGE_FILE).read_text())
            except (OSError, ValueError):
                damage = {"key": path.name.split("-", 1)[0], "reason": "quarantined"}
            out.append(DamagedEntry(str(damage.get("key")), path, str(damage.get("reason")), _read_meta(path)))
        return out

    def verify(self) -> tuple[int, list[DamagedEntry]]:
        """Every entry checked to the byte (each file's sha256 against meta.json's): (entries sound, the damaged
        ones, now quarantined: the next run computes them again)."""
        sound, damaged = 0, []
        runs = self.root / "runs"
        for path in sorted(runs.iterdir()) if runs.is_dir() else []:
            if not path.is_dir():
                continue
            found = self._quarantine_if_damaged(path.name, deep=True)
            if found is None:
                sound += 1
            else:
                damaged.append(found)
        return sound, damaged

    def remove(self, key: str) -> bool:
        path = self.entry_dir(key)
        if not path.exists():
            return False
        with self.lock(key):
            trash = self.root / "tmp" / f".trash-{key}-{os.getpid()}"
            os.replace(path, trash)  # atomic: readers see the entry or nothing
            shutil.rmtree(trash, ignore_errors=True)
        return True

    def remove_damaged(self, prefix: str = "") -> int:
        """Quarantined entries (and damaged ones still in runs/) whose key starts with prefix, removed."""
        n = 0
        for found in self.damaged_entries():
            if found.key.startswith(prefix):
                if found.path.parent == self.root / "runs":
                    n += self.remove(found.key)
                else:
                    shutil.rmtree(found.path, ignore_errors=True)
                    n += 1
        return n

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
        n += self.remove_damaged()
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


class CacheDamaged(RunFailure):
    """An entry that cannot be trusted right after it was written (a failing disk): exit 1, one line."""


def _read_memo(path: Path) -> dict[str, Any]:
    """hashes.json, or an empty memo when it is missing or damaged (it is only a memo: hashes are recomputed)."""
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def folder_size(path: Path | str) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
