"""`orch`: the command line, by command group. main: registration and run_cli; app: the Typer app, root options,
consoles; errors: one-line errors and the exit code map; run, olive, cache, env, demo, ui, generate: the commands;
azure: the Azure ML verbs; render: progress and tables with rich; chat: `orch generate`'s session.
`orchestrator.cli:main` is the console script."""

from __future__ import annotations

from orchestrator.cli.main import app, main, run_cli

__all__ = ["app", "main", "run_cli"]
