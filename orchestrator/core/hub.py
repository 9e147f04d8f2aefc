"""Hugging Face Hub references, as on a user's machine: pinned to a commit, downloaded into the HF cache.

A model id (`microsoft/Phi-3-mini-4k-instruct`) or a dataset id (`Salesforce/wikitext`) goes through huggingface_hub
with its cache (HF_HOME / HF_HUB_CACHE), its endpoint (HF_ENDPOINT) and its token (HF_TOKEN, or the one `hf auth
login` stored; on Azure ML the workflow's `hf_token` secret): never written anywhere by orch. `pin` asks the hub
once which commit a revision is (that sha is the reference's identity in cache keys: a commit's files never
change), `fetch` downloads exactly the files a run reads (a model's config, weights and tokenizer; a dataset
config's data files) with `snapshot_download(allow_patterns=...)`. Offline (HF_HUB_OFFLINE=1) or with the hub
unreachable, the cached snapshot is used if there is one; otherwise, and on 401/404, HubError: one line naming the
field, the id and how to point orch at a local copy. Timeouts are short (ORCH_HUB_TIMEOUT, 10 s): no retry loop.

`hf://<repo>@<sha>` / `hf://datasets/<repo>@<sha>` is the form a job carries when the system fetches it itself
(Azure ML: the job downloads with the workspace's token); `materialize` turns it into a local folder there.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from orchestrator.core.errors import UserError

HF_SCHEME = "hf://"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
DATASET_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow"})
# a model's files orch reads: config, weights, tokenizer, chat template, remote code (no README, ONNX, GGUF, flax)
MODEL_FILE = re.compile(r"^[^/]+\.(json|safetensors|bin|model|txt|py|jinja|tiktoken)$")
_PINNED: dict[tuple[str, str, str], tuple[HubRef, list[str]]] = {}
_FETCHED: dict[tuple[str, tuple[str, ...]], Path] = {}
_PRIVATE: dict[tuple[str, str], bool] = {}


def needs_token(repo_type: str, repo_id: str) -> bool:
    """Whether a pinned repo is private or gated (as the hub said when it was pinned; False if not asked)."""
    return _PRIVATE.get((repo_type, repo_id), False)


class HubError(UserError):
    """A hub reference that cannot be resolved: one line naming the field, the id and the fix."""


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    repo_type: str = "model"  # "model" | "dataset"
    revision: str | None = None  # as asked: a branch, a tag or a commit (None: main)
    sha: str | None = None  # the commit it is pinned to
    files: tuple[str, ...] = ()  # the files a job reads (a data config's, chosen on the client); () = a model's

    @property
    def uri(self) -> str:
        kind = "datasets/" if self.repo_type == "dataset" else ""
        files = f"?files={','.join(quote(f, safe='/*-_.') for f in self.files)}" if self.files else ""
        return f"{HF_SCHEME}{kind}{self.repo_id}@{self.sha or self.revision or 'main'}{files}"

    @classmethod
    def parse(cls, uri: str) -> HubRef:
        rest, _, query = uri.removeprefix(HF_SCHEME).partition("?files=")
        repo_type = "dataset" if rest.startswith("datasets/") else "model"
        rest = rest.removeprefix("datasets/")
        repo_id, _, rev = rest.partition("@")
        sha = rev if re.fullmatch(r"[0-9a-f]{40}", rev or "") else None
        files = tuple(unquote(f) for f in query.split(",") if f)
        return cls(repo_id, repo_type, rev or None, sha, files)


def is_hub_uri(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(HF_SCHEME)


def is_dataset_id(data_name: Any) -> bool:
    """A data config's data_name read from the hub (as `datasets` decides): not a builder ("json"), not a local
    path (the reader made existing and ./-relative ones absolute), an `org/name` or canonical `name`."""
    return (
        isinstance(data_name, str)
        and data_name not in DATASET_BUILDERS
        and not os.path.isabs(data_name)
        and not data_name.startswith(("./", "../", "~"))
        and bool(REPO_ID.match(data_name))
    )


def timeout() -> float:
    return float(os.environ.get("ORCH_HUB_TIMEOUT", "10"))


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _local_copy_hint(ref: HubRef) -> str:
    kind = " --repo-type dataset" if ref.repo_type == "dataset" else ""
    rev = f" --revision {ref.revision}" if ref.revision and ref.revision != "main" else ""
    local = "a local folder path (config.json, weights, tokenizer)" if ref.repo_type == "model" else (
        "a local folder or data_files")  # fmt: skip
    return (
        f"download it where the hub is reachable (`hf download {ref.repo_id}{kind}{rev}`, it lands in the HF cache "
        f"that HF_HOME names) or give {local} instead"
    )


def _cached(ref: HubRef) -> Path | None:
    """The snapshot folder of the revision in the HF cache, if there is one (no network). Read from the cache's
    documented layout (<repo>/refs/<branch or tag> -> <repo>/snapshots/<commit>/): huggingface_hub's own
    local_files_only lookup refuses a snapshot that holds only some of the repo's files, which is what orch keeps."""
    from huggingface_hub import constants

    repo = Path(constants.HF_HUB_CACHE) / f"{ref.repo_type}s--{ref.repo_id.replace('/', '--')}"
    rev = ref.sha or ref.revision or "main"
    if not re.fullmatch(r"[0-9a-f]{40}", rev):
        try:
            rev = (repo / "refs" / rev).read_text().strip()
        except OSError:
            return None
    snap = repo / "snapshots" / rev
    return snap if snap.is_dir() else None


def pin(ref: HubRef, *, field: str) -> tuple[HubRef, list[str]]:
    """(ref pinned to its commit sha, the files of that commit). Online: one repo-info request (short timeout);
    offline or unreachable: the cached snapshot's commit and files. Raises HubError (one line) otherwise."""
    key = (ref.repo_type, ref.repo_id, ref.revision or "main")
    if key in _PINNED:
        return _PINNED[key]
    what = f"{field}: {ref.repo_type} {ref.repo_id}" + (f" (revision {ref.revision})" if ref.revision else "")
    if offline():
        cached = _cached(ref)
        if cached is None:
            raise HubError(
                f"{what} is not in the Hugging Face cache ({_hub_cache()}) and HF_HUB_OFFLINE=1 forbids downloading "
                f"it; {_local_copy_hint(ref)}"
            )
        out = (HubRef(ref.repo_id, ref.repo_type, ref.revision, cached.name), _files_in(cached))
        _PINNED[key] = out
        return out
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import httpx  # httpx2 under huggingface_hub 2.x

    try:
        info = HfApi().repo_info(ref.repo_id, repo_type=ref.repo_type, revision=ref.revision, timeout=timeout())
    except RevisionNotFoundError:
        raise HubError(
            f"{what}: no revision {ref.revision!r} on the hub at {endpoint()}; give a branch, tag or commit it has"
        ) from None
    except GatedRepoError:
        raise HubError(
            f"{what} is gated: accept its terms on the hub and use a token that has access (HF_TOKEN or `hf auth "
            f"login`), or {_local_copy_hint(ref)}"
        ) from None
    except RepositoryNotFoundError:
        token = "the token in use has no access to it" if _has_token() else "set a token (HF_TOKEN or `hf auth login`)"
        raise HubError(
            f"{what} was not found on the hub at {endpoint()}: check the id; if it is private or gated, {token}"
        ) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        detail = "the token is not valid (HF_TOKEN or the stored one)" if status == 401 else f"HTTP {status}"
        raise HubError(f"{what}: the hub at {endpoint()} refused it ({detail}); {_local_copy_hint(ref)}") from None
    except (httpx.HTTPError, OSError, OfflineModeIsEnabled) as exc:
        cached = _cached(ref)
        if cached is not None:  # as transformers does: the cached copy when the hub cannot be reached
            out = (HubRef(ref.repo_id, ref.repo_type, ref.revision, cached.name), _files_in(cached))
            _PINNED[key] = out
            return out
        raise HubError(
            f"{what}: the hub at {endpoint()} is unreachable ({type(exc).__name__}: {_first_line(exc)}) and it is not "
            f"in the Hugging Face cache; {_local_copy_hint(ref)}"
        ) from None
    files = [s.rfilename for s in (info.siblings or [])]
    _PRIVATE[(ref.repo_type, ref.repo_id)] = bool(getattr(info, "private", False) or getattr(info, "gated", False))
    out = (HubRef(ref.repo_id, ref.repo_type, ref.revision, info.sha), files)
    _PINNED[key] = out
    return out


def fetch(ref: HubRef, patterns: list[str], *, field: str) -> Path:
    """The local snapshot folder of a pinned ref holding (at least) the files matching `patterns`: from the HF
    cache when they are all there, else downloaded (only those files)."""
    key = (ref.uri, tuple(patterns))
    if key in _FETCHED:
        return _FETCHED[key]
    what = f"{field}: {ref.repo_type} {ref.repo_id}"
    cached = _cached(ref)
    if cached is not None and _complete(cached, patterns):
        _FETCHED[key] = cached
        return cached
    if offline():
        raise HubError(f"{what}: not all of its files are in the Hugging Face cache and HF_HUB_OFFLINE=1; "
                       f"{_local_copy_hint(ref)}")  # fmt: skip
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import httpx  # httpx2 under huggingface_hub 2.x

    try:
        path = Path(
            snapshot_download(
                ref.repo_id, repo_type=ref.repo_type, revision=ref.sha or ref.revision, allow_patterns=patterns,
                etag_timeout=timeout(),
            )
        )  # fmt: skip
    except (HfHubHTTPError, httpx.HTTPError, OSError) as exc:
        raise HubError(f"{what}: download from {endpoint()} failed ({type(exc).__name__}: {_first_line(exc)}); "
                       f"{_local_copy_hint(ref)}") from None  # fmt: skip
    _record_ref(path, ref)
    _FETCHED[key] = path
    return path


def _record_ref(snapshot: Path, ref: HubRef) -> None:
    """Downloaded by commit (so the files are the pinned ones), the cache is told which commit the asked branch
    or tag was, as huggingface_hub does itself: an offline run then finds `main` (or the tag) in the cache."""
    rev = ref.revision or "main"
    if ref.sha is None or rev == ref.sha:
        return
    refs = snapshot.parent.parent / "refs" / rev
    try:
        refs.parent.mkdir(parents=True, exist_ok=True)
        if not refs.exists() or refs.read_text().strip() != ref.sha:
            tmp = refs.with_name(f".{refs.name}.{os.getpid()}")
            tmp.write_text(ref.sha)
            os.replace(tmp, refs)
    except OSError:
        pass  # a read-only cache: the next offline run falls back to asking for the commit itself


def model_files(files: list[str]) -> list[str]:
    """What a run reads of a model repo: top-level config / tokenizer / chat template / remote code files and the
    weights, safetensors if the repo has them (then no *.bin)."""
    chosen = [f for f in files if MODEL_FILE.match(f)]
    if any(f.endswith(".safetensors") for f in chosen):
        chosen = [f for f in chosen if not f.endswith(".bin")]
    return sorted(chosen)


def materialize(uri: str, *, field: str) -> Path:
    """A job's hf:// reference -> a local snapshot folder, downloaded where the job runs (Azure ML): the files the
    client chose (a data config's; else the whole dataset repo), or a model's config, weights and tokenizer."""
    asked = HubRef.parse(uri)
    ref, files = pin(asked, field=field)
    wanted = list(asked.files) or (model_files(files) if ref.repo_type == "model" else files)
    return fetch(ref, wanted, field=field)


def cache_mount(path: str | Path) -> tuple[Path, str] | None:
    """For a path inside an HF cache snapshot (its files are links into the repo's blobs/): (the repo folder to
    mount, the path inside it), so a container sees the links' targets too; None for any other path."""
    p = Path(path)
    for i, parent in enumerate(p.parents):
        if parent.name == "snapshots" and (parent.parent / "blobs").is_dir():
            return parent.parent, p.relative_to(parent.parent).as_posix()
        if i > 3:
            break
    return None


def _files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _complete(folder: Path, patterns: list[str]) -> bool:
    return all((folder / p).exists() for p in patterns if not any(ch in p for ch in "*?["))


def _hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _has_token() -> bool:
    from huggingface_hub import get_token

    return bool(get_token())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
