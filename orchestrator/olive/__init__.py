"""Olive's formats translated: workflow files read into the schema models (workflow, keys) and Olive's CLI
commands turned into workflows (commands: the dispatch, over one builder module per command). The one entry point
for a workflow file is `load_workflow`."""

from __future__ import annotations

from orchestrator.olive.workflow import WorkflowConfig, load_workflow

__all__ = ["WorkflowConfig", "load_workflow"]
