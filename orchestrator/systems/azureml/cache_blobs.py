"""The blob operations the workspace cache is made of, over one ContainerClient: a JSON blob read with its etag,
a folder listed with sizes, a file uploaded, a folder deleted; and the name of a writer's folder. Its entries
(workspace_cache) and its checkpoints (cache_checkpoints) are both built on these."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from orchestrator.systems.base import SystemFailure


class CacheUnreadable(SystemFailure):
    """The workspace cache cannot be reached (credentials, network)."""


def writer_id() -> str:
    """A fresh folder name for one writer (the Azure ML job's run id, or `client`, + a random tail): two writers of
    one key never write into each other's objects."""
    job = os.environ.get("AZUREML_RUN_ID")
    return f"{job or 'client'}-{uuid.uuid4().hex[:8]}"


def is_missing(exc: BaseException) -> bool:
    """azure-core's ResourceNotFoundError (a blob or resource that is not there), told by name: no azure import."""
    return type(exc).__name__ == "ResourceNotFoundError"


def read_json(container: Any, name: str) -> tuple[dict[str, Any] | None, str | None]:
    """(document, etag) of a JSON blob; (None, None) when absent; ({}, etag) when it is not valid JSON."""
    blob = container.get_blob_client(name)
    try:
        dl = blob.download_blob()
        data = dl.readall()
        etag = dl.properties.etag
    except Exception as exc:
        if is_missing(exc):
            return None, None
        raise
    try:
        doc = json.loads(data)
    except ValueError:
        return {}, etag
    return (doc if isinstance(doc, dict) else {}), etag


def listing(container: Any, blob_prefix: str) -> dict[str, int]:
    """name below blob_prefix -> size of every blob under it (one listing)."""
    return {b.name[len(blob_prefix) :]: b.size for b in container.list_blobs(name_starts_with=blob_prefix)}


def upload_file(container: Any, path: Path, name: str) -> None:
    """One local file -> blob `name` (replaced if there)."""
    with path.open("rb") as fh:
        container.upload_blob(name, fh, overwrite=True, max_concurrency=4)


def delete_prefix(container: Any, blob_prefix: str) -> int:
    """Delete every blob under blob_prefix (best effort); how many went."""
    n = 0
    for b in list(container.list_blobs(name_starts_with=blob_prefix)):
        with contextlib.suppress(Exception):
            container.delete_blob(b.name)
            n += 1
    return n
