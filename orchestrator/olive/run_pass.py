"""Olive's run-pass -> a workflow of the one pass named (--list-passes: the passes orch runs)."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.olive.flag_parsing import Given
from orchestrator.olive.model_ref import _model_of, input_model
from orchestrator.olive.plan import FlagError, Plan, _engine, _log_level, _provider, common


def build_run_pass(g: Given, host: str | None) -> Plan:
    """Olive's run-pass: one pass of --pass-name with --pass-config on -m."""
    from orchestrator.passes.registry import PASSES, UNSUPPORTED

    plan = Plan()
    common(g, plan)
    if g["list_passes"]:
        lines = [f"{name}" for name in sorted(PASSES)]
        lines += [f"{name} (not run: {why})" for name, why in sorted(UNSUPPORTED.items())]
        plan.message = "passes orch runs:\n  " + "\n  ".join(lines)
        return plan
    if not g["pass_name"]:
        raise FlagError("--pass-name is required (or --list-passes)")
    config: dict[str, Any] = {}
    if g["pass_config"]:
        try:
            config = json.loads(g["pass_config"])
        except ValueError:
            raise FlagError(
                f'--pass-config {g["pass_config"]!r}: not JSON (e.g. \'{{"precision": "int4"}}\')'
            ) from None
        if not isinstance(config, dict):
            raise FlagError("--pass-config: give a JSON object of the pass's settings")
    model = _model_of(g, plan)
    provider = _provider(g["provider"], g["device"])
    plan.workflow = {
        "input_model": input_model(
            model.path, trust_remote_code=bool(g["trust_remote_code"]), task=g["task"], adapter_path=model.adapter_path
        ),
        "passes": {g["pass_name"]: {"type": g["pass_name"], **config}},
        "engine": _engine(g["output_path"] or "run-pass-output", _log_level(g), [provider], host, host),
    }
    return plan
