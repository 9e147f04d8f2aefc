"""Olive keys with no field of their own in orch's models: each is honoured, refused, or (purely cosmetic)
accepted with a note that says so. Nothing is dropped silently.

This module is the order they are read in (apply: called by the reader on the raw mapping after the engine keys
were gathered, before pydantic sees it) and the top-level keys. Each class of keys has a module of its own:
pass_chain_keys (pass_flows and the pass chain), system_keys, input_model_keys, data_config_keys, engine_keys, and
pass_keys (one pass entry's keys, which the reader applies pass by pass).
"""

from __future__ import annotations

from typing import Any

from orchestrator.olive.data_config_keys import data_config_parts, dummy_data_notes
from orchestrator.olive.engine_keys import engine_notes, relative_goals
from orchestrator.olive.input_model_keys import hf_model_keys, load_kwargs
from orchestrator.olive.pass_chain_keys import adapter_chain, capture_split_info, pass_flows
from orchestrator.olive.system_keys import execution_providers, system_spellings

# Keys that change nothing a run produces: accepted with a note.
COSMETIC = {
    "$schema": "an editor's JSON-schema pointer",
    "no_artifacts": "orch writes no run artifacts besides output_dir's model/, manifest.json and training.png",
    "verbose": "orch's verbosity is log_severity_level / --verbose",
}


def apply(raw: dict[str, Any], reader: Any) -> None:
    """Cosmetic keys noted and removed, pass_flows applied, execution providers taken from the target system."""
    for key, why in COSMETIC.items():
        if key in raw:
            raw.pop(key)
            reader.notes.append(f"{key}: accepted, changes nothing ({why})")
    pass_flows(raw, reader)
    capture_split_info(raw, reader)
    adapter_chain(raw, reader)
    dummy_data_notes(raw, reader)
    data_config_parts(raw, reader)
    system_spellings(raw, reader)
    execution_providers(raw, reader)
    load_kwargs(raw, reader)
    hf_model_keys(raw, reader)
    _top_level(raw, reader)
    if isinstance(raw.get("engine"), dict):
        engine_notes(raw["engine"], reader)
        relative_goals(raw, reader)


def _top_level(raw: dict[str, Any], reader: Any) -> None:
    """Olive's top-level keys with no place in orch's WorkflowConfig."""
    if "auto_optimizer_config" in raw:
        raw.pop("auto_optimizer_config")
        reader.notes.append("auto_optimizer_config: accepted, no effect (orch runs the passes listed, once, in order)")
    if raw.get("workflow_host") is not None:
        raw.pop("workflow_host")
        reader.problem(
            ["workflow_host"],
            "running the whole workflow on another system is `orch submit --config "
            "FILE` (one Azure ML job); drop workflow_host",
        )
