"""Olive's data-config keys with no field in orch's DataConfig: Olive < 0.7's params_config read as the
components, component parameters that change nothing here (data_params), dataloader / post-processing configs
(orch's passes tokenize, batch and score the text rows themselves), and the dummy containers' shape hints.
"""

from __future__ import annotations

from typing import Any


def dummy_data_notes(raw: dict[str, Any], reader: Any) -> None:
    """Dummy containers' keys that Olive uses to find shapes orch reads from the graph itself."""
    for dc in raw.get("data_configs") or []:
        if not isinstance(dc, dict) or "dummydatacontainer" not in str(dc.get("type", "")).lower():
            continue
        load = dc.get("load_dataset_config") or {}
        params = {**load, **(load.get("params") or {})} if isinstance(load, dict) else {}
        given = sorted(k for k in ("model_name", "trust_remote_code", "model_framework") if k in params)
        if given:
            reader.notes.append(
                f"data config {dc.get('name')!r}: {', '.join(given)} accepted, changes nothing (orch takes the "
                "input names, KV heads and vocabulary from the ONNX graph and its config.json)"
            )


def data_config_parts(raw: dict[str, Any], reader: Any) -> None:
    """Olive's dataloader_config / post_process_data_config: orch's passes tokenize, batch and score the text rows
    themselves, so their parameters change nothing (empty ones, which Olive's CLI templates write, are dropped
    silently); a post-processing function of a user_script is refused where the components are read."""
    for i, dc in enumerate(raw.get("data_configs") or []):
        if not isinstance(dc, dict):
            continue
        for part in ("dataloader_config", "post_process_data_config"):
            if part not in dc:
                continue
            value = dc.pop(part)
            if not value:
                continue
            if not isinstance(value, dict):
                reader.problem(["data_configs", i, part], "expected a mapping of parameters")
                continue
            params = {**value, **(value.get("params") or {})}
            params.pop("params", None)
            if part == "post_process_data_config" and params.get("type") and dc.get("user_script"):
                reader.problem(
                    ["data_configs", i, part, "type"],
                    "post-processing functions are not run by orch (its "
                    "passes tokenize, batch and score the text rows themselves); drop it, or do the work in "
                    "load_dataset / pre_process_data",
                )
                continue
            shown = ", ".join(f"{k}={v}" for k, v in params.items())
            reader.notes.append(
                f"data_configs[{i}].{part} ({shown}): accepted, no effect (orch's passes tokenize, "
                "batch and score the text rows themselves)"
            )


# data-config parameters Olive's components take that change nothing here, and why
DATA_PARAM_NOTES: dict[str, dict[str, str]] = {
    "load_dataset_config": {
        "trust_remote_code": "datasets reads the data files; no dataset script is run",
        "streaming": "the rows are read whole (small fine-tuning and calibration sets)",
    },
    "pre_process_data_config": {
        "trust_remote_code": "the tokenizer is the model's, loaded by the pass",
        "joiner": "the join strategies concatenate the token streams with the tokenizer's EOS between texts",
        "padding_side": "the collator pads on the right and masks the padding out of the loss",
        "processing_batch_size": "rows are rendered in one map",
        "random_retries": "random windows are drawn from texts long enough for them",
    },
}


def data_params(dc: dict[str, Any], path: tuple[Any, ...], reader: Any) -> None:
    """Component parameters of Olive's HuggingfaceContainer with no effect here: noted and dropped."""
    if not isinstance(dc, dict) or "dummydatacontainer" in str(dc.get("type", "")).lower():
        return
    for part, notes in DATA_PARAM_NOTES.items():
        cfg = dc.get(part)
        if not isinstance(cfg, dict):
            continue
        for key, why in notes.items():
            if key in cfg:
                value = cfg.pop(key)
                reader.notes.append(
                    f"data_configs {dc.get('name')!r}: {part}.{key} {value!r}: accepted, no effect ({why})"
                )


_LOAD_KEYS = {"data_name", "subset", "split", "data_files", "data_dir", "col_filters"}


def params_config(dc: dict[str, Any], path: tuple[Any, ...], reader: Any) -> None:
    """Olive < 0.7's `params_config` (+ `component_kwargs`) -> load_dataset_config / pre_process_data_config."""
    params = dc.get("params_config")
    if not isinstance(params, dict):
        return
    if "load_dataset_config" in dc or "pre_process_data_config" in dc:
        reader.problem([*path, "params_config"], "give params_config or load/pre_process_data_config, not both")
        return
    dc.pop("params_config")
    params = dict(params)
    kwargs = params.pop("component_kwargs", None) or {}
    load = {k: params.pop(k) for k in list(params) if k in _LOAD_KEYS}
    load |= kwargs.get("load_dataset") or {}
    pre = dict(params) | (kwargs.get("pre_process_data") or {})  # the rest are pre-processing arguments
    for other in sorted(set(kwargs) - {"load_dataset", "pre_process_data"}):
        reader.problem([*path, "params_config", "component_kwargs", other], "only load_dataset and pre_process_data")
    dc["load_dataset_config"] = load
    if pre:
        dc["pre_process_data_config"] = pre
    reader.notes.append(
        f"data_configs {dc.get('name')!r}: params_config read as load_dataset_config + pre_process_data_config"
    )
