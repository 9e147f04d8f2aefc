"""What the hub stand-in serves: repositories (models, datasets) with commits, branches and tags, as in git.

A commit is a mapping of file paths to bytes; its sha is derived from its content (sorted paths and their git blob
ids), so the same files always get the same sha, as a re-upload of identical files does on the hub. Files with
the suffixes the hub stores in LFS (weights, parquet, archives) get an LFS entry (sha256 oid), as on the hub.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".zst", ".gz", ".arrow", ".onnx", ".data", ".model", ".pt")


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content (what the hub returns as a non-LFS file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # noqa: S324 - git's own id, not security


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


@dataclass
class Commit:
    files: dict[str, bytes]
    message: str = "upload"
    sha: str = ""

    def __post_init__(self) -> None:
        h = hashlib.sha1()  # noqa: S324 - a content-derived commit id, as git's
        for path in sorted(self.files):
            h.update(path.encode() + b"\0" + git_blob_id(self.files[path]).encode() + b"\n")
        h.update(self.message.encode())
        self.sha = h.hexdigest()

    def entry(self, path: str) -> dict[str, object]:
        """The tree / paths-info entry of one file, as the hub answers it."""
        data = self.files[path]
        out: dict[str, object] = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
        if is_lfs(path):
            out["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return out

    def folders(self) -> set[str]:
        return {"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)}


@dataclass
class Repo:
    repo_id: str
    repo_type: str  # "model" | "dataset"
    private: bool = False
    gated: bool = False
    commits: list[Commit] = field(default_factory=list)
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag name -> commit sha ("main" -> newest)

    def push(self, files: dict[str, bytes], *, message: str = "upload", tag: str | None = None) -> Commit:
        commit = Commit(dict(files), message)
        self.commits.append(commit)
        self.refs["main"] = commit.sha
        if tag:
            self.refs[tag] = commit.sha
        return commit

    def commit(self, revision: str) -> Commit | None:
        """A branch, a tag or a (full or short) commit sha -> the commit; None if none matches."""
        sha = self.refs.get(revision, revision)
        for c in self.commits:
            if c.sha == sha or (len(revision) >= 7 and c.sha.startswith(revision)):
                return c
        return None


def folder_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    """Every file under `folder` (symlinks followed), keyed by its path relative to it (with `prefix`)."""
    return {
        prefix + p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and ".cache" not in p.relative_to(folder).parts
    }
