"""Docker images for orch: the debootstrap base image, and one image per (base image, conda.yaml, orch version).

Why images are content-addressed: an environment image is expensive (torch + transformers take minutes), so its
tag is a hash of what decides its content -- the base image *id*, the normalized environment spec and orch's
version -- and `build_environment` returns an existing image with that tag without building. orch itself is not
installed into the image (its source is mounted at run time), so editing orch never rebuilds an environment.

Layers: the environment is installed in a build stage and copied into the final image as ONE layer on top of the
base, so the final image holds no pip/uv caches, no carried wheels and no index settings (which may hold tokens).
Everything talks to the engine through the docker SDK; no shell strings on the host.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orchestrator
from orchestrator.systems.environments.local_venv import NO_UV, host_uv
from orchestrator.systems.environments.package_indexes import PipSettings, serve_local_indexes
from orchestrator.systems.environments.runtime_layer import require_runtime_deps
from orchestrator.systems.environments.spec import EnvSpec, EnvSpecError, load_env_spec, resolve_env_file

LineCallback = Callable[[str], None]

ENV_PREFIX = "/opt/orch-env"  # where an environment lives inside an image
DEFAULT_BASE_IMAGE = "orch/base:bookworm-py311"
DEFAULT_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
ENV_REPOSITORY = "orch/env"
RECIPE_VERSION = "2"  # bump when the Dockerfile/install recipe below changes what an image holds
LABEL_PREFIX = "org.orch."


def docker_client() -> Any:
    """A docker SDK client from the environment (DOCKER_HOST or the local socket), with a clear error if down."""
    import docker

    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except Exception as exc:  # docker.errors.DockerException and requests errors alike
        from orchestrator.systems.base import SystemFailure

        raise SystemFailure(
            f"no Docker engine answers ({type(exc).__name__}); start dockerd or set DOCKER_HOST"
        ) from exc
    return client


def _emit(on_line: LineCallback | None, line: str) -> None:
    if on_line is not None:
        on_line(line.rstrip("\n"))


def _image_or_none(client: Any, name: str) -> Any:
    import docker

    try:
        return client.images.get(name)
    except docker.errors.ImageNotFound:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Base image: debootstrap + docker import (no registry is reachable, so nothing can be pulled)


def build_base_image(
    name: str = DEFAULT_BASE_IMAGE,
    *,
    suite: str = DEFAULT_SUITE,
    mirror: str = DEFAULT_MIRROR,
    packages: tuple[str, ...] = BASE_PACKAGES,
    on_line: LineCallback | None = None,
    force: bool = False,
) -> str:
    """Build a minimal Debian image with python3 + venv + pip; return its id. Skips when `name` exists."""
    client = docker_client()
    existing = _image_or_none(client, name)
    if existing is not None and not force:
        _emit(on_line, f"base image {name} exists ({existing.short_id}); nothing to build")
        return existing.id
    if shutil.which("debootstrap") is None:
        from orchestrator.systems.base import SystemFailure

        raise SystemFailure("debootstrap is not installed (apt-get install -y debootstrap)")
    repository, _, tag = name.rpartition(":") if ":" in name.split("/")[-1] else (name, "", "latest")
    work = Path(tempfile.mkdtemp(prefix="orch-base-", dir=os.environ.get("ORCH_BUILD_TMP", "/var/tmp")))
    try:
        rootfs = work / "rootfs"
        cmd = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(packages)}",
            suite,
            str(rootfs),
            mirror,
        ]
        _emit(on_line, "$ " + " ".join(cmd))
        _stream_process(cmd, on_line)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        tar_path = work / "rootfs.tar"
        _stream_process(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tar_path), "."], on_line)
        _emit(on_line, f"importing {tar_path.stat().st_size / 1e6:.0f} MB as {name}")
        changes = [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            'CMD ["python3"]',
            f"LABEL {LABEL_PREFIX}kind=base {LABEL_PREFIX}suite={suite}",
        ]
        out = client.api.import_image_from_file(str(tar_path), repository=repository, tag=tag, changes=changes)
        for line in str(out).splitlines():
            _emit(on_line, line)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    image = client.images.get(name)
    _emit(on_line, f"built base image {name} ({image.short_id})")
    return image.id


def _stream_process(cmd: list[str], on_line: LineCallback | None) -> None:
    """Run a host tool (debootstrap, tar), streaming its output; raise with the tail when it fails."""
    tail: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-30:]
        _emit(on_line, line)
    if proc.wait() != 0:
        from orchestrator.systems.base import SystemFailure

        raise SystemFailure(f"{cmd[0]} failed with exit code {proc.returncode}", log_tail="\n".join(tail))


# ---------------------------------------------------------------------------------------------------------------
# Environment images


@dataclass(frozen=True)
class ImageProbe:
    """What a base image offers: its python (major.minor.patch) and a conda-like tool, if any."""

    python: str | None
    conda: str | None  # micromamba | mamba | conda


_PROBE = (
    'for c in micromamba mamba conda; do if command -v "$c" >/dev/null 2>&1; then echo "conda=$c"; break; fi; done; '
    'for p in python3 python; do if command -v "$p" >/dev/null 2>&1; then '
    '"$p" -c "import sys; print(\'python=%d.%d.%d\' % sys.version_info[:3])"; break; fi; done'
)


def probe_image(client: Any, image: str) -> ImageProbe:
    """Run a throw-away container of `image` to learn its python version and conda tool (cached by image id)."""
    img = client.images.get(image)
    cache = _probe_cache()
    if img.id in cache:
        return ImageProbe(**cache[img.id])
    out = client.containers.run(img.id, ["/bin/sh", "-c", _PROBE], remove=True, network_mode="none", user="0:0")
    found = dict(line.split("=", 1) for line in out.decode().splitlines() if "=" in line)
    probe = ImageProbe(python=found.get("python"), conda=found.get("conda"))
    cache[img.id] = {"python": probe.python, "conda": probe.conda}
    _probe_cache_path().parent.mkdir(parents=True, exist_ok=True)
    _probe_cache_path().write_text(json.dumps(cache))
    return probe


def _probe_cache_path() -> Path:
    return Path(os.environ.get("ORCH_HOME", Path.home() / ".cache" / "orch")) / "docker" / "probes.json"


def _probe_cache() -> dict[str, dict[str, str | None]]:
    try:
        return json.loads(_probe_cache_path().read_text())
    except (FileNotFoundError, ValueError):
        return {}


@dataclass(frozen=True)
class BuiltImage:
    """The outcome of build_environment: `built` is False when an image with the tag was reused."""

    tag: str
    image_id: str
    built: bool
    seconds: float
    env_name: str
    env_hash: str
    installer: str  # uv | pip | micromamba | mamba | conda | dockerfile
    size_bytes: int


def environment_tag(spec: EnvSpec, base_image_id: str, *, version: str | None = None) -> tuple[str, str]:
    """(tag, hash) of an environment image: hash of base image id + normalized spec + orch version."""
    version = version or f"{orchestrator.__version__}+r{RECIPE_VERSION}"
    payload = json.dumps(
        {"base_image_id": base_image_id, "spec": spec.normalized(), "orch_version": version}, sort_keys=True
    )
    digest = hashlib.sha256(payload.encode()).hexdigest()
    return f"{ENV_REPOSITORY}:{spec.name}-{digest[:16]}", digest


def build_environment(
    env: str | Path | EnvSpec,
    *,
    base_image: str = DEFAULT_BASE_IMAGE,
    on_line: LineCallback | None = None,
    pip_settings: PipSettings | None = None,
    installer: str = "auto",
    tag: str | None = None,
    force: bool = False,
    require_orch_deps: bool = True,
) -> BuiltImage:
    """The image for a conda.yaml on a base image: reused when its content tag exists, else built (streamed).

    The spec is validated before any build (bad YAML, missing fields, a python that the base image does not
    have, missing orch runtime deps): the error is one line naming the file and field. `installer` is "auto"
    (conda tool in the image, else uv, else pip), "uv" or "pip". `pip_settings` default to the host's (pip
    config + PIP_* env), so private indexes and local wheel folders work in the build as they do on the host.
    """
    started = time.monotonic()
    spec = env if isinstance(env, EnvSpec) else load_env_spec(resolve_env_file(env))
    if require_orch_deps:
        require_runtime_deps(spec)
    client = docker_client()
    base = _image_or_none(client, base_image)
    if base is None:
        hint = " (build it: orch env base)" if base_image == DEFAULT_BASE_IMAGE else ""
        raise EnvSpecError(f"{spec.source}: base image {base_image} is not present{hint}")
    probe = probe_image(client, base_image)
    if probe.conda is None:
        spec.check_python(probe.python, image=base_image)
    env_tag, env_hash = environment_tag(spec, base.id)
    tag = tag or env_tag
    existing = _image_or_none(client, tag)
    if existing is not None and not force:
        return BuiltImage(
            tag=tag,
            image_id=existing.id,
            built=False,
            seconds=time.monotonic() - started,
            env_name=spec.name,
            env_hash=env_hash,
            installer=existing.labels.get(f"{LABEL_PREFIX}installer", "?"),
            size_bytes=existing.attrs.get("Size", 0),
        )
    chosen = _choose_installer(installer, probe)
    settings = pip_settings if pip_settings is not None else PipSettings.from_host()
    labels = {
        f"{LABEL_PREFIX}kind": "env",
        f"{LABEL_PREFIX}env.name": spec.name,
        f"{LABEL_PREFIX}env.hash": env_hash,
        f"{LABEL_PREFIX}env.file": str(spec.source),
        f"{LABEL_PREFIX}base.image": base_image,
        f"{LABEL_PREFIX}base.id": base.id,
        f"{LABEL_PREFIX}orch.version": orchestrator.__version__,
        f"{LABEL_PREFIX}installer": chosen,
        f"{LABEL_PREFIX}python": spec.python,
    }
    with tempfile.TemporaryDirectory(prefix="orch-ctx-", dir=os.environ.get("ORCH_BUILD_TMP", "/var/tmp")) as ctx:
        ctx_path = Path(ctx)
        with serve_local_indexes(settings) as served:
            _write_context(ctx_path, spec, served, chosen, base.id, labels)
            _emit(on_line, f"building {tag} from {spec.source} on {base_image} with {chosen}")
            _docker_build(client, ctx_path, tag, on_line)
    image = client.images.get(tag)
    _prune_build_stages(client, env_hash)
    return BuiltImage(
        tag=tag,
        image_id=image.id,
        built=True,
        seconds=time.monotonic() - started,
        env_name=spec.name,
        env_hash=env_hash,
        installer=chosen,
        size_bytes=image.attrs.get("Size", 0),
    )


def _choose_installer(installer: str, probe: ImageProbe) -> str:
    if installer not in ("auto", "uv", "pip"):
        raise EnvSpecError(f"installer {installer!r}: expected auto, uv or pip")
    if installer == "auto":
        if probe.conda:
            return probe.conda
        return "uv" if host_uv() else "pip"
    if installer == "uv" and not host_uv():
        raise EnvSpecError(NO_UV)
    return installer


def _write_context(
    ctx: Path, spec: EnvSpec, settings: PipSettings, installer: str, base_id: str, labels: dict[str, str]
) -> None:
    """Dockerfile + install script + carried wheels. The build stage holds wheels/settings; the final does not."""
    build = ctx / "orch-build"
    build.mkdir()
    wheels = build / "wheels"
    wheels.mkdir()
    carried = settings.carry_find_links(wheels)
    pip_options = settings.without_local_find_links().as_pip_args() + spec.pip_options
    if carried:
        pip_options += ["--find-links", "/orch-build/wheels"]
    (build / "requirements.txt").write_text("\n".join(spec.pip_requirements) + "\n")
    (build / "environment.yaml").write_text(spec.to_conda_yaml(prefix_pip_options=pip_options))
    if installer == "uv":  # the host's uv (a static-enough ELF) goes into the build stage; the image never keeps it
        shutil.copy2(host_uv(), build / "uv")  # type: ignore[arg-type]
    has_cert = bool(settings.cert and Path(settings.cert).is_file())
    if has_cert:
        shutil.copy2(settings.cert, build / "ca.pem")  # type: ignore[arg-type]
    (build / "install.sh").write_text(_install_script(spec, installer, pip_options, has_cert=has_cert))
    label_line = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items()))
    (ctx / "Dockerfile").write_text(
        f"""# generated by orch {orchestrator.__version__}: environment {spec.name}
FROM {base_id} AS build
LABEL {LABEL_PREFIX}stage={labels[f"{LABEL_PREFIX}env.hash"]}
COPY orch-build /orch-build
RUN ["/bin/sh", "/orch-build/install.sh"]

FROM {base_id}
COPY --from=build {ENV_PREFIX} {ENV_PREFIX}
ENV PATH={ENV_PREFIX}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    VIRTUAL_ENV={ENV_PREFIX} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8
LABEL {label_line}
"""
    )


def _install_script(spec: EnvSpec, installer: str, pip_options: list[str], *, has_cert: bool = False) -> str:
    """The build stage's script: create ENV_PREFIX with the conda tool, or a venv filled by uv / pip."""
    q = " ".join(_sh_quote(o) for o in pip_options)
    head = "set -eu\nexport PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore\n"
    if has_cert:  # the host's CA bundle (TLS proxy / private index); the build stage only
        ca = "/orch-build/ca.pem"
        head += f"export PIP_CERT={ca} SSL_CERT_FILE={ca} REQUESTS_CA_BUNDLE={ca}\n"
    if installer in ("micromamba", "mamba", "conda"):
        return head + f"{installer} env create -y -p {ENV_PREFIX} -f /orch-build/environment.yaml\n"
    if installer == "uv":  # compiled bytecode: a read-only env would otherwise recompile torch on every run
        return head + (
            "export UV_NO_CACHE=1 UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never UV_COMPILE_BYTECODE=1\n"
            f"/orch-build/uv venv --python /usr/bin/python3 {ENV_PREFIX}\n"
            f"/orch-build/uv pip install --python {ENV_PREFIX}/bin/python --index-strategy unsafe-best-match "
            f"{q} -r /orch-build/requirements.txt\n"
        )
    return head + (
        f"python3 -m venv {ENV_PREFIX}\n"
        f"{ENV_PREFIX}/bin/pip install --no-cache-dir --progress-bar off {q} -r /orch-build/requirements.txt\n"
    )


def _sh_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the legacy builder paints stderr red


def _docker_build(
    client: Any, ctx: Path, tag: str, on_line: LineCallback | None, *, dockerfile: str | None = None
) -> None:
    """docker build through the SDK's low-level stream so every line reaches on_line as it happens."""
    tail: list[str] = []
    stream = client.api.build(
        path=str(ctx),
        tag=tag,
        dockerfile=dockerfile,
        rm=True,
        forcerm=True,
        decode=True,
        network_mode="host",
        pull=False,
    )
    error = None
    for chunk in stream:
        text = chunk.get("stream") or chunk.get("status") or ""
        if "error" in chunk:
            error = chunk["error"].strip()
            text = chunk["error"]
        for line in _ANSI.sub("", text).splitlines():
            if line.strip():
                tail = (tail + [line])[-30:]
                _emit(on_line, line)
    if error is not None:
        from orchestrator.systems.base import SystemFailure

        raise SystemFailure(f"image build {tag} failed: {error.splitlines()[-1][:300]}", log_tail="\n".join(tail))


def _prune_build_stages(client: Any, env_hash: str) -> None:
    """Drop the build stage (caches, carried wheels) left untagged by the legacy builder."""
    import docker

    for _ in range(8):  # each removal can leave its parent step dangling in turn
        stale = client.images.list(filters={"label": f"{LABEL_PREFIX}stage={env_hash}", "dangling": True})
        if not stale:
            return
        for img in stale:
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(img.id, noprune=False)


def list_environments() -> list[dict[str, Any]]:
    """The environment images orch built: tag, env name, hash, base, installer, size, created."""
    client = docker_client()
    out = []
    for img in client.images.list(filters={"label": f"{LABEL_PREFIX}kind=env"}):
        labels = img.labels
        out.append(
            {
                "tag": img.tags[0] if img.tags else img.short_id,
                "id": img.short_id,
                "env": labels.get(f"{LABEL_PREFIX}env.name", "?"),
                "hash": labels.get(f"{LABEL_PREFIX}env.hash", "")[:16],
                "file": labels.get(f"{LABEL_PREFIX}env.file", ""),
                "base": labels.get(f"{LABEL_PREFIX}base.image", ""),
                "installer": labels.get(f"{LABEL_PREFIX}installer", ""),
                "size_mb": round(img.attrs.get("Size", 0) / 1e6, 1),
                "created": img.attrs.get("Created", ""),
            }
        )
    return sorted(out, key=lambda r: (r["env"], r["created"]))


def remove_environment(name_or_tag: str, *, force: bool = False) -> list[str]:
    """Remove environment images by tag, by env name (all its versions) or by hash prefix; return what went."""
    import docker

    client = docker_client()
    removed = []
    for row in list_environments():
        if name_or_tag in (row["tag"], row["env"], row["id"]) or (
            len(name_or_tag) >= 6 and row["hash"].startswith(name_or_tag)
        ):
            try:
                client.images.remove(row["tag"], force=force)
                removed.append(row["tag"])
            except docker.errors.APIError as exc:
                from orchestrator.systems.base import SystemFailure

                raise SystemFailure(f"cannot remove {row['tag']}: {exc.explanation or exc}") from exc
    return removed


def main(argv: list[str] | None = None) -> int:
    """`python -m orchestrator.systems.docker.images base|build ENV|ls|rm NAME`: for CI set-up before the orch CLI."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m orchestrator.systems.docker.images", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("base", help=f"build {DEFAULT_BASE_IMAGE} with debootstrap (skipped when present)")
    b = sub.add_parser("build", help="build or reuse the image of a conda.yaml / env family")
    b.add_argument("env")
    b.add_argument("--base-image", default=DEFAULT_BASE_IMAGE)
    b.add_argument("--installer", default="auto", choices=["auto", "uv", "pip"])
    sub.add_parser("ls", help="list environment images")
    r = sub.add_parser("rm", help="remove environment images by tag, env name or hash prefix")
    r.add_argument("name")
    args = ap.parse_args(argv)
    if args.cmd == "base":
        build_base_image(on_line=print)
    elif args.cmd == "build":
        built = build_environment(args.env, base_image=args.base_image, installer=args.installer, on_line=print)
        print(f"{built.tag} {'built' if built.built else 'reused'} in {built.seconds:.1f}s")
    elif args.cmd == "ls":
        for row in list_environments():
            print(f"{row['tag']:50} {row['installer']:5} {row['size_mb']:>8} MB  {row['file']}")
    else:
        print("\n".join(remove_environment(args.name)) or "nothing removed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
