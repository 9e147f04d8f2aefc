"""The one table of system kinds: type name -> config model (schema/) -> class (imported on first use).

Everything that names systems reads it: the workflow reader (canonical `type`, accepted `engine.host` words),
the engine (`--host local|docker|aml`, is this Azure ML?) and `make_system`. The classes load lazily: the
docker and azure SDKs load only when their system is used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from orchestrator.schema.systems import AzureMLSystemConfig, DockerSystemConfig, LocalSystemConfig
from orchestrator.systems.base import System, SystemFailure


@dataclass(frozen=True)
class SystemKind:
    """One system kind: Olive's type name, its config model, where its class lives, and its other names."""

    type_name: str  # Olive's canonical `type`
    config_model: type[BaseModel]
    target: str  # "module:Class"
    aliases: tuple[str, ...] = ()  # other spellings of `type` (any case)
    keywords: tuple[str, ...] = ()  # --host / engine.host words; the first is the one messages name

    def load(self) -> type[System]:
        module_name, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module_name), attr)


KINDS: tuple[SystemKind, ...] = (
    SystemKind(
        "LocalSystem", LocalSystemConfig, "orchestrator.systems.local:LocalSystem", ("PythonEnvironment",), ("local",)
    ),
    SystemKind("Docker", DockerSystemConfig, "orchestrator.systems.docker.system:DockerSystem", ("DockerSystem",),
               ("docker",)),  # fmt: skip
    SystemKind("AzureML", AzureMLSystemConfig, "orchestrator.systems.azureml.system:AzureMLSystem",
               ("AzureMLSystem",), ("aml", "azureml")),  # fmt: skip
)
_BY_NAME: dict[str, SystemKind] = {n.lower(): k for k in KINDS for n in (k.type_name, *k.aliases)}
# `--host local|docker|aml` keywords -> system type
KEYWORDS: dict[str, str] = {w: k.type_name for k in KINDS for w in k.keywords}
MAIN_KEYWORDS: tuple[str, ...] = tuple(k.keywords[0] for k in KINDS)  # local, docker, aml: what messages list


def canonical_type(value: Any) -> Any:
    """'azureml' / 'AzureMLSystem' / 'PythonEnvironment' -> Olive's canonical names; others unchanged."""
    if isinstance(value, str):
        found = _BY_NAME.get(value.lower())
        return found.type_name if found else value
    return value


def kind_of(type_name: str) -> SystemKind:
    found = _BY_NAME.get(str(type_name).lower())
    if found is None:
        known = ", ".join(k.type_name for k in KINDS)
        raise SystemFailure(f"unknown system type {type_name!r}; known: {known}")
    return found


def is_azureml(name_or_type: str) -> bool:
    """A type name or a host keyword that means Azure ML (aml, azureml, AzureMLSystem, ...)."""
    value = str(name_or_type)
    return canonical_type(KEYWORDS.get(value.lower(), value)) == "AzureML"


def system_config(name: str, systems: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    """(type, config) for a workflow system name, or for a keyword (local/docker/aml: the first system of that
    type in `systems`, else its defaults); None when the name is neither."""
    if name in systems:
        cfg = systems[name]
        return cfg.get("type", "LocalSystem"), cfg
    if name not in KEYWORDS:
        return None
    type_name = KEYWORDS[name]
    match = [cfg for cfg in systems.values() if cfg.get("type") in (type_name, f"{type_name}System")]
    return type_name, (match[0] if match else {"type": type_name})


def keyword_of(name_or_type: str) -> str:
    """A type name, alias or host keyword -> its kind's main keyword (local, docker, aml); "" when unknown."""
    value = str(name_or_type)
    found = _BY_NAME.get(KEYWORDS.get(value.lower(), value).lower())
    return found.keywords[0] if found else ""


def system_class(type_name: str) -> type[System]:
    return kind_of(type_name).load()


def make_system(type_name: str, config: dict[str, Any] | None = None, **context: Any) -> System:
    """Build a system from its config dict (the json form of the workflow's `systems.<name>`)."""
    return system_class(type_name).from_config(config or {}, **context)
