"""`orch`: the command line. main: the commands and the one error -> exit code mapping; azure: the Azure ML
verbs; render: progress and tables with rich. `orchestrator.cli:main` is the console script."""

from __future__ import annotations

from orchestrator.cli.main import app, main, run_cli

__all__ = ["app", "main", "run_cli"]
