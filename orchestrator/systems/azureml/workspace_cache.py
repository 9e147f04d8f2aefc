"""The pass cache in the workspace: the local cache's content keys, kept in the workspace's default blob datastore.

Why blobs and why this layout: the default workspace storage is flat-namespace (no atomic rename), so an entry is
made visible by one small blob written last, never by moving a folder. Under the prefix (default `orch-cache/`):

    entries/<key>/objects/<writer>/<files>     an entry's files, uploaded first (each writer its own folder)
    entries/<key>/commit.json                  the commit marker, written last, create-only (If-None-Match: *):
                                               {key, uri, files: {name: {size, sha256}}, result, meta}
    partial/<key>/<writer>/checkpoint-<N>/...  a running pass's complete checkpoints (files first)
    partial/<key>/<writer>/checkpoint-<N>.commit.json   ... and their markers, written last
    attempts/<job>.json                        how many times a driver job started (a requeued attempt knows it)

Readers trust a key only through its marker, and only when every file it lists is there with its size (a lookup
lists the objects once); a download checks each file's sha256 too. An upload cut short leaves objects without a
marker: never read, removed by `clean`. Two writers of one key each upload into their own folder; the first
marker wins, the second writer finds a valid marker and drops its own objects: both end with a valid entry.

This module is the entries, their listing and cleaning, and the attempt counters. How the cache reaches its
datastore: cache_datastore; the blob operations it is made of: cache_blobs; a running pass's checkpoints
(partial/): cache_checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.cache import MANIFEST_FILE, SharedEntry, file_sha256, folder_manifest, portable_result
from orchestrator.core.job import RESULT_FILE, ModelArtifact, is_uri
from orchestrator.systems.azureml.cache_blobs import (
    CacheUnreadable,
    delete_prefix,
    listing,
    read_json,
    upload_file,
    writer_id,
)
from orchestrator.systems.azureml.cache_checkpoints import PartialCheckpoints
from orchestrator.systems.azureml.cache_datastore import default_datastore, job_datastore
from orchestrator.systems.azureml.logstream import describe

DEFAULT_PREFIX = "orch-cache"
COMMIT = "commit.json"


@dataclass
class RemoteStatus:
    """One key as `orch cache ls --workspace` shows it."""

    key: str
    state: str  # committed | uncommitted | corrupt
    size: int
    pass_name: str = ""
    pass_type: str = ""
    committed_at: float | None = None
    why: str = ""
    partial: int = 0  # bytes of checkpoints kept for the key


class WorkspaceCache:
    """Entries under `prefix` of one blob container (the workspace's default datastore)."""

    where = "workspace"

    def __init__(self, container: Any, *, datastore: str, prefix: str = DEFAULT_PREFIX, by_reference: bool) -> None:
        self.container = container
        self.datastore = datastore
        self.prefix = prefix.strip("/")
        self.by_reference = by_reference
        self.partial = PartialCheckpoints(container, self.prefix)

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def for_client(cls, ml: Any, *, by_reference: bool = True, prefix: str = DEFAULT_PREFIX) -> WorkspaceCache:
        """The workspace's default datastore, with the credentials the SDK gets for it (listSecrets)."""
        container, name = default_datastore(ml, prefix)
        return cls(container, datastore=name, prefix=prefix, by_reference=by_reference)

    @classmethod
    def in_job(cls, location: str) -> WorkspaceCache:
        """Inside an Azure ML job: the datastore of `location` (azureml://datastores/<ds>/paths/<prefix>/), reached
        with the job's identity."""
        container, datastore, prefix = job_datastore(location)
        return cls(container, datastore=datastore, prefix=prefix, by_reference=False)

    @property
    def location(self) -> str:
        return f"azureml://datastores/{self.datastore}/paths/{self.prefix}/"

    # ---- names --------------------------------------------------------------------------------------------
    def _entry(self, key: str) -> str:
        return f"{self.prefix}/entries/{key}/"

    def objects_prefix(self, key: str, writer: str) -> str:
        return f"{self._entry(key)}objects/{writer}/"

    def objects_uri(self, key: str, writer: str) -> str:
        """Where a job that computes `key` uploads its output (the entry's objects, committed afterwards)."""
        return f"azureml://datastores/{self.datastore}/paths/{self.objects_prefix(key, writer)}"

    def _uri(self, blob_prefix: str) -> str:
        return f"azureml://datastores/{self.datastore}/paths/{blob_prefix}"

    def _blob_prefix(self, uri: str) -> str | None:
        head = f"azureml://datastores/{self.datastore}/paths/"
        return uri[len(head) :] if uri.startswith(head) else None

    # ---- reading ------------------------------------------------------------------------------------------
    def _check(self, key: str, doc: dict[str, Any] | None) -> tuple[SharedEntry | None, str]:
        """A marker's entry if it is whole (every listed file there, with its size), else (None, why)."""
        if doc is None:
            return None, "no commit marker"
        try:
            if doc.get("key") != key:
                return None, f"marker names key {doc.get('key')!r}"
            uri, files, result = doc["uri"], doc["files"], doc["result"]
            blob_prefix = self._blob_prefix(uri)
            if blob_prefix is None or not blob_prefix.startswith(self._entry(key)) or not isinstance(files, dict):
                return None, "marker points outside its entry"
            have = listing(self.container, blob_prefix)
            for name, info in files.items():
                if have.get(name) != int(info["size"]) or not isinstance(info.get("sha256"), str):
                    return None, f"{name}: {'missing' if name not in have else 'size differs'}"
            if RESULT_FILE not in files or result.get("status") != "Completed":
                return None, "no completed result"
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return None, f"malformed marker ({type(exc).__name__})"
        return SharedEntry(key=key, uri=uri, files=files, result=result, meta=dict(doc.get("meta") or {})), ""

    def lookup(self, key: str) -> SharedEntry | None:
        """The committed, whole entry of `key`, or None (absent, uncommitted or corrupt: never read)."""
        try:
            doc, _ = read_json(self.container, self._entry(key) + COMMIT)
            entry, _why = self._check(key, doc)
        except Exception as exc:  # noqa: BLE001
            raise CacheUnreadable(f"workspace cache: reading {key[:16]}: {describe(exc)}") from None
        return entry

    def materialize(self, entry: SharedEntry, dest: Path) -> None:
        """Download an entry's files into dest (a staging folder), each checked against the manifest's size and
        sha256; a mismatch raises CacheUnreadable and the caller runs the pass instead."""
        from orchestrator.systems.azureml.download import safe_join

        blob_prefix = self._blob_prefix(entry.uri) or ""
        for name, info in sorted(entry.files.items()):
            target = safe_join(dest, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as fh:
                self.container.download_blob(blob_prefix + name, max_concurrency=4).readinto(fh)
            if target.stat().st_size != int(info["size"]) or file_sha256(target) != info["sha256"]:
                raise CacheUnreadable(f"workspace cache entry {entry.key[:16]}: {name} does not match its manifest")

    # ---- writing ------------------------------------------------------------------------------------------
    def publish(
        self, key: str, folder: Path, *, meta: dict[str, Any], input_model: ModelArtifact | None
    ) -> SharedEntry | None:
        """Make a finished local entry (folder: result.json, events, outputs) a committed workspace entry.

        Its files are uploaded into a fresh objects folder, then the marker is created. Where the pass ran as a
        job whose output already went to an objects folder of this key (`objects_uri`), the local folder holds
        only its record: those objects are checked against the job's own manifest and committed as they are.
        Returns the committed entry (ours or a concurrent writer's), or None when the result cannot be shared."""
        from orchestrator.core.job import JobResult

        result = JobResult.read(folder)
        job_prefix = self._job_objects(key, result)
        writer_prefix = job_prefix or self.objects_prefix(key, writer_id())
        portable = portable_result(result, self._as_given(input_model), self._uri(writer_prefix))
        if portable is None:
            return None
        if job_prefix is not None:
            files = self._job_manifest(job_prefix)
            record = {n: f for n, f in folder_manifest(folder).items() if n not in files}
            for name in record:  # what only the client holds of the job (its log, meta.json)
                upload_file(self.container, folder / name, writer_prefix + name)
            files.update(record)
        else:
            files = folder_manifest(folder)
            for name in files:
                upload_file(self.container, folder / name, writer_prefix + name)
        writer = writer_prefix.rstrip("/").rsplit("/", 1)[-1]
        doc = {"format": 1, "key": key, "uri": self._uri(writer_prefix), "files": files, "result": portable,
               "meta": {**meta, "committed_at": time.time(), "writer": writer}}  # fmt: skip
        return self._commit(key, doc, writer_prefix, own_objects=job_prefix is None)

    def _as_given(self, model: ModelArtifact | None) -> ModelArtifact | None:
        """The input as a job was handed it: a local copy of a workspace reference is that reference again."""
        if model is None:
            return None
        from orchestrator.systems.azureml.download import origin_of

        def given(p: str | None) -> str | None:
            if p is None or is_uri(p):
                return p
            return origin_of(p) or p

        return model.model_copy(update={"path": given(model.path), "adapter_path": given(model.adapter_path)})

    def _job_objects(self, key: str, result: Any) -> str | None:
        """The objects folder of `key` a job wrote its output to, read from the result's model URI."""
        model = result.model
        for value in (model.path, model.adapter_path) if model is not None else ():
            prefix = self._blob_prefix(value) if value and is_uri(value) else None
            m = re.match(re.escape(self._entry(key)) + r"objects/([^/]+)/", prefix or "")
            if m:
                return m[0]
        return None

    def _job_manifest(self, prefix: str) -> dict[str, dict[str, Any]]:
        doc, _ = read_json(self.container, prefix + MANIFEST_FILE)
        if not doc:
            raise CacheUnreadable(f"workspace cache: {prefix}{MANIFEST_FILE} missing: the job wrote no manifest")
        have = listing(self.container, prefix)
        for name, info in doc.items():
            if have.get(name) != int(info["size"]):
                raise CacheUnreadable(f"workspace cache: the job's output {prefix}{name} is not whole")
        return dict(doc)

    def _commit(self, key: str, doc: dict[str, Any], writer_prefix: str, *, own_objects: bool) -> SharedEntry:
        """Create the marker; if another writer's is there, keep a valid one (and drop our objects), replace a
        corrupt one (only if it did not change meanwhile: If-Match on its etag)."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError

        marker = self.container.get_blob_client(self._entry(key) + COMMIT)
        data = json.dumps(doc, indent=1).encode()
        for _ in range(5):
            try:
                marker.upload_blob(data, overwrite=False)
                entry, why = self._check(key, doc)
                if entry is None:
                    raise CacheUnreadable(f"workspace cache: committed {key[:16]} but it does not read back: {why}")
                return entry
            except ResourceExistsError:
                theirs, etag = read_json(self.container, self._entry(key) + COMMIT)
                entry, _ = self._check(key, theirs)
                if entry is not None:  # a concurrent writer committed first: theirs stands, ours goes
                    if own_objects:
                        delete_prefix(self.container, writer_prefix)
                    return entry
                with contextlib.suppress(ResourceModifiedError):
                    marker.upload_blob(data, overwrite=True, etag=etag, match_condition=MatchConditions.IfNotModified)
                    entry, why = self._check(key, doc)
                    if entry is not None:
                        return entry
        raise CacheUnreadable(f"workspace cache: could not commit {key[:16]} (the marker kept changing)")

    # ---- listing and cleaning -----------------------------------------------------------------------------
    def status(self) -> list[RemoteStatus]:
        """Every key under the prefix with its state (committed / uncommitted / corrupt) and size."""
        sizes: dict[str, int] = {}
        partial: dict[str, int] = {}
        markers: set[str] = set()
        head = f"{self.prefix}/"
        for b in self.container.list_blobs(name_starts_with=head):
            parts = b.name[len(head) :].split("/")
            if len(parts) >= 2 and parts[0] == "entries":
                sizes[parts[1]] = sizes.get(parts[1], 0) + (b.size or 0)
                if parts[2:] == [COMMIT]:
                    markers.add(parts[1])
            elif len(parts) >= 2 and parts[0] == "partial":
                partial[parts[1]] = partial.get(parts[1], 0) + (b.size or 0)
        out = []
        for key in sorted(set(sizes) | set(partial)):
            if key not in sizes:
                out.append(RemoteStatus(key, "partial", 0, partial=partial[key]))
                continue
            if key not in markers:
                out.append(RemoteStatus(key, "uncommitted", sizes[key], partial=partial.get(key, 0)))
                continue
            doc, _ = read_json(self.container, self._entry(key) + COMMIT)
            entry, why = self._check(key, doc)
            meta = (doc or {}).get("meta") or {}
            out.append(RemoteStatus(
                key, "committed" if entry else "corrupt", sizes[key], str(meta.get("pass", "")),
                str(meta.get("pass_type", "")), meta.get("committed_at"), why, partial.get(key, 0),
            ))  # fmt: skip
        return out

    def remove(self, key: str) -> int:
        """Delete a key: its marker first (readers stop trusting it), then its objects and checkpoints."""
        with contextlib.suppress(Exception):
            self.container.delete_blob(self._entry(key) + COMMIT)
        removed = delete_prefix(self.container, self._entry(key))
        return removed + delete_prefix(self.container, self.partial.prefix_of(key))

    def clean(self, key_prefix: str = "") -> int:
        """Remove every key (or those starting with key_prefix); the number of keys removed."""
        keys = [s.key for s in self.status() if s.key.startswith(key_prefix)]
        for key in keys:
            self.remove(key)
        if not key_prefix:
            delete_prefix(self.container, f"{self.prefix}/attempts/")
        return len(keys)

    # ---- checkpoints of a running pass (cache_checkpoints) ------------------------------------------------
    def checkpoints(self, key: str, folder: Path, log: Callable[[str], None]) -> AbstractContextManager[None]:
        """Around a pass run: its newest workspace checkpoint restored into folder, every new one uploaded."""
        return self.partial.checkpoints(key, folder, log)

    def drop_partial(self, key: str) -> None:
        """The key is committed: its checkpoints have served."""
        self.partial.drop(key)

    # ---- driver attempts ----------------------------------------------------------------------------------
    def count_attempt(self, job: str) -> int:
        """1 for a driver job's first start, 2 after Azure ML requeued it (preemption), ..."""
        name = f"{self.prefix}/attempts/{job}.json"
        doc, _ = read_json(self.container, name)
        n = int((doc or {}).get("attempts", 0)) + 1
        self.container.upload_blob(name, json.dumps({"attempts": n, "at": time.time()}).encode(), overwrite=True)
        return n
