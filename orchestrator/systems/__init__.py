"""Where jobs run: Local (a subprocess), Docker (a container), Azure ML (a command job). One table names them
all (registry); the classes load lazily. Systems never import passes: what a pass needs reaches them as data."""

from __future__ import annotations

from orchestrator.systems.base import System, SystemFailure
from orchestrator.systems.registry import KEYWORDS, KINDS, make_system, system_class

__all__ = ["KEYWORDS", "KINDS", "System", "SystemFailure", "make_system", "system_class"]
