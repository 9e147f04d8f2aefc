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

Credentials are those the SDK gets for the datastore: `datastores.get(include_secrets=True)` (listSecrets) on the
client, and inside a job the same two REST calls made with the job's own identity (no secret travels in the job).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.cache import MANIFEST_FILE, SharedEntry, file_sha256, folder_manifest, portable_result
from orchestrator.core.checkpoints import COMPLETE_MARKER, complete_checkpoints
from orchestrator.core.job import RESULT_FILE, ModelArtifact, is_uri
from orchestrator.systems.base import SystemFailure

DEFAULT_PREFIX = "orch-cache"
COMMIT = "commit.json"
SYNC_EVERY_S = float(os.environ.get("ORCH_CHECKPOINT_SYNC_S", "0.5"))  # a local folder listing: cheap
KEEP_CHECKPOINTS = 2
DATASTORE_API = "2024-10-01-preview"  # what azure-ai-ml 1.35.2 sends for datastores (GET, listSecrets)
ENV_CACHE = "ORCH_WORKSPACE_CACHE"  # azureml://datastores/<ds>/paths/<prefix>/ : the driver job's cache location
ENV_ARM = "ORCH_ARM_ENDPOINT"  # the cloud's resource manager endpoint, for the job's own datastore lookup


class CacheUnreadable(SystemFailure):
    """The workspace cache cannot be reached (credentials, network)."""


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


def _writer_id() -> str:
    job = os.environ.get("AZUREML_RUN_ID")
    return f"{job or 'client'}-{uuid.uuid4().hex[:8]}"


def _is_missing(exc: BaseException) -> bool:
    return type(exc).__name__ == "ResourceNotFoundError"


class WorkspaceCache:
    """Entries under `prefix` of one blob container (the workspace's default datastore)."""

    where = "workspace"

    def __init__(self, container: Any, *, datastore: str, prefix: str = DEFAULT_PREFIX, by_reference: bool) -> None:
        self.container = container
        self.datastore = datastore
        self.prefix = prefix.strip("/")
        self.by_reference = by_reference

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def for_client(cls, ml: Any, *, by_reference: bool = True, prefix: str = DEFAULT_PREFIX) -> WorkspaceCache:
        """The workspace's default datastore, with the credentials the SDK gets for it (listSecrets)."""
        from orchestrator.systems.azureml.download import _datastore_source

        try:
            name = ml.datastores.get_default().name
            src = _datastore_source(ml, name, prefix)
        except Exception as exc:  # noqa: BLE001 - SDK/HTTP errors: one line
            raise CacheUnreadable(f"workspace cache: cannot open the default datastore: {_first(exc)}") from None
        return cls(src.container, datastore=name, prefix=prefix, by_reference=by_reference)

    @classmethod
    def in_job(cls, location: str) -> WorkspaceCache:
        """Inside an Azure ML job: the datastore of `location` (azureml://datastores/<ds>/paths/<prefix>/), reached
        with the job's identity: GET the datastore and listSecrets, as the SDK does, else the identity itself."""
        import requests
        from azure.storage.blob import ContainerClient

        from orchestrator.systems.azureml.workspace import make_credential

        m = re.match(r"^azureml://datastores/([^/]+)/paths/(.+?)/?$", location)
        if not m:
            raise CacheUnreadable(f"{ENV_CACHE}: not an azureml://datastores/<name>/paths/<prefix> URI: {location!r}")
        datastore, prefix = m[1], m[2]
        arm = os.environ.get(ENV_ARM, "https://management.azure.com/").rstrip("/")
        ws = (f"/subscriptions/{os.environ['AZUREML_ARM_SUBSCRIPTION']}/resourceGroups/"
              f"{os.environ['AZUREML_ARM_RESOURCEGROUP']}/providers/Microsoft.MachineLearningServices/workspaces/"
              f"{os.environ['AZUREML_ARM_WORKSPACE_NAME']}")  # fmt: skip
        credential = make_credential()
        token = credential.get_token(arm + "/.default").token
        headers = {"Authorization": f"Bearer {token}"}
        url = f"{arm}{ws}/datastores/{datastore}"
        try:
            got = requests.get(url, params={"api-version": DATASTORE_API}, headers=headers, timeout=60)
            got.raise_for_status()
            props = got.json()["properties"]
            account_url = f"{props.get('protocol') or 'https'}://{props['accountName']}.blob.{props['endpoint']}"
            secret: Any = None
            if (props.get("credentials") or {}).get("credentialsType") in ("AccountKey", "Sas"):
                sec = requests.post(f"{url}/listSecrets", params={"api-version": DATASTORE_API}, headers=headers,
                                    json={"expirableSecret": True, "expireAfterHours": 1}, timeout=60)  # fmt: skip
                if sec.status_code not in (401, 403):  # not allowed to read the key: the identity's own blob role
                    sec.raise_for_status()
                    body = sec.json()
                    secret = body.get("key") or body.get("sasToken")
        except Exception as exc:  # noqa: BLE001 - one line, no URL query (no secret is in it anyway)
            raise CacheUnreadable(f"workspace cache: datastore {datastore}: {_first(exc)}") from None
        container = ContainerClient(account_url, props["containerName"], credential=secret or credential)
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
    def _read_json(self, name: str) -> tuple[dict[str, Any] | None, str | None]:
        """(document, etag) of a JSON blob; (None, None) when absent; ({}, etag) when it is not valid JSON."""
        blob = self.container.get_blob_client(name)
        try:
            dl = blob.download_blob()
            data = dl.readall()
            etag = dl.properties.etag
        except Exception as exc:
            if _is_missing(exc):
                return None, None
            raise
        try:
            doc = json.loads(data)
        except ValueError:
            return {}, etag
        return (doc if isinstance(doc, dict) else {}), etag

    def _listing(self, blob_prefix: str) -> dict[str, int]:
        return {b.name[len(blob_prefix) :]: b.size for b in self.container.list_blobs(name_starts_with=blob_prefix)}

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
            have = self._listing(blob_prefix)
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
            doc, _ = self._read_json(self._entry(key) + COMMIT)
            entry, _why = self._check(key, doc)
        except Exception as exc:  # noqa: BLE001
            raise CacheUnreadable(f"workspace cache: reading {key[:16]}: {_first(exc)}") from None
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
        writer_prefix = job_prefix or self.objects_prefix(key, _writer_id())
        portable = portable_result(result, self._as_given(input_model), self._uri(writer_prefix))
        if portable is None:
            return None
        if job_prefix is not None:
            files = self._job_manifest(job_prefix)
            record = {n: f for n, f in folder_manifest(folder).items() if n not in files}
            for name in record:  # what only the client holds of the job (its log, meta.json)
                self._upload_file(folder / name, writer_prefix + name)
            files.update(record)
        else:
            files = folder_manifest(folder)
            for name in files:
                self._upload_file(folder / name, writer_prefix + name)
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
        doc, _ = self._read_json(prefix + MANIFEST_FILE)
        if not doc:
            raise CacheUnreadable(f"workspace cache: {prefix}{MANIFEST_FILE} missing: the job wrote no manifest")
        have = self._listing(prefix)
        for name, info in doc.items():
            if have.get(name) != int(info["size"]):
                raise CacheUnreadable(f"workspace cache: the job's output {prefix}{name} is not whole")
        return dict(doc)

    def _upload_file(self, path: Path, name: str) -> None:
        with path.open("rb") as fh:
            self.container.upload_blob(name, fh, overwrite=True, max_concurrency=4)

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
                theirs, etag = self._read_json(self._entry(key) + COMMIT)
                entry, _ = self._check(key, theirs)
                if entry is not None:  # a concurrent writer committed first: theirs stands, ours goes
                    if own_objects:
                        self._delete_prefix(writer_prefix)
                    return entry
                with contextlib.suppress(ResourceModifiedError):
                    marker.upload_blob(data, overwrite=True, etag=etag, match_condition=MatchConditions.IfNotModified)
                    entry, why = self._check(key, doc)
                    if entry is not None:
                        return entry
        raise CacheUnreadable(f"workspace cache: could not commit {key[:16]} (the marker kept changing)")

    def _delete_prefix(self, blob_prefix: str) -> int:
        n = 0
        for b in list(self.container.list_blobs(name_starts_with=blob_prefix)):
            with contextlib.suppress(Exception):
                self.container.delete_blob(b.name)
                n += 1
        return n

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
            doc, _ = self._read_json(self._entry(key) + COMMIT)
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
        return self._delete_prefix(self._entry(key)) + self._delete_prefix(f"{self.prefix}/partial/{key}/")

    def clean(self, key_prefix: str = "") -> int:
        """Remove every key (or those starting with key_prefix); the number of keys removed."""
        keys = [s.key for s in self.status() if s.key.startswith(key_prefix)]
        for key in keys:
            self.remove(key)
        if not key_prefix:
            self._delete_prefix(f"{self.prefix}/attempts/")
        return len(keys)

    # ---- checkpoints of a running pass --------------------------------------------------------------------
    def _partial(self, key: str) -> str:
        return f"{self.prefix}/partial/{key}/"

    def remote_checkpoints(self, key: str) -> list[tuple[int, str, dict[str, Any]]]:
        """(step, blob folder, manifest) of every committed checkpoint of `key`, newest first."""
        out = []
        head = self._partial(key)
        for b in self.container.list_blobs(name_starts_with=head):
            m = re.match(r"^([^/]+)/checkpoint-(\d+)\.commit\.json$", b.name[len(head) :])
            if m:
                doc, _ = self._read_json(b.name)
                if doc and isinstance(doc.get("files"), dict):
                    out.append((int(m[2]), f"{head}{m[1]}/checkpoint-{m[2]}/", doc["files"]))
        return sorted(out, key=lambda t: t[0], reverse=True)

    def restore_checkpoint(self, key: str, folder: Path) -> int | None:
        """Download the newest complete checkpoint of `key` into folder/checkpoint-<N>/ (files checked, the
        completeness marker written last), unless folder already holds one as new. Returns N, or None."""
        from orchestrator.systems.azureml.download import safe_join

        have = _local_checkpoints(folder)
        for step, blob_folder, files in self.remote_checkpoints(key):
            if have and max(have) >= step:
                return None
            listing = self._listing(blob_folder)
            if any(listing.get(n) != int(i["size"]) for n, i in files.items()):
                continue  # a checkpoint whose files are not all there: try an older one
            tmp = folder / f".restore-{step}-{uuid.uuid4().hex[:6]}"
            try:
                names = sorted(files, key=lambda n: n == COMPLETE_MARKER)  # the marker last
                for name in names:
                    target = safe_join(tmp, name)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with target.open("wb") as fh:
                        self.container.download_blob(blob_folder + name, max_concurrency=4).readinto(fh)
                    if file_sha256(target) != files[name]["sha256"]:
                        raise CacheUnreadable(f"checkpoint-{step}: {name} does not match its manifest")
                final = folder / f"checkpoint-{step}"
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                return step
            except CacheUnreadable:
                continue
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return None

    def upload_checkpoint(self, key: str, writer: str, step: int, folder: Path) -> None:
        """One complete local checkpoint -> partial/<key>/<writer>/checkpoint-<N>/ (files, then its marker)."""
        head = f"{self._partial(key)}{writer}/"
        files = folder_manifest(folder, exclude=())
        for name in sorted(files, key=lambda n: n == COMPLETE_MARKER):
            self._upload_file(folder / name, f"{head}checkpoint-{step}/{name}")
        body = json.dumps({"key": key, "step": step, "files": files, "at": time.time()}).encode()
        self.container.upload_blob(f"{head}checkpoint-{step}.commit.json", body, overwrite=True)
        for _, blob_folder, _ in self.remote_checkpoints(key)[KEEP_CHECKPOINTS:]:
            with contextlib.suppress(Exception):  # marker first: a reader never sees a half-deleted one
                self.container.delete_blob(blob_folder.rstrip("/") + ".commit.json")
            self._delete_prefix(blob_folder)

    @contextlib.contextmanager
    def checkpoints(self, key: str, folder: Path, log: Callable[[str], None]) -> Iterator[None]:
        """Around a pass run: restore the newest workspace checkpoint of `key` into folder first, then upload
        every new complete checkpoint the pass writes there (a background thread, every SYNC_EVERY_S; once more
        at the end), so a requeued attempt or a later submit resumes from it."""
        folder.mkdir(parents=True, exist_ok=True)
        try:
            step = self.restore_checkpoint(key, folder)
        except Exception as exc:  # noqa: BLE001 - no checkpoint: the pass starts from step 0
            log(f"orch: could not restore checkpoints from the workspace: {_first(exc)}")
            step = None
        if step is not None:
            log(f"orch: restored checkpoint-{step} of {key[:16]} from the workspace cache")
        writer = _writer_id()
        done: set[int] = set(_local_checkpoints(folder))  # what the workspace has already (restored)
        stop = threading.Event()

        def sync() -> None:
            for n, path in sorted(_local_checkpoints(folder).items()):
                if n in done:
                    continue
                try:
                    self.upload_checkpoint(key, writer, n, path)
                    done.add(n)
                    log(f"orch: checkpoint-{n} saved to the workspace cache")
                except FileNotFoundError:
                    continue  # pruned by the trainer while we uploaded: a newer one exists
                except Exception as exc:  # noqa: BLE001 - the next round tries again
                    log(f"orch: checkpoint-{n} upload failed, will retry: {_first(exc)}")

        def loop() -> None:
            while not stop.wait(SYNC_EVERY_S):
                sync()

        thread = threading.Thread(target=loop, name=f"ckpt-sync-{key[:8]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=60)
            sync()

    def drop_partial(self, key: str) -> None:
        """The key is committed: its checkpoints have served (markers first, then files)."""
        head = self._partial(key)
        names = [b.name for b in self.container.list_blobs(name_starts_with=head)]
        for name in sorted(names, key=lambda n: not n.endswith(".commit.json")):
            with contextlib.suppress(Exception):
                self.container.delete_blob(name)

    # ---- driver attempts ----------------------------------------------------------------------------------
    def count_attempt(self, job: str) -> int:
        """1 for a driver job's first start, 2 after Azure ML requeued it (preemption), ..."""
        name = f"{self.prefix}/attempts/{job}.json"
        doc, _ = self._read_json(name)
        n = int((doc or {}).get("attempts", 0)) + 1
        self.container.upload_blob(name, json.dumps({"attempts": n, "at": time.time()}).encode(), overwrite=True)
        return n


def _local_checkpoints(folder: Path) -> dict[int, Path]:
    """step -> folder of every complete checkpoint (core/checkpoints: its marker written last) under folder."""
    return dict(complete_checkpoints(folder))


def _first(exc: BaseException) -> str:
    from orchestrator.systems.azureml.logstream import redact_sas

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return redact_sas(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:300]
