"""A conda.yaml read into an EnvSpec: parsed, validated, normalized and hashed, or refused in one line.

Why one parser for every system: a workload's conda.yaml is the single source of truth for Docker images, Azure ML
Environments and local venvs, so all of them must read it the same way and refuse a bad one *before* anything is
built, with one line naming the file and the field. The spec's hash (of its normalized content, not of where the
file lies) is the environment part of a cache key.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from packaging.utils import canonicalize_name

from orchestrator.core.errors import UserError
from orchestrator.core.shipped import shipped_dir

# pip options a conda.yaml pip section may carry (conda passes them through to a requirements file).
_OPTIONS_WITH_VALUE = {"--index-url", "-i", "--extra-index-url", "--find-links", "-f", "--trusted-host"}
_FLAG_OPTIONS = {"--pre", "--no-index"}
_CONDA_TOOLING = {"pip", "setuptools", "wheel"}


class EnvSpecError(UserError, ValueError):
    """A conda.yaml (or its fit with an image) is wrong: one line, naming the file and the field."""


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
        return [
            d
            for d in self.conda_deps
            if canonicalize_name(re.split(r"[=<>!~ ]", d, maxsplit=1)[0]) not in _CONDA_TOOLING
        ]

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
                names.add(canonicalize_name(egg.group(1)))
            elif m and "://" not in req.split("@")[0]:
                names.add(canonicalize_name(m.group(1)))
        return names

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
        if not any(canonicalize_name(d.split("=")[0]) == "pip" for d in self.conda_deps):
            deps.append("pip")
        deps.append({"pip": pip_items})
        doc = {"name": self.name, "channels": list(self.channels) or ["conda-forge"], "dependencies": deps}
        return yaml.safe_dump(doc, sort_keys=False)


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
