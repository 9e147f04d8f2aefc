"""Remote Azure ML artifacts -> local folders, downloaded once into `<cache>/remote/<hash>/`.

Why here and not the SDK's download helpers: orch needs (1) a download done once per reference and shared by all
runs, (2) a folder that is either complete or absent (a killed download never looks finished), and (3) refusal of
any blob name that would land outside its target folder (`../`, absolute names), checked *before* writing. So
this module lists the blobs itself (azure-storage-blob), writes into a temp folder, checks every file's size
against the listing, and renames the folder into place.

References understood:
  azureml://datastores/<ds>/paths/<p>                 (also the long form with subscriptions/.../workspaces/...)
  azureml://registries/<r>/models/<n>/versions/<v>
  azureml:<name>:<version>                            (a workspace model; azureml:<name>@<label> too)
  azureml://jobs/<job>/outputs/<output>[/paths/<p>]   (a job's named output)
and the typed dicts of the config package (azureml_registry_model, azureml_model, azureml_datastore).

A `ref.json` beside the data records the original reference, so systems that run in the workspace can pass the
reference itself instead of re-uploading the bytes (`origin_of`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from orchestrator.core.cache import Cache, stable_hash
from orchestrator.core.errors import RunFailure

REGISTRY_RX = re.compile(r"^azureml://registries/([^/]+)/models/([^/]+)/versions/([^/]+)/?$")
DATASTORE_RX = re.compile(
    r"^azureml://(?:subscriptions/[^/]+/resource[gG]roups/[^/]+/(?:providers/Microsoft\.MachineLearningServices/)?"
    r"workspaces/[^/]+/)?datastores/([^/]+)/paths/(.*)$"
)
WS_MODEL_RX = re.compile(r"^azureml:([^:@/]+)(?::([^:@]+)|@([^:@]+))$")
JOB_OUTPUT_RX = re.compile(r"^azureml://jobs/([^/]+)/outputs/([^/]+)(?:/paths/(.*))?$")
REF_FILE = "ref.json"
DATA_DIR = "data"


class DownloadError(RunFailure):
    """A remote artifact could not be fetched or failed its checks: one line naming the field and reference."""


def reference_uri(ref: Any) -> str:
    """The canonical string form of a reference (typed dict, pydantic resource, or string)."""
    if hasattr(ref, "model_dump"):
        ref = ref.model_dump(mode="json", exclude_none=True)
    if isinstance(ref, str):
        return ref.strip()
    if isinstance(ref, dict):
        cfg = {**ref, **(ref.get("config") or {})}
        kind = cfg.get("type")
        if kind == "azureml_registry_model":
            return f"azureml://registries/{cfg['registry_name']}/models/{cfg['name']}/versions/{cfg['version']}"
        if kind == "azureml_model":
            return (
                f"azureml:{cfg['name']}:{cfg['version']}"
                if cfg.get("version")
                else f"azureml:{cfg['name']}@{cfg['label']}"
            )
        if kind in ("azureml_datastore", "azureml_data"):
            if cfg.get("datastore_name"):
                return f"azureml://datastores/{cfg['datastore_name']}/paths/{cfg['relative_path']}"
            return f"azureml:{cfg['name']}:{cfg['version']}"
    raise DownloadError(f"not an Azure ML reference: {ref!r}")


def safe_join(root: Path, name: str) -> Path:
    """root/name, refusing names that are absolute or climb out of root (a hostile listing or archive)."""
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", name) or any(p == ".." for p in pure.parts) or not pure.parts:
        raise DownloadError(f"refusing entry {name!r}: it would land outside {root}")
    target = (root / Path(*pure.parts)).resolve()
    if not target.is_relative_to(root.resolve()):
        raise DownloadError(f"refusing entry {name!r}: it would land outside {root}")
    return target


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a zip/tar archive, refusing any member (or link) that would land outside dest."""
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                target = safe_join(dest, info.filename)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out)
        return
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        for m in members:
            safe_join(dest, m.name)
            if m.issym() or m.islnk():
                raise DownloadError(f"refusing link {m.name!r} in {archive.name}")
        tf.extractall(dest, members=members, filter="data")


# ---- blob access ---------------------------------------------------------------------------------------
@dataclass
class BlobSource:
    """A container + prefix to copy from, with a client that can read it."""

    container: Any  # azure.storage.blob.ContainerClient
    prefix: str
    what: str


def _ml_client(ml_client: Any | None) -> Any:
    if ml_client is not None:
        return ml_client
    from orchestrator.systems.azureml.workspace import make_ml_client, resolve_settings

    return make_ml_client(resolve_settings())


def datastore_source(ml: Any, datastore: str, path: str) -> BlobSource:
    from azure.storage.blob import ContainerClient

    ds = ml.datastores.get(datastore, include_secrets=True)
    account_url = f"{getattr(ds, 'protocol', 'https') or 'https'}://{ds.account_name}.blob.{ds.endpoint}"
    creds = getattr(ds, "credentials", None)
    credential: Any = getattr(creds, "account_key", None) or getattr(creds, "sas_token", None)
    if credential is None:  # identity-based datastore: the user's own token
        credential = ml._credential
    container = ContainerClient(
        account_url, getattr(ds, "container_name", None) or ds.filesystem, credential=credential
    )
    return BlobSource(container, path, f"azureml://datastores/{datastore}/paths/{path}")


def _split_blob_url(url: str) -> tuple[str, str, str]:
    m = re.match(r"^(https?://[^/]+)/([^/?]+)/?([^?]*)", url)
    if not m:
        raise DownloadError(f"unexpected blob URI {url!r}")
    return m[1], m[2], m[3]


def _registry_source(ml: Any, registry: str, name: str, version: str) -> BlobSource:
    from azure.ai.ml import MLClient
    from azure.ai.ml._utils._registry_utils import get_storage_details_for_registry_assets
    from azure.storage.blob import ContainerClient

    reg = MLClient(ml._credential, ml.subscription_id, ml.resource_group_name, registry_name=registry,
                   **_cloud_kwargs(ml))  # fmt: skip
    model = reg.models.get(name, version=version)
    ops = reg.models
    sas_uri, auth = get_storage_details_for_registry_assets(
        service_client=ops._registry_service_client,
        asset_type="models",
        asset_name=name,
        asset_version=version,
        reg_name=registry,
        rg_name=ml.resource_group_name,
        uri=model.path,
    )
    _, _, prefix = _split_blob_url(model.path)
    if auth == "SAS":
        # a SAS for the container or for the model folder: normalize to the container
        base, cont, _ = _split_blob_url(sas_uri)
        query = sas_uri.split("?", 1)[1] if "?" in sas_uri else ""
        container = ContainerClient.from_container_url(f"{base}/{cont}?{query}")
    else:
        base, cont, _ = _split_blob_url(sas_uri)
        container = ContainerClient(base, cont, credential=ml._credential)
    return BlobSource(container, prefix, f"azureml://registries/{registry}/models/{name}/versions/{version}")


def _cloud_kwargs(ml: Any) -> dict[str, Any]:
    from orchestrator.systems.azureml.workspace import resolve_settings

    try:
        s = resolve_settings()
    except Exception:  # noqa: BLE001 - the public cloud needs no kwargs
        return {}
    return {"cloud": s.cloud, "cloud_metadata": s.cloud_metadata} if s.cloud_metadata else {}


def _workspace_model_source(ml: Any, name: str, version: str | None, label: str | None) -> tuple[BlobSource, str]:
    model = ml.models.get(name, version=version) if version else ml.models.get(name, label=label)
    uri = model.path or ""
    m = DATASTORE_RX.match(uri)
    if m:
        return datastore_source(ml, m[1], m[2]), f"azureml:{name}:{model.version}"
    raise DownloadError(f"azureml:{name}:{model.version}: model path {uri!r} is not a datastore path")


def _job_output_uri(ml: Any, job: str, output: str) -> str:
    j = ml.jobs.get(job)
    out = (j.outputs or {}).get(output)
    path = getattr(out, "path", None)
    return path or f"azureml://datastores/workspaceblobstore/paths/azureml/{job}/{output}/"


def resolve_source(uri: str, ml: Any) -> tuple[BlobSource, str]:
    """A reference -> (where its bytes are, its identity for cache keys)."""
    m = REGISTRY_RX.match(uri)
    if m:
        return _registry_source(ml, m[1], m[2], m[3]), uri.rstrip("/")
    m = JOB_OUTPUT_RX.match(uri)
    if m:
        base = _job_output_uri(ml, m[1], m[2]).rstrip("/")
        return resolve_source(base + ("/" + m[3] if m[3] else "/"), ml)
    m = DATASTORE_RX.match(uri)
    if m:
        return datastore_source(ml, m[1], m[2]), uri
    m = WS_MODEL_RX.match(uri)
    if m:
        return _workspace_model_source(ml, m[1], m[2], m[3])
    raise DownloadError(f"unsupported Azure ML reference {uri!r}")


# ---- the download -------------------------------------------------------------------------------------
def _listing(src: BlobSource) -> tuple[list[tuple[str, int]], bool]:
    """(relative name, size) of the blobs under the prefix; and whether the prefix names a single file."""
    prefix = src.prefix
    folder = prefix.rstrip("/") + "/" if prefix else ""
    items = [(b.name, b.size) for b in src.container.list_blobs(name_starts_with=folder)]
    rel = [(n[len(folder) :], s) for n, s in items if not n.endswith("/")]
    if rel:
        return rel, False
    if prefix and not prefix.endswith("/"):
        exact = [(b.name, b.size) for b in src.container.list_blobs(name_starts_with=prefix) if b.name == prefix]
        if exact:
            return [(PurePosixPath(prefix).name, exact[0][1])], True
    return [], False


def _folder_ok(data: Path, files: dict[str, int]) -> bool:
    try:
        return all((data / name).stat().st_size == size for name, size in files.items())
    except OSError:
        return False


def download_reference(
    ref: Any, *, cache: Cache, field: str = "artifact", ml_client: Any | None = None
) -> tuple[str, str]:
    """(local path, identity) of a remote artifact; downloaded once into <cache>/remote/<hash>/data."""
    from filelock import FileLock

    uri = reference_uri(ref)
    root = Path(cache.root) / "remote"
    root.mkdir(parents=True, exist_ok=True)
    final = root / stable_hash(uri)[:32]
    with FileLock(str(root / f"{final.name}.lock")):
        marker = final / REF_FILE
        if marker.exists():
            meta = json.loads(marker.read_text())
            data = final / DATA_DIR
            if _folder_ok(data, meta["files"]):
                path = data / meta["single"] if meta.get("single") else data
                return str(path), meta["identity"]
            shutil.rmtree(final, ignore_errors=True)  # damaged: fetch again
        ml = _ml_client(ml_client)
        try:
            src, identity = resolve_source(uri, ml)
            files, single = _listing(src)
        except DownloadError as exc:
            raise DownloadError(f"{field}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - SDK/HTTP errors become one line for the user
            raise DownloadError(f"{field}: cannot read {uri}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
        if not files:
            raise DownloadError(f"{field}: nothing found at {uri}")
        if DATASTORE_RX.match(uri) or JOB_OUTPUT_RX.match(uri):
            # datastore paths are mutable: the listing (names + sizes) is part of the identity
            identity = stable_hash([uri, sorted(files)])
        tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        data = tmp / DATA_DIR
        try:
            data.mkdir(parents=True)
            folder = src.prefix.rstrip("/") + "/" if not single else ""
            for name, size in files:
                target = safe_join(data, name)  # refused before anything is written
                target.parent.mkdir(parents=True, exist_ok=True)
                blob = src.prefix if single else folder + name
                with target.open("wb") as fh:
                    src.container.download_blob(blob).readinto(fh)
                if target.stat().st_size != size:
                    raise DownloadError(f"{field}: {name} from {uri} is {target.stat().st_size} bytes, listed {size}")
            meta = {"uri": uri, "identity": identity, "files": dict(files), "single": files[0][0] if single else None}
            (tmp / REF_FILE).write_text(json.dumps(meta, indent=1))
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    path = final / DATA_DIR / meta["single"] if meta.get("single") else final / DATA_DIR
    return str(path), identity


def origin_of(path: str | Path) -> str | None:
    """The Azure ML reference a local path was downloaded from (by download_reference), else None."""
    p = Path(path).resolve()
    for parent in (p, *p.parents):
        if parent.name == DATA_DIR and (parent.parent / REF_FILE).exists():
            meta = json.loads((parent.parent / REF_FILE).read_text())
            rel = p.relative_to(parent)
            uri = meta["uri"]
            if meta.get("single") or str(rel) == ".":
                return uri
            return uri.rstrip("/") + "/" + rel.as_posix()
    return None
