"""A Hugging Face Hub stand-in on 127.0.0.1: exactly the routes huggingface_hub and datasets call, strict.

Why not a mirror from PyPI: `olah` 0.5.4 (58 packages, 113 MB) serves local git repos as mirrors, but answered 401
for such a repo in offline mode out of the box, has no per-repo tokens (private repos) and answers unknown routes
as a proxy would. Tests need the opposite: a request the stand-in does not know is recorded in
`unknown_requests` (the fixture fails the test on it: a new client release must be looked at, as with the Azure
stand-in), a private repo answers 401 without a valid token, as the hub does.

Routes (huggingface_hub 2.4, datasets 5.2):
  GET  /api/agent-harnesses                                  huggingface_hub's agent registry (an empty one)
  GET  /api/{models|datasets}/{repo}[/revision/{rev}]        repo info: sha, siblings, private, cardData
  GET  /api/{models|datasets}/{repo}/tree/{rev}[/{path}]     files and folders (recursive=true: all below)
  POST /api/{models|datasets}/{repo}/paths-info/{rev}        entries of the given paths
  GET  /api/{models|datasets}/{repo}/refs                    branches and tags
  HEAD|GET /{repo}/resolve/{rev}/{path}, /datasets/{repo}/resolve/{rev}/{path}
       a file, with ETag (git blob id, or sha256 for LFS files), X-Repo-Commit, Content-Length; Range served
Errors carry the hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound): huggingface_hub maps them to
its exception types. Without a valid token a missing or private repo is 401 (the hub hides which); with one, a
missing repo is 404. An unknown token is 401 "Invalid credentials in Authorization header" on every route.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .repos import Commit, Repo, git_blob_id, is_lfs

TYPES = {"models": "model", "datasets": "dataset"}
REPO = r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)"
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (m, re.compile("^" + p + "$"), name)
    for m, p, name in [
        ("GET", r"/api/agent-harnesses", "agent_harnesses"),
        ("GET", rf"/api/(?P<kind>models|datasets)/{REPO}", "info"),
        ("GET", rf"/api/(?P<kind>models|datasets)/{REPO}/revision/(?P<rev>[^/]+)", "info"),
        ("GET", rf"/api/(?P<kind>models|datasets)/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
        ("POST", rf"/api/(?P<kind>models|datasets)/{REPO}/paths-info/(?P<rev>[^/]+)", "paths_info"),
        ("GET", rf"/api/(?P<kind>models|datasets)/{REPO}/refs", "refs"),
        ("HEAD", rf"/(?P<kind>datasets/)?{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("GET", rf"/(?P<kind>datasets/)?{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]
]
SECRET_HEADERS = ("authorization", "cookie")


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class HubStandIn:
    """The served repos, the accepted tokens, and what was asked (request_log, unknown_requests)."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.tokens: set[str] = set()
        self.request_log: list[dict[str, Any]] = []
        self.unknown_requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # ---- content ------------------------------------------------------------------------------------------
    def add_repo(
        self, repo_id: str, files: dict[str, bytes], *, repo_type: str = "model", private: bool = False,
        tag: str | None = None, message: str = "upload",
    ) -> Commit:  # fmt: skip
        """Push `files` as a new commit of the repo (created on first use); returns the commit."""
        key = (repo_type, repo_id)
        with self.lock:
            repo = self.repos.setdefault(key, Repo(repo_id, repo_type, private=private))
            repo.private = private
            return repo.push(files, message=message, tag=tag)

    def requests(self, method: str | None = None, pattern: str = "") -> list[dict[str, Any]]:
        with self.lock:
            log = list(self.request_log)
        return [r for r in log if (method is None or r["method"] == method) and re.search(pattern, r["path"])]

    # ---- serving ------------------------------------------------------------------------------------------
    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        split = urlsplit(raw_path)
        query = {k: v for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        entry = {"method": method, "path": unquote(split.path), "query": query,
                 "headers": {k: v for k, v in headers.items() if k not in SECRET_HEADERS},
                 "authorized": "authorization" in headers, "status": None}  # fmt: skip
        with self.lock:
            self.request_log.append(entry)
        try:
            status, out_headers, payload = self._route(method, split.path, query, headers, body)
        except HubError as e:
            status = e.status
            out_headers = {"X-Error-Message": e.message, "Content-Type": "application/json"}
            if e.code:
                out_headers["X-Error-Code"] = e.code
            payload = json.dumps({"error": e.message}).encode()
        entry["status"] = status
        return status, out_headers, payload

    def _route(self, method: str, path: str, query: dict, headers: dict[str, str], body: bytes):  # noqa: ANN202
        for m, pattern, name in ROUTES:
            match = pattern.match(path)
            if match and m == method:
                self._check_token(headers)
                return getattr(self, f"_{name}")(match, query, headers, body)
        with self.lock:
            self.unknown_requests.append({"method": method, "path": path, "query": query})
        raise HubError(404, None, f"hub stand-in: no such route {method} {path} (add it to tests/hub_standin)")

    def _check_token(self, headers: dict[str, str]) -> None:
        auth = headers.get("authorization", "")
        if auth and auth.removeprefix("Bearer ").strip() not in self.tokens:
            raise HubError(401, None, "Invalid credentials in Authorization header")

    def _repo(self, match: re.Match[str], headers: dict[str, str]) -> Repo:
        kind = (match.groupdict().get("kind") or "models").strip("/")
        repo_type = TYPES[kind]
        repo_id = unquote(match["repo"])
        repo = self.repos.get((repo_type, repo_id))
        authorized = bool(headers.get("authorization"))
        if repo is None or (repo.private and not authorized):
            raise HubError(404 if authorized else 401, "RepoNotFound", "Repository not found")
        return repo

    def _commit(self, repo: Repo, match: re.Match[str]) -> Commit:
        rev = unquote(match.groupdict().get("rev") or "main")
        commit = repo.commit(rev)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return commit

    # ---- handlers -----------------------------------------------------------------------------------------
    def _agent_harnesses(self, match, query, headers, body):  # noqa: ANN001, ANN202
        return _json({"standardEnvVars": [], "harnesses": {}})

    def _info(self, match, query, headers, body):  # noqa: ANN001, ANN202
        repo = self._repo(match, headers)
        commit = self._commit(repo, match)
        info: dict[str, Any] = {
            "_id": git_blob_id(repo.repo_id.encode()), "id": repo.repo_id, "author": repo.repo_id.split("/")[0],
            "sha": commit.sha, "lastModified": "2026-01-01T00:00:00.000Z", "private": repo.private,
            "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        }  # fmt: skip
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            cfg = commit.files.get("config.json")
            if cfg:
                info["config"] = {"model_type": json.loads(cfg).get("model_type")}
        card = _card_data(commit.files.get("README.md"))
        if card is not None:
            info["cardData"] = card
        return _json(info)

    def _tree(self, match, query, headers, body):  # noqa: ANN001, ANN202
        commit = self._commit(self._repo(match, headers), match)
        base = unquote(match["path"] or "").strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        if base and base not in commit.folders():
            raise HubError(404, "EntryNotFound", f"{base} does not exist on {commit.sha}")
        prefix = base + "/" if base else ""
        out = []
        for folder in sorted(commit.folders()):
            rest = folder[len(prefix):] if folder.startswith(prefix) else None
            if rest and (recursive or "/" not in rest):
                out.append({"type": "directory", "oid": git_blob_id(folder.encode()), "size": 0, "path": folder})
        for path in sorted(commit.files):
            rest = path[len(prefix):] if path.startswith(prefix) else None
            if rest and (recursive or "/" not in rest):
                out.append(commit.entry(path))
        return _json(out)

    def _paths_info(self, match, query, headers, body):  # noqa: ANN001, ANN202
        commit = self._commit(self._repo(match, headers), match)
        text = body.decode()
        form = json.loads(text) if text.startswith("{") else parse_qs(text)
        paths = form.get("paths") or []
        paths = [paths] if isinstance(paths, str) else paths
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.files:
                out.append(commit.entry(p))
            elif p in commit.folders():
                out.append({"type": "directory", "oid": git_blob_id(p.encode()), "size": 0, "path": p})
        return _json(out)

    def _refs(self, match, query, headers, body):  # noqa: ANN001, ANN202
        repo = self._repo(match, headers)
        branches = [{"name": "main", "ref": "refs/heads/main", "targetCommit": repo.refs["main"]}]
        tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in repo.refs.items() if n != "main"]
        return _json({"branches": branches, "converts": [], "tags": tags})

    def _resolve(self, match, query, headers, body):  # noqa: ANN001, ANN202
        repo = self._repo(match, headers)
        commit = self._commit(repo, match)
        path = unquote(match["path"])
        if path not in commit.files:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {commit.sha}")
        data = commit.files[path]
        entry = commit.entry(path)
        etag = entry["lfs"]["oid"] if is_lfs(path) else entry["oid"]  # type: ignore[index]
        out = {"ETag": f'"{etag}"', "X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes",
               "Content-Type": "application/octet-stream"}  # fmt: skip
        if is_lfs(path):
            out["X-Linked-Etag"] = f'"{etag}"'
            out["X-Linked-Size"] = str(len(data))
        rng = re.match(r"bytes=(\d*)-(\d*)$", headers.get("range", ""))
        if rng and (rng[1] or rng[2]):
            start = int(rng[1]) if rng[1] else max(0, len(data) - int(rng[2]))
            end = min(int(rng[2]), len(data) - 1) if rng[1] and rng[2] else len(data) - 1
            out["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return 206, out, data[start : end + 1]
        return 200, out, data

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> str:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                status, out_headers, payload = standin.handle(method, self.path, headers, body)
                self.send_response(status)
                for k, v in out_headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(payload)

            def do_GET(self) -> None:  # noqa: N802
                self._serve("GET")

            def do_HEAD(self) -> None:  # noqa: N802
                self._serve("HEAD")

            def do_POST(self) -> None:  # noqa: N802
                self._serve("POST")

            def do_PUT(self) -> None:  # noqa: N802
                self._serve("PUT")

            def do_DELETE(self) -> None:  # noqa: N802
                self._serve("DELETE")

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="hub-standin", daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _json(data: Any) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(data).encode()


def _card_data(readme: bytes | None) -> dict[str, Any] | None:
    """The YAML front matter of a README (a dataset card's configs), as the hub returns it in cardData."""
    if not readme:
        return None
    m = re.match(rb"^---\n(.*?)\n---", readme, re.S)
    if not m:
        return None
    import yaml

    data = yaml.safe_load(m[1])
    return data if isinstance(data, dict) else None


@contextmanager
def start_hub() -> Iterator[HubStandIn]:
    """A running stand-in (empty: add repos with add_repo); stopped on exit."""
    hub = HubStandIn()
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()
