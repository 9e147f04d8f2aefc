"""Environment images, built the way Azure ML builds a registered Environment, on the real Docker engine.

Azure ML turns an Environment version into an image before a job runs (the job shows Preparing, and the build log
is the job's `azureml-logs/20_image_build_log.txt`):
- `image` + `condaFile`: FROM the base image, create the conda environment from the file, put it first on PATH;
- `build` (Dockerfile + context): `docker build` of the uploaded context.
Images are cached by content (base image id + conda file, or the context's bytes), so a second job with the same
environment builds nothing.

What differs here, and why:
- No registry is reachable, so nothing is pulled. Azure ML's curated base images (mcr.microsoft.com/azureml/...)
  are served from a local stand-in image (`image_aliases`, default: orch/base:bookworm-py311); any other image must
  exist locally, else the build fails as a failed pull does on Azure ML.
- That base image has no conda. A conda file whose dependencies are python + pip (+ pip packages) is realised as a
  venv at the same path conda would use; any other conda package fails the build with the reason.
- Builds reach the host's package index only (its pip index settings, find-links served on loopback, CA file).
  A conda file that names another index (`--extra-index-url https://download.pytorch.org/...`) fails the build
  instead of sending traffic off this machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import os
import re
import shlex
import tarfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

RECIPE = "1"  # bump when the recipe below changes what an image holds
ENV_ROOT = "/azureml-envs"
IMAGE_REPO = "azureml-standin/env"
DEFAULT_ALIASES = {"mcr.microsoft.com/azureml/": "orch/base:bookworm-py311"}
LineSink = Callable[[str], None]


class BuildError(Exception):
    """An environment that cannot be built; the message is what the job's error shows."""


@dataclass(frozen=True)
class BuiltEnv:
    tag: str
    built: bool  # False: the image existed (cache hit)


def _docker() -> Any:
    import docker

    return docker.from_env(timeout=900)


def resolve_base(image: str, aliases: dict[str, str]) -> str:
    """The local image that stands for `image` (an alias by prefix, else the name itself)."""
    for prefix, local in aliases.items():
        if image.startswith(prefix):
            return local
    return image


def _allowed_index_hosts() -> set[str]:
    """Hosts of the package indexes the host's pip uses: the only ones a build may reach."""
    hosts = {"pypi.org", "files.pythonhosted.org"}
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        for url in os.environ.get(var, "").split():
            m = re.match(r"^\w+://([^/:@]+@)?([^/:]+)", url)
            if m:
                hosts.add(m[2])
    return hosts


def parse_conda(text: str) -> tuple[str | None, list[str], list[str]]:
    """(python version, pip requirement lines, other conda packages) of a conda file's text."""
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise BuildError(f"condaFile is not valid YAML: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("dependencies"), list):
        raise BuildError("condaFile has no `dependencies` list")
    python, pip, other = None, [], []
    for dep in doc["dependencies"]:
        if isinstance(dep, dict) and "pip" in dep:
            pip += [str(x) for x in dep["pip"] or []]
        elif isinstance(dep, str):
            name = re.split(r"[=<>! ]", dep.strip(), maxsplit=1)[0]
            if name == "python":
                python = dep.strip()[len("python") :].lstrip("=<>! ") or None
            elif name != "pip":
                other.append(dep)
        else:
            raise BuildError(f"condaFile dependency {dep!r} is neither a package nor a pip block")
    return python, pip, other


def _check_indexes(pip_lines: list[str]) -> None:
    allowed = _allowed_index_hosts()
    for line in pip_lines:
        for url in re.findall(r"\w+://[^\s]+", line):
            host = re.match(r"^\w+://([^/:@]+@)?([^/:]+)", url)
            if line.lstrip().startswith("-") and host and host[2] not in allowed:
                raise BuildError(
                    f"condaFile pip option {line.strip()!r}: package index {host[2]} is not reachable from this "
                    f"build (the stand-in reaches the host's index only: {', '.join(sorted(allowed))})"
                )


@contextlib.contextmanager
def _serve_find_links() -> Iterator[list[str]]:
    """The host's PIP_FIND_LINKS folders served over HTTP on loopback for the build (no copy of big wheels)."""
    servers, urls = [], []
    for folder in os.environ.get("PIP_FIND_LINKS", "").split():
        if not os.path.isdir(folder):
            continue
        handler = partial(_QuietHandler, directory=folder)
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        urls.append(f"http://127.0.0.1:{srv.server_address[1]}/")
    try:
        yield urls
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base class signature
        pass


def _conda_context(image: str, conda_text: str, env_name: str, find_links: list[str]) -> bytes:
    """A tar build context: Dockerfile + the conda file + the pip requirements + the host's CA file."""
    python, pip_lines, other = parse_conda(conda_text)
    if other:
        raise BuildError(
            f"condaFile needs conda packages {other} but base image {image} has no conda: list them under pip, "
            "or use a base image with conda"
        )
    _check_indexes(pip_lines)
    prefix = f"{ENV_ROOT}/{env_name}"
    reqs = "\n".join(pip_lines) + "\n"
    opts = " ".join(f"--find-links {u}" for u in find_links)
    cert = os.environ.get("PIP_CERT") or ""
    has_cert = bool(cert) and os.path.isfile(cert)
    script = "set -eu\n"
    if python:
        script += (
            f'have=$(python3 -c "import sys; print(\'%d.%d.%d\' % sys.version_info[:3])")\n'
            f'case "$have" in {python}|{python}.*) ;; *) echo "condaFile asks for python={python}, '
            f'image has $have (no conda to install another)"; exit 1;; esac\n'
        )
    script += f"python3 -m venv {prefix}\n"
    pip_env = "PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore"
    if has_cert:
        pip_env += " PIP_CERT=/azureml-environment-setup/ca.pem"
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT"):
        if os.environ.get(var):
            pip_env += f" {var}={shlex.quote(os.environ[var])}"
    script += (
        f"{pip_env} {prefix}/bin/pip install --no-cache-dir --progress-bar off {opts} "
        f"-r /azureml-environment-setup/requirements.txt\n"
    )
    dockerfile = (
        f"FROM {image}\n"
        "COPY azureml-environment-setup /azureml-environment-setup\n"
        'RUN ["/bin/sh", "/azureml-environment-setup/install.sh"]\n'
        f"ENV PATH={prefix}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "
        f"AZUREML_CONDA_ENVIRONMENT_PATH={prefix} LANG=C.UTF-8\n"
    )
    files = {
        "Dockerfile": dockerfile.encode(),
        "azureml-environment-setup/mutated_conda_dependencies.yml": conda_text.encode(),
        "azureml-environment-setup/requirements.txt": reqs.encode(),
        "azureml-environment-setup/install.sh": script.encode(),
    }
    if has_cert:
        files["azureml-environment-setup/ca.pem"] = Path(cert).read_bytes()
    return _tar(files)


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _tar_folder(folder: Path) -> bytes:
    return _tar({p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()})


class ImageBuilder:
    """Builds (or finds) the image of an Environment version; one build per tag at a time."""

    def __init__(self, aliases: dict[str, str] | None = None):
        self.aliases = dict(DEFAULT_ALIASES if aliases is None else aliases)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, tag: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(tag, threading.Lock())

    def ensure(self, env_props: dict[str, Any], env_name: str, *, context_dir: Path | None, log: LineSink) -> BuiltEnv:
        """The image for an environment version's properties (image+condaFile, image alone, or build)."""
        import docker

        client = _docker()
        build = env_props.get("build") or {}
        if build:
            if context_dir is None:
                raise BuildError("environment build context was not downloaded")
            dockerfile = build.get("dockerfilePath") or "Dockerfile"
            self._localize_from_lines(client, context_dir / dockerfile)
            context = _tar_folder(context_dir)
            digest = hashlib.sha256(RECIPE.encode() + dockerfile.encode() + context).hexdigest()[:16]
            base_ref, conda = None, None
        else:
            image = env_props.get("image") or ""
            if not image:
                raise BuildError("environment has neither image nor build")
            base_ref = resolve_base(image, self.aliases)
            try:
                base = client.images.get(base_ref)
            except docker.errors.ImageNotFound:
                raise BuildError(
                    f"base image {image} could not be pulled (no registry is reachable from the stand-in; "
                    f"build it locally as {base_ref})"
                ) from None
            conda = env_props.get("condaFile")
            if conda is not None and not isinstance(conda, str):
                raise BuildError("condaFile must be the YAML text of the conda file")
            digest = hashlib.sha256(json.dumps([RECIPE, base.id, conda]).encode()).hexdigest()[:16]
            dockerfile = "Dockerfile"
            context = None
        tag = f"{IMAGE_REPO}:{digest}"  # by content, as Azure ML's image cache: any name with this spec reuses it
        with self._lock(tag):
            try:
                client.images.get(tag)
                log(f"Image {tag} found in the workspace's image cache: nothing to build.")
                return BuiltEnv(tag, built=False)
            except docker.errors.ImageNotFound:
                pass
            if base_ref is not None and conda is None:
                client.images.get(base_ref).tag(tag)  # an image without a conda file runs as it is
                log(f"Environment uses image {base_ref} as it is.")
                return BuiltEnv(tag, built=True)
            log(f"Building image {tag} for environment {env_name}")
            with _serve_find_links() as find_links:
                if context is None:
                    context = _conda_context(base_ref, conda, f"azureml_{digest}", find_links)  # type: ignore[arg-type]
                self._build(client, context, dockerfile, tag, log)
            return BuiltEnv(tag, built=True)

    def _localize_from_lines(self, client: Any, dockerfile: Path) -> None:
        """FROM lines through the image aliases (a registry mirror, in effect); an image that is not local fails
        the build here, before the engine would try to pull it from a registry this machine cannot reach."""
        import docker

        if not dockerfile.is_file():
            raise BuildError(f"build context has no {dockerfile.name}")
        stages: set[str] = set()
        lines = []
        for line in dockerfile.read_text().splitlines():
            m = re.match(r"^(\s*FROM\s+)(--platform=\S+\s+)?(\S+)(\s+AS\s+(\S+))?\s*$", line, re.IGNORECASE)
            if m:
                image = m[3]
                if image.lower() not in stages and image != "scratch":
                    local = resolve_base(image, self.aliases)
                    try:
                        client.images.get(local)
                    except docker.errors.ImageNotFound:
                        raise BuildError(
                            f"Image build failed: base image {image} could not be pulled (no registry is reachable "
                            f"from the stand-in; build it locally as {local})"
                        ) from None
                    line = f"{m[1]}{m[2] or ''}{local}{m[4] or ''}"
                if m[5]:
                    stages.add(m[5].lower())
            lines.append(line)
        dockerfile.write_text("\n".join(lines) + "\n")

    def _build(self, client: Any, context: bytes, dockerfile: str, tag: str, log: LineSink) -> None:
        tail: list[str] = []
        error = None
        stream = client.api.build(
            fileobj=io.BytesIO(context), custom_context=True, dockerfile=dockerfile, tag=tag, rm=True,
            forcerm=True, decode=True, network_mode="host", pull=False,
        )  # fmt: skip
        for chunk in stream:
            text = chunk.get("stream") or chunk.get("status") or ""
            if "error" in chunk:
                error = chunk["error"].strip()
                text = chunk["error"]
            for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines():
                if line.strip():
                    tail = (tail + [line])[-5:]
                    log(line)
        if error is not None:
            raise BuildError(f"Image build failed: {error.splitlines()[-1][:400]}")

