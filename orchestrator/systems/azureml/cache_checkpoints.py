"""A running pass's checkpoints kept in the workspace cache, so that a requeued attempt (a preempted low-priority
node) or a later submit resumes from the newest one instead of step 0. Under the cache prefix:

    partial/<key>/<writer>/checkpoint-<N>/...           a complete checkpoint's files, uploaded first
    partial/<key>/<writer>/checkpoint-<N>.commit.json   its marker (the files' manifest), written last

A checkpoint counts only through its marker and only when every file it lists is there with its size; a download
checks each file's sha256 and writes the completeness marker (core/checkpoints) last. The newest KEEP_CHECKPOINTS
stay; the key's checkpoints go once the key is committed."""

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
from pathlib import Path
from typing import Any

from orchestrator.core.cache import file_sha256, folder_manifest
from orchestrator.core.checkpoints import COMPLETE_MARKER, complete_checkpoints
from orchestrator.systems.azureml.cache_blobs import (
    CacheUnreadable,
    delete_prefix,
    listing,
    read_json,
    upload_file,
    writer_id,
)
from orchestrator.systems.azureml.logstream import describe

SYNC_EVERY_S = float(os.environ.get("ORCH_CHECKPOINT_SYNC_S", "0.5"))  # a local folder listing: cheap
KEEP_CHECKPOINTS = 2


class PartialCheckpoints:
    """The checkpoints of every key under `prefix` (the workspace cache's) of one blob container."""

    def __init__(self, container: Any, prefix: str) -> None:
        self.container = container
        self.prefix = prefix

    def prefix_of(self, key: str) -> str:
        """partial/<key>/ under the cache prefix: every writer's checkpoints of `key`."""
        return f"{self.prefix}/partial/{key}/"

    def remote_checkpoints(self, key: str) -> list[tuple[int, str, dict[str, Any]]]:
        """(step, blob folder, manifest) of every committed checkpoint of `key`, newest first."""
        out = []
        head = self.prefix_of(key)
        for b in self.container.list_blobs(name_starts_with=head):
            m = re.match(r"^([^/]+)/checkpoint-(\d+)\.commit\.json$", b.name[len(head) :])
            if m:
                doc, _ = read_json(self.container, b.name)
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
            sizes = listing(self.container, blob_folder)
            if any(sizes.get(n) != int(i["size"]) for n, i in files.items()):
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
        head = f"{self.prefix_of(key)}{writer}/"
        files = folder_manifest(folder, exclude=())
        for name in sorted(files, key=lambda n: n == COMPLETE_MARKER):
            upload_file(self.container, folder / name, f"{head}checkpoint-{step}/{name}")
        body = json.dumps({"key": key, "step": step, "files": files, "at": time.time()}).encode()
        self.container.upload_blob(f"{head}checkpoint-{step}.commit.json", body, overwrite=True)
        for _, blob_folder, _ in self.remote_checkpoints(key)[KEEP_CHECKPOINTS:]:
            with contextlib.suppress(Exception):  # marker first: a reader never sees a half-deleted one
                self.container.delete_blob(blob_folder.rstrip("/") + ".commit.json")
            delete_prefix(self.container, blob_folder)

    @contextlib.contextmanager
    def checkpoints(self, key: str, folder: Path, log: Callable[[str], None]) -> Iterator[None]:
        """Around a pass run: restore the newest workspace checkpoint of `key` into folder first, then upload
        every new complete checkpoint the pass writes there (a background thread, every SYNC_EVERY_S; once more
        at the end), so a requeued attempt or a later submit resumes from it."""
        folder.mkdir(parents=True, exist_ok=True)
        try:
            step = self.restore_checkpoint(key, folder)
        except Exception as exc:  # noqa: BLE001 - no checkpoint: the pass starts from step 0
            log(f"orch: could not restore checkpoints from the workspace: {describe(exc)}")
            step = None
        if step is not None:
            log(f"orch: restored checkpoint-{step} of {key[:16]} from the workspace cache")
        writer = writer_id()
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
                    log(f"orch: checkpoint-{n} upload failed, will retry: {describe(exc)}")

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

    def drop(self, key: str) -> None:
        """The key is committed: its checkpoints have served (markers first, then files)."""
        head = self.prefix_of(key)
        names = [b.name for b in self.container.list_blobs(name_starts_with=head)]
        for name in sorted(names, key=lambda n: not n.endswith(".commit.json")):
            with contextlib.suppress(Exception):
                self.container.delete_blob(name)


def _local_checkpoints(folder: Path) -> dict[int, Path]:
    """step -> folder of every complete checkpoint (core/checkpoints: its marker written last) under folder."""
    return dict(complete_checkpoints(folder))
