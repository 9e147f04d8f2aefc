"""System kinds by name, imported lazily (the docker and azure SDKs load only when their system is used)."""

from __future__ import annotations

import importlib
from typing import Any

from orchestrator.systems.base import System, SystemFailure

SYSTEMS: dict[str, str] = {
    "LocalSystem": "orchestrator.systems.local:LocalSystem",
    "Docker": "orchestrator.systems.docker.system:DockerSystem",
    "DockerSystem": "orchestrator.systems.docker.system:DockerSystem",
    "AzureML": "orchestrator.systems.azureml.system:AzureMLSystem",
    "AzureMLSystem": "orchestrator.systems.azureml.system:AzureMLSystem",
}

# `--host local|docker|aml` keywords -> system type
KEYWORDS: dict[str, str] = {"local": "LocalSystem", "docker": "Docker", "aml": "AzureML", "azureml": "AzureML"}


def system_class(type_name: str) -> type[System]:
    try:
        target = SYSTEMS[type_name]
    except KeyError:
        raise SystemFailure(f"unknown system type {type_name!r}; known: LocalSystem, Docker, AzureML") from None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def make_system(type_name: str, config: dict[str, Any] | None = None, **context: Any) -> System:
    """Build a system from its config dict (the json form of the workflow's `systems.<name>`)."""
    cls = system_class(type_name)
    return cls.from_config(config or {}, **context)
