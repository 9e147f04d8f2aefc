"""conda.yaml environments: parse, validate, normalize/hash, and realize locally as a venv (uv, else pip).

Why one parser for every system: a workload's conda.yaml is the single source of truth for Docker images, Azure ML
Environments and local venvs, so all of them must read it the same way and refuse a bad one *before* anything is
built, with one line naming the file and the field. The host's pip settings (index, extra index, find-links) are
captured here too, because users with private indexes need them wherever an environment is built.
"""

from __future__ import annotations

import configparser
import contextlib
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

from orchestrator.core.errors import UserError
from orchestrator.core.shipped import shipped_dir

ENV_PREFIX = "/opt/orch-env"  # where an environment lives inside an image
# orch's runtime imports: its source is mounted, not installed, so every environment must carry these.
ORCH_RUNTIME_DEPS: dict[str, tuple[str, ...]] = {
    "pydantic": ("pydantic",),
    "pyyaml": ("pyyaml",),
    "filelock": ("filelock",),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "rich": ("rich",),
    "typer": ("typer", "typer-slim"),
}
# pip options a conda.yaml pip section may carry (conda passes them through to a requirements file).
_OPTIONS_WITH_VALUE = {"--index-url", "-i", "--extra-index-url", "--find-links", "-f", "--trusted-host"}
_FLAG_OPTIONS = {"--pre", "--no-index"}
_CONDA_TOOLING = {"pip", "setuptools", "wheel"}


class EnvSpecError(UserError, ValueError):
    """A conda.yaml (or its fit with an image) is wrong: one line, naming the file and the field."""


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class EnvSpec:
    """A parsed conda.yaml. `pip_options` are flattened pip args from the pip section, in order."""

    source: Path
    name: str
    python: str  # as written: "3.11" or "3.11.2"
    channels: tuple[str, ...] = ()
    conda_deps: tuple[str, ...] = ()  # conda packages other than python (pip/setuptools/wheel included)
    pip_requirements: tuple[str, ...] = ()
    pip_options: list[str] = field(default_factory=list)

    @property
    def python_minor(self) -> str:
        return ".".join(self.python.split(".")[:2])

    @property
    def extra_conda_deps(self) -> list[str]:
        """Conda packages that only a conda tool can install (a venv cannot)."""
        return [d for d in self.conda_deps if _canon(re.split(r"[=<>!~ ]", d, maxsplit=1)[0]) not in _CONDA_TOOLING]

    def normalized(self) -> dict[str, Any]:
        """What decides the environment's content (not where the file lies): the input to its hash."""
        return {
            "name": self.name,
            "python": self.python,
            "channels": list(self.channels),
            "conda": sorted(" ".join(d.split()) for d in self.conda_deps),
            "pip": sorted(" ".join(r.split()) for r in self.pip_requirements),
            "pip_options": [" ".join(o.split()) for o in self.pip_options],
        }

    def hash(self) -> str:
        """sha256 of the normalized spec: the environment part of a cache key."""
        return hashlib.sha256(json.dumps(self.normalized(), sort_keys=True).encode()).hexdigest()

    def requirement_names(self) -> set[str]:
        names = set()
        for req in self.pip_requirements:
            m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
            egg = re.search(r"#egg=([A-Za-z0-9._-]+)", req)
            if egg:
                names.add(_canon(egg.group(1)))
            elif m and "://" not in req.split("@")[0]:
                names.add(_canon(m.group(1)))
        return names

    def check(self, *, require_orch_deps: bool = True) -> None:
        """Refuse a spec that cannot give a working orch environment (before any build)."""
        if require_orch_deps:
            have = self.requirement_names()
            missing = [k for k, alts in ORCH_RUNTIME_DEPS.items() if not any(_canon(a) in have for a in alts)]
            if missing:
                raise EnvSpecError(
                    f"{self.source}: dependencies.pip lacks orch's runtime deps {', '.join(missing)} "
                    "(orch's source is mounted, not installed: add them to the pip section)"
                )

    def check_python(self, found: str | None, *, image: str) -> None:
        """The image's python must match the spec's major.minor: a venv cannot change the interpreter."""
        if found is None:
            raise EnvSpecError(f"{self.source}: image {image} has no python3 and no conda tool to provide one")
        found_minor = ".".join(found.split(".")[:2])
        if found_minor != self.python_minor:
            raise EnvSpecError(
                f"{self.source}: dependencies python={self.python} but image {image} has python {found} "
                f"(set python={found_minor} or use a base image with python {self.python_minor})"
            )
        if self.extra_conda_deps:
            raise EnvSpecError(
                f"{self.source}: conda packages {', '.join(self.extra_conda_deps)} need conda/mamba in the "
                f"image, and {image} has none (move them under pip:, or use a conda base image)"
            )

    def to_conda_yaml(self, *, prefix_pip_options: list[str] | None = None) -> str:
        """The spec back as conda.yaml (for conda tools / Azure ML), with extra pip options in front."""
        opts = list(prefix_pip_options or [])
        pip_items: list[str] = []
        i = 0
        while i < len(opts):
            if opts[i] in _OPTIONS_WITH_VALUE and i + 1 < len(opts):
                pip_items.append(f"{opts[i]} {opts[i + 1]}")
                i += 2
            else:
                pip_items.append(opts[i])
                i += 1
        pip_items += list(self.pip_requirements)
        deps: list[Any] = [f"python={self.python}", *self.conda_deps]
        if not any(_canon(d.split("=")[0]) == "pip" for d in self.conda_deps):
            deps.append("pip")
        deps.append({"pip": pip_items})
        doc = {"name": self.name, "channels": list(self.channels) or ["conda-forge"], "dependencies": deps}
        return yaml.safe_dump(doc, sort_keys=False)


# orch's runtime layer: what orch's own code imports inside a job (the runner, the Azure ML driver, the workspace cache,
# MLflow tracking, Key Vault secrets), pinned to versions that install together. orch's source itself travels with
# the job (the code snapshot: the client's version); the user's conda file brings what the passes run on. The layer
# is added to it (`compose_runtime`), never silently swapped for a user's pin: a pin that cannot live beside it is
# refused at submit, naming the file. Docker jobs need the first group; Azure ML jobs all of it.
RUNTIME_LAYER: dict[str, str] = {
    "pydantic": "pydantic==2.14.3",
    "pyyaml": "pyyaml==6.0.3",
    "filelock": "filelock==4.2.12",
    "rich": "rich==15.0.0",
    "typer": "typer==0.29.2",
    "mlflow-skinny": "mlflow-skinny==3.17.2",
}
AZUREML_RUNTIME_LAYER: dict[str, str] = {
    **RUNTIME_LAYER,
    # azureml-mlflow 1.62 (Azure ML sets MLFLOW_TRACKING_URI=azureml://...) caps mlflow-skinny and azure-storage-blob
    "mlflow-skinny": "mlflow-skinny==3.15.0",
    "azureml-mlflow": "azureml-mlflow==1.62.0.post6",
    "azure-identity": "azure-identity==1.27.0",  # the job's identity: Key Vault, the workspace cache's datastore
    "azure-keyvault-secrets": "azure-keyvault-secrets==4.12.0",
    "azure-storage-blob": "azure-storage-blob==12.27.1",  # the workspace cache
    "matplotlib": "matplotlib==3.11.2",  # the driver publishes training.png
}
# Bounds a user's own pin must keep for the layer to install beside it (azureml-mlflow 1.62.0.post6's requirements).
LAYER_BOUNDS: dict[str, str] = {
    "mlflow-skinny": "<=3.15.0",
    "mlflow": "<=3.15.0",
    "azure-storage-blob": ">=12.5.0,<=12.27.1",
    "pydantic": ">=2.5,<3",
}
# Another name a requirement goes by for the layer (a user's full mlflow provides mlflow-skinny's modules).
LAYER_ALIASES: dict[str, tuple[str, ...]] = {"mlflow-skinny": ("mlflow",), "typer": ("typer-slim",)}
# Libraries that come with another one (its declared requirements): a pass needing the first is served by the second.
IMPLIED_BY: dict[str, tuple[str, ...]] = {
    "numpy": ("torch", "onnx", "onnxruntime", "transformers", "datasets", "matplotlib"),
    "safetensors": ("transformers", "peft", "accelerate"),
    "transformers": ("peft", "trl"),
    "accelerate": ("peft", "trl"),
    "datasets": ("trl",),
    "torch": ("peft", "accelerate"),
    "onnx": ("onnxscript", "onnx-ir"),
    "onnx-ir": ("onnxscript",),
    "compressed-tensors": ("llmcompressor",),
}
MIN_PYTHON = (3, 10)


def compose_runtime(
    spec: EnvSpec, layer: dict[str, str], *, needs: dict[str, tuple[str, ...]] | None = None, what: str = ""
) -> EnvSpec:
    """The user's spec plus orch's runtime layer: each layer package the spec does not name is added at the layer's
    pin; one it names must keep the layer's bound. `needs` ({what needs them: libraries}) must all be in the
    result. Refusals are one EnvSpecError naming the file and what to change (`what` names the config key)."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    where = f"{what} ({spec.source})" if what else str(spec.source)
    if tuple(int(x) for x in spec.python_minor.split(".")) < MIN_PYTHON:
        raise EnvSpecError(f"{where}: python={spec.python}, orch's runtime needs python>=3.10: set python=3.11")
    own: dict[str, Requirement] = {}
    for req in spec.pip_requirements:
        try:
            r = Requirement(req)
        except Exception:  # noqa: BLE001 - URLs / VCS requirements: named by #egg= or not at all
            continue
        own[_canon(r.name)] = r
    for name, bound in LAYER_BOUNDS.items():
        r = own.get(name)
        pinned = [sp.version for sp in (r.specifier if r else []) if sp.operator in ("==", "===")]
        if r is None or not pinned or SpecifierSet(bound).contains(pinned[0], prereleases=True):
            continue
        by_mlflow = name in ("mlflow", "mlflow-skinny", "azure-storage-blob")
        if by_mlflow and "azureml-mlflow" not in layer:
            continue  # the bound is azureml-mlflow's: only Azure ML's layer has it
        needer = layer["azureml-mlflow"] if by_mlflow else "orch"
        raise EnvSpecError(
            f"{where}: {r} cannot be installed beside orch's runtime layer ({needer} needs {name}{bound}): "
            f"pin {name}{_best(bound)} in that file"
        )
    added = []
    for name, pin in layer.items():
        if name in own or any(a in own for a in LAYER_ALIASES.get(name, ())):
            continue
        added.append(pin)
    have = set(own) | {_canon(Requirement(p).name) for p in added}
    if needs:
        missing: dict[str, list[str]] = {}
        for who, libs in needs.items():
            for lib in libs:
                lib = _canon(lib)
                if lib not in have and not any(_canon(p) in have for p in IMPLIED_BY.get(lib, ())):
                    missing.setdefault(lib, []).append(who)
        if missing:
            names = ", ".join(missing)
            users = sorted({w for ws in missing.values() for w in ws})
            raise EnvSpecError(
                f"{where}: lacks {names}, which {', '.join(users)} import{'s' if len(users) == 1 else ''} in the job: "
                "add them (pinned) to the pip section of that file"
            )
    if not added:
        return spec
    return replace(spec, pip_requirements=(*spec.pip_requirements, *added))


def _best(bound: str) -> str:
    """The pin a bound suggests: its upper end (==X for <=X), else the bound itself."""
    for part in bound.split(","):
        if part.startswith("<="):
            return "==" + part[2:]
    return bound


ENVIRONMENTS_DIR = shipped_dir("environments")  # environments/*.conda.yaml of the checkout, or the wheel's copy


def resolve_env_file(env: str | Path) -> Path:
    """An environment by family name (cpu-export -> environments/cpu-export.conda.yaml) or by path."""
    p = Path(env)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    candidate = ENVIRONMENTS_DIR / f"{env}.conda.yaml"
    if not candidate.exists():
        known = sorted(f.name.removesuffix(".conda.yaml") for f in ENVIRONMENTS_DIR.glob("*.conda.yaml"))
        raise EnvSpecError(f"{env}: no such environment file or family (known: {', '.join(known)})")
    return candidate


def load_env_spec(path: Path | str) -> EnvSpec:
    """Parse and validate a conda.yaml; every problem is an EnvSpecError naming the file and the field."""
    from orchestrator.schema.files import FileReadError, read_text

    path = Path(path)
    try:
        text = read_text(path, "environment file")
    except FileReadError as exc:  # not found, a folder, not UTF-8 (named with the encoding it looks like)
        raise EnvSpecError(str(exc)) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise EnvSpecError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(doc, dict):
        raise EnvSpecError(f"{path}: expected a mapping with name/channels/dependencies, got {type(doc).__name__}")
    unknown = set(doc) - {"name", "channels", "dependencies", "variables", "prefix"}
    if unknown:
        raise EnvSpecError(f"{path}: unknown top-level field(s) {', '.join(sorted(unknown))}")
    name = doc.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or ""):
        raise EnvSpecError(f"{path}: name must be a plain name (letters, digits, . _ -), got {name!r}")
    channels = doc.get("channels") or []
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise EnvSpecError(f"{path}: channels must be a list of names")
    deps = doc.get("dependencies")
    if not isinstance(deps, list) or not deps:
        raise EnvSpecError(f"{path}: dependencies must be a non-empty list")
    python = None
    conda_deps: list[str] = []
    pip_items: list[str] | None = None
    for i, dep in enumerate(deps):
        if isinstance(dep, dict):
            if set(dep) != {"pip"}:
                raise EnvSpecError(f"{path}: dependencies[{i}] must be a string or a 'pip:' list, got {dep!r}")
            if pip_items is not None:
                raise EnvSpecError(f"{path}: dependencies has two pip sections")
            items = dep["pip"]
            if not isinstance(items, list) or not items:
                raise EnvSpecError(f"{path}: dependencies.pip must be a non-empty list of requirements")
            for j, item in enumerate(items):
                if not isinstance(item, str) or not item.strip():
                    raise EnvSpecError(f"{path}: dependencies.pip[{j}] must be a requirement string, got {item!r}")
            pip_items = [str(x).strip() for x in items]
        elif isinstance(dep, str):
            m = re.fullmatch(r"\s*python\s*(?:={1,2}\s*([0-9][0-9.]*)\*?)?\s*", dep)
            if m:
                if not m.group(1) or not re.fullmatch(r"3\.\d+(\.\d+)?", m.group(1).rstrip(".")):
                    raise EnvSpecError(f"{path}: dependencies: pin python as python=3.X, got {dep!r}")
                python = m.group(1).rstrip(".")
            else:
                conda_deps.append(dep.strip())
        else:
            raise EnvSpecError(f"{path}: dependencies[{i}] must be a string or a 'pip:' list, got {dep!r}")
    if python is None:
        raise EnvSpecError(f"{path}: dependencies must pin python (e.g. python=3.11)")
    if pip_items is None:
        raise EnvSpecError(f"{path}: dependencies has no pip section (orch's environments install with pip)")
    requirements, options = _split_pip_items(path, pip_items)
    if not requirements:
        raise EnvSpecError(f"{path}: dependencies.pip has options but no requirements")
    return EnvSpec(
        source=path,
        name=name,
        python=python,
        channels=tuple(channels),
        conda_deps=tuple(conda_deps),
        pip_requirements=tuple(requirements),
        pip_options=options,
    )


def _split_pip_items(path: Path, items: list[str]) -> tuple[list[str], list[str]]:
    """Requirements vs options (`--extra-index-url URL` lines); each requirement must parse."""
    from packaging.requirements import InvalidRequirement, Requirement

    reqs: list[str] = []
    opts: list[str] = []
    for j, item in enumerate(items):
        if item.startswith("-"):
            parts = item.replace("=", " ", 1).split() if item.startswith("--") and "=" in item else item.split()
            flag = parts[0]
            if flag in _OPTIONS_WITH_VALUE and len(parts) == 2:
                opts += parts
            elif flag in _FLAG_OPTIONS and len(parts) == 1:
                opts.append(flag)
            else:
                raise EnvSpecError(
                    f"{path}: dependencies.pip[{j}] {item!r}: unsupported pip option (supported: "
                    f"{', '.join(sorted(_OPTIONS_WITH_VALUE | _FLAG_OPTIONS))})"
                )
            continue
        if re.match(r"^(git\+|hg\+|svn\+|bzr\+|https?://|file:)", item):
            reqs.append(item)
            continue
        try:
            Requirement(item)
        except InvalidRequirement as exc:
            raise EnvSpecError(
                f"{path}: dependencies.pip[{j}] {item!r} is not a valid requirement: {str(exc).splitlines()[0]}"
            ) from exc
        reqs.append(item)
    return reqs, opts


# ---------------------------------------------------------------------------------------------------------------
# Host pip settings, carried into builds


@dataclass(frozen=True)
class PipSettings:
    """Where pip finds packages on this host: config files + PIP_* env, as pip itself would read them."""

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    trusted_hosts: tuple[str, ...] = ()
    no_index: bool = False
    cert: str | None = None  # a CA bundle (corporate TLS proxies, private indexes): carried into builds

    @classmethod
    def from_host(cls, environ: dict[str, str] | None = None) -> PipSettings:
        """Read pip's config files (global, user, site; PIP_CONFIG_FILE) then PIP_* env, later wins (as pip)."""
        env = dict(os.environ if environ is None else environ)
        values: dict[str, str] = {}
        for cfg in _pip_config_files(env):
            parser = configparser.RawConfigParser()
            try:
                parser.read(cfg)
            except configparser.Error:
                continue
            for section in ("global", "install"):
                if parser.has_section(section):
                    values.update({k.replace("_", "-"): v for k, v in parser.items(section)})
        for key in ("index-url", "extra-index-url", "find-links", "trusted-host", "no-index", "cert"):
            env_key = "PIP_" + key.upper().replace("-", "_")
            if env.get(env_key):
                values[key] = env[env_key]
        return cls(
            index_url=values.get("index-url") or None,
            extra_index_urls=tuple(values.get("extra-index-url", "").split()),
            find_links=tuple(values.get("find-links", "").split()),
            trusted_hosts=tuple(values.get("trusted-host", "").split()),
            no_index=values.get("no-index", "").lower() in ("1", "true", "yes", "on"),
            cert=values.get("cert") or None,
        )

    def as_pip_args(self) -> list[str]:
        args: list[str] = []
        if self.no_index:
            args.append("--no-index")
        if self.index_url:
            args += ["--index-url", self.index_url]
        for url in self.extra_index_urls:
            args += ["--extra-index-url", url]
        for link in self.find_links:
            args += ["--find-links", link]
        for host in self.trusted_hosts:
            args += ["--trusted-host", host]
        return args

    def local_find_links(self) -> list[Path]:
        out = []
        for link in self.find_links:
            p = _local_path(link)
            if p is not None and p.exists():
                out.append(p)
        return out

    def without_local_find_links(self) -> PipSettings:
        return replace(self, find_links=tuple(f for f in self.find_links if _local_path(f) is None))

    def carry_find_links(self, dest: Path) -> int:
        """Copy (hardlink where possible) the files of local find-links folders into a build context."""
        n = 0
        for src in self.local_find_links():
            files = [src] if src.is_file() else [f for f in src.iterdir() if f.is_file()]
            for f in files:
                target = dest / f.name
                if target.exists():
                    continue
                try:
                    os.link(f, target)
                except OSError:
                    shutil.copy2(f, target)
                n += 1
        return n


def _pip_config_files(env: dict[str, str]) -> list[str]:
    if env.get("PIP_CONFIG_FILE") == os.devnull:
        return []
    xdg_dirs = env.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":")
    home = Path(env.get("HOME", str(Path.home())))
    files = [str(Path(d) / "pip" / "pip.conf") for d in xdg_dirs] + ["/etc/pip.conf"]
    files += [
        str(home / ".pip" / "pip.conf"),
        str(Path(env.get("XDG_CONFIG_HOME", home / ".config")) / "pip" / "pip.conf"),
    ]
    files.append(str(Path(sys.prefix) / "pip.conf"))
    if env.get("PIP_CONFIG_FILE"):
        files.append(env["PIP_CONFIG_FILE"])
    return [f for f in files if os.path.isfile(f)]


def _local_path(link: str) -> Path | None:
    if link.startswith("file:"):
        return Path(unquote(urlparse(link).path))
    if "://" in link:
        return None
    return Path(link).expanduser()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
        pass


@contextlib.contextmanager
def serve_local_indexes(settings: PipSettings) -> Iterator[PipSettings]:
    """Serve file:// indexes over loopback HTTP for the duration of a build (the build uses the host network).

    A container cannot see the host's file indexes (often gigabytes: too big for a build context), but with
    network_mode host it reaches 127.0.0.1, so each one is served read-only from its parent folder.
    """
    servers: list[http.server.ThreadingHTTPServer] = []

    def serve(url: str) -> str:
        p = _local_path(url)
        if p is None or not p.is_dir():
            return url
        root = p.parent
        handler = functools.partial(_QuietHandler, directory=str(root))
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/{p.name}/"

    try:
        yield replace(
            settings,
            index_url=serve(settings.index_url) if settings.index_url else None,
            extra_index_urls=tuple(serve(u) for u in settings.extra_index_urls),
        )
    finally:
        for srv in servers:
            srv.shutdown()
            srv.server_close()


# ---------------------------------------------------------------------------------------------------------------
# Local realization


VENV_STAMP = ".orch-env.json"  # written last by realize_venv: its presence means the venv is whole


def venv_realized(spec: EnvSpec, dest: Path) -> bool:
    """dest holds a finished venv of exactly this spec (realize_venv's stamp names its hash)."""
    stamp = dest / VENV_STAMP
    return (dest / "bin" / "python").exists() and stamp.exists() and json.loads(stamp.read_text()).get(
        "hash"
    ) == spec.hash()


def realize_venv(
    spec: EnvSpec | Path | str,
    dest: Path | str,
    *,
    installer: str = "auto",
    pip_settings: PipSettings | None = None,
    on_line: Callable[[str], None] | None = None,
) -> Path:
    """Create a venv at dest with the spec's pip section (uv if present, else pip); return its python.

    The interpreter is this one, so its major.minor must match the spec's python. A stamp file with the spec
    hash makes a second call with the same spec a no-op.
    """
    spec = spec if isinstance(spec, EnvSpec) else load_env_spec(spec)
    found = ".".join(str(v) for v in sys.version_info[:3])
    spec.check_python(found, image=f"this host ({sys.executable})")
    dest = Path(dest)
    python = dest / "bin" / "python"
    stamp = dest / VENV_STAMP
    if venv_realized(spec, dest):
        return python
    shutil.rmtree(dest, ignore_errors=True)  # no stamp for this spec: another spec's venv or a build that died
    uv = Path(sys.executable).parent / "uv"
    uv_bin = str(uv) if uv.is_file() else shutil.which("uv")
    use_uv = installer == "uv" or (installer == "auto" and uv_bin is not None)
    if use_uv and uv_bin is None:
        raise EnvSpecError("installer uv: no uv binary on this host")
    settings = pip_settings if pip_settings is not None else PipSettings.from_host()
    reqs = list(spec.pip_requirements)
    # every index the install will read answers now, or the build stops in seconds naming it (an unreachable
    # index would otherwise keep the installer retrying for many minutes)
    probe_indexes(package_indexes(settings, spec.pip_options), cert=settings.cert, what=spec.name or str(spec.source))
    if use_uv:
        args = settings.as_pip_args() + spec.pip_options
        _run([uv_bin, "venv", "--python", sys.executable, str(dest)], on_line)  # type: ignore[list-item]
        _run(
            [uv_bin, "pip", "install", "--python", str(python), "--index-strategy", "unsafe-best-match", *args, *reqs],
            on_line,
            env=INSTALLER_TIMEOUTS,
        )  # type: ignore[list-item]
    else:
        _run([sys.executable, "-m", "venv", str(dest)], on_line)
        # pip reads the host's pip config itself; pass only explicit settings and the spec's own options
        explicit = settings.as_pip_args() if pip_settings is not None else []
        _run([str(python), "-m", "pip", "install", *PIP_TIMEOUTS, *explicit, *spec.pip_options, *reqs], on_line)
    stamp.write_text(json.dumps({"hash": spec.hash(), "source": str(spec.source)}))
    return python


# A stalled download fails after a minute and is retried once, not the installers' defaults (pip: 5 retries with
# backoff; uv: several minutes per request): a build that cannot progress ends with the installer's error.
INSTALLER_TIMEOUTS = {"UV_HTTP_TIMEOUT": "60", "UV_HTTP_RETRIES": "1"}
PIP_TIMEOUTS = ["--timeout", "60", "--retries", "1"]
INDEX_PROBE_TIMEOUT_S = 10.0


def package_indexes(settings: PipSettings, pip_options: list[str]) -> list[str]:
    """The index URLs an install reads: the spec's --index-url, else the host's (PyPI when none is set), and
    every --extra-index-url of both."""
    main: str | None = None
    extra: list[str] = []
    for i, opt in enumerate(pip_options):
        name, eq, inline = opt.partition("=")
        value = inline if eq else (pip_options[i + 1] if i + 1 < len(pip_options) else "")
        if name in ("--index-url", "-i") and value:
            main = value
        elif name == "--extra-index-url" and value:
            extra.append(value)
    no_index = settings.no_index or "--no-index" in pip_options
    urls = [] if no_index else [main or settings.index_url or "https://pypi.org/simple"]
    return list(dict.fromkeys([*urls, *settings.extra_index_urls, *extra]))


def probe_indexes(urls: list[str], *, cert: str | None = None, what: str = "",
                  timeout: float = INDEX_PROBE_TIMEOUT_S) -> None:  # fmt: skip
    """Each index answers an HTTP request within `timeout` seconds (any status: it is there), a file:// index
    exists; else EnvSpecError naming the index, how long it was given, and what to do."""
    import ssl
    import urllib.error
    import urllib.request

    context = ssl.create_default_context(cafile=cert) if cert and os.path.isfile(cert) else None
    for url in urls:
        local = _local_path(url)
        if local is not None:
            if not local.exists():
                raise EnvSpecError(f"{what}: package index {url} does not exist on this host; fix the index setting")
            continue
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout, context=context):
                pass
        except urllib.error.HTTPError:
            continue  # it answered: reachable (a 401/404 is the installer's to report)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise EnvSpecError(
                f"{what}: package index {url} is unreachable from this host ({type(reason).__name__}: {reason}; "
                f"waited {timeout:.0f} s); nothing was installed. Reach it (proxy, VPN), point pip at a mirror "
                "(PIP_INDEX_URL / PIP_EXTRA_INDEX_URL), or run this pass where the index is reachable"
            ) from None


def _run(cmd: list[str], on_line: Callable[[str], None] | None, env: dict[str, str] | None = None) -> None:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        env={**os.environ, **env} if env else None,
    )  # fmt: skip
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-30:]
        if on_line is not None:
            on_line(line.rstrip("\n"))
    if proc.wait() != 0:
        raise EnvSpecError(f"{cmd[0]} {cmd[1]} failed (exit {proc.returncode}): " + (tail[-1] if tail else ""))
